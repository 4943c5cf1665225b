"""Per-class loss weights computed from the training data.

The loss takes a list of ``1 + C`` weights, background first (channel 0 of the
logits, docs/CONVENTIONS.md). The weighting functions here return the ``C``
foreground weights only; :func:`resolve_class_weights` prepends the background
weight, which is always 1.

Normalisation: with ``normalize=True`` the foreground weights are scaled so that
their **mean is 1** (the background weight stays 1), so switching weighting on
does not change the overall size of the classification loss, only its balance.

Counting: :func:`class_counts` counts the objects that are training targets,
i.e. it skips ``difficult``/``iscrowd`` objects (the loss ignores them).
A class with zero objects gets the weight of the rarest class present (its
weight never matters for positives, and an infinite weight would break the
normalisation).
"""

import numpy as np

BACKGROUND = "background"
METHODS = ("inverse_frequency", "effective_number")


def class_counts(records, num_classes, include_ignored=False):
    """Objects per class ``[num_classes]`` (int64) over ``records``.

    Ignored objects (difficult / iscrowd) are skipped unless ``include_ignored``.
    """
    counts = np.zeros((num_classes,), np.int64)
    for record in records:
        classes = np.asarray(record.classes)
        if not include_ignored:
            classes = classes[~np.asarray(record.ignore, bool)]
        if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
            raise ValueError(
                f"record {record.image_id!r} ({record.image_path}) has class ids "
                f"{sorted(set(classes.tolist()))} outside 0..{num_classes - 1}")
        counts += np.bincount(classes, minlength=num_classes).astype(np.int64)
    return counts


def inverse_frequency_weights(counts, normalize=True):
    """Foreground weights ``w_c = 1 / n_c`` (``[C]``), mean 1 when ``normalize``."""
    counts = _check_counts(counts)
    return _finish(_per_present_class(counts, lambda n: 1.0 / n), normalize)


def effective_number_weights(counts, beta=0.999, normalize=True):
    """Class-balanced weights of Cui et al. 2019, ``(1 - beta) / (1 - beta**n_c)``.

    ``beta`` in [0, 1): 0 gives equal weights, ``beta -> 1`` tends to inverse
    frequency. Returns ``[C]`` foreground weights, mean 1 when ``normalize``.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = _check_counts(counts)
    return _finish(_per_present_class(counts, lambda n: (1.0 - beta) / (1.0 - beta ** n)),
                   normalize)


def resolve_class_weights(spec, class_names, records=None, method="effective_number", beta=0.999):
    """Turn a recipe's ``class_weights`` entry into the loss's ``1 + C`` list.

    ``spec`` may be:
      * ``None``: no weighting; returns ``None`` (the loss then weights nothing);
      * a list of ``C`` foreground weights (background gets 1) or of ``1 + C``
        weights, background first;
      * a dict by class name (``"background"`` allowed); missing classes get 1;
      * ``"auto"`` (uses ``method``), ``"inverse_frequency"`` or
        ``"effective_number"``: computed from ``records`` (the training set).
    """
    num_classes = len(class_names)
    if spec is None:
        return None
    if isinstance(spec, str):
        name = method if spec == "auto" else spec
        if name not in METHODS:
            raise ValueError(f"unknown class_weights {spec!r}: use None, a list, a dict, "
                             f"'auto' or one of {METHODS}")
        if records is None:
            raise ValueError(f"class_weights={spec!r} needs the training records to count classes")
        counts = class_counts(records, num_classes)
        if name == "inverse_frequency":
            foreground = inverse_frequency_weights(counts)
        else:
            foreground = effective_number_weights(counts, beta=beta)
        return [1.0] + foreground.tolist()
    return class_weight_vector(spec, class_names)


def class_weight_vector(spec, class_names=None, num_classes=None):
    """A list / dict-by-name ``class_weights`` as the ``1 + C`` list (background first).

    ``None`` stays ``None``. A list of ``C`` values gets background weight 1; a
    dict needs ``class_names`` and gives missing names weight 1. Without
    ``num_classes`` or ``class_names`` a list is returned as is.
    """
    if spec is None:
        return None
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    if isinstance(spec, dict):
        if class_names is None:
            raise ValueError("class_weights given by name needs class_names")
        unknown = set(spec) - set(class_names) - {BACKGROUND}
        if unknown:
            raise ValueError(f"class_weights names {sorted(unknown)} not in class_names {list(class_names)}")
        weights = [float(spec.get(BACKGROUND, 1.0))] + [float(spec.get(n, 1.0)) for n in class_names]
    else:
        weights = [float(w) for w in np.asarray(spec, dtype=np.float64).reshape(-1)]
        if num_classes is not None and len(weights) == num_classes:
            weights = [1.0] + weights
        elif num_classes is not None and len(weights) != num_classes + 1:
            raise ValueError(f"class_weights has {len(weights)} values; expected {num_classes} "
                             f"(foreground) or {num_classes + 1} (background first)")
    bad = [w for w in weights if not np.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"class_weights must be finite and >= 0, got {weights}")
    return weights


def format_class_weights(weights, class_names, counts=None, title="class weights"):
    """A printable table: class, object count (if given), weight."""
    if weights is None:
        return f"{title}: none (all classes weighted 1)"
    names = [BACKGROUND] + list(class_names)
    if len(weights) != len(names):
        raise ValueError(f"expected {len(names)} weights (background first), got {len(weights)}")
    width = max(len(n) for n in names + ["class"])
    lines = [title, f"  {'class':<{width}}  {'objects':>8}  {'weight':>8}"]
    for i, (name, weight) in enumerate(zip(names, weights)):
        count = "-" if counts is None or i == 0 else str(int(counts[i - 1]))
        lines.append(f"  {name:<{width}}  {count:>8}  {weight:>8.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------- helpers
def _check_counts(counts):
    counts = np.asarray(counts, np.float64).reshape(-1)
    if counts.size == 0 or np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError(f"counts must be a non-empty list of non-negative numbers, got {counts}")
    return counts


def _per_present_class(counts, weight_fn):
    """Apply ``weight_fn`` to present classes; absent ones get the rarest class's weight."""
    present = counts > 0
    if not present.any():
        return np.ones_like(counts)
    weights = np.empty_like(counts)
    weights[present] = weight_fn(counts[present])
    weights[~present] = weights[present].max()
    return weights


def _finish(weights, normalize):
    return weights / weights.mean() if normalize else weights
