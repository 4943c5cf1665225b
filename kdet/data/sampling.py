"""Repeat-factor sampling: images with rare classes appear more often per epoch.

LVIS's rule (Gupta et al. 2019): with ``f_c`` the fraction of training images
that contain class ``c``, class ``c`` gets ``r_c = max(1, sqrt(t / f_c))`` and an
image the largest ``r_c`` of the classes it contains (1 when it has none).
Classes in fewer than a fraction ``t`` of the images are oversampled; the
others are left alone.

kdet turns the factors into an epoch once: each image appears ``floor(r)``
times plus once more with probability ``r - floor(r)`` (seeded), so the epoch
is a fixed list that the pipeline shuffles anew each pass. Ignored objects
(difficult / iscrowd) do not count. Loss class weights, when also set, are
computed on the repeated list: they correct what imbalance is left.
"""

import numpy as np


def image_class_fractions(records, num_classes):
    """``[C]`` fraction of images holding at least one (non-ignored) object of each class."""
    return _fractions([_present_classes(r, num_classes) for r in records], num_classes)


def repeat_factors(records, num_classes, threshold):
    """``[N]`` per-image repeat factors (>= 1) for ``records``, LVIS's rule at ``threshold``."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"repeat-factor threshold must be in (0, 1], got {threshold}")
    present = [_present_classes(r, num_classes) for r in records]
    with np.errstate(divide="ignore"):  # absent classes: inf, never used
        class_factors = np.maximum(1.0, np.sqrt(threshold / _fractions(present, num_classes)))
    return np.array([class_factors[classes].max() if classes.size else 1.0 for classes in present])


def _fractions(present_per_record, num_classes):
    if not present_per_record:
        raise ValueError("repeat-factor sampling needs at least one training record")
    holds = np.zeros((num_classes,), np.int64)
    for classes in present_per_record:
        holds[classes] += 1
    return holds / len(present_per_record)


def repeat_records(records, factors, seed=0):
    """``records`` with each one repeated ``floor(r)`` or ``ceil(r)`` times (stochastic rounding)."""
    factors = np.asarray(factors, np.float64)
    if factors.shape != (len(records),) or np.any(factors < 1.0):
        raise ValueError(f"need one repeat factor >= 1 per record ({len(records)}), got shape {factors.shape}")
    extra = np.random.default_rng(seed).random(len(records)) < factors - np.floor(factors)
    counts = np.floor(factors).astype(int) + extra
    return [record for record, count in zip(records, counts) for _ in range(count)]


def oversample_rare_classes(records, num_classes, threshold, seed=0):
    """The repeated epoch and a one-line summary of what changed."""
    factors = repeat_factors(records, num_classes, threshold)
    repeated = repeat_records(records, factors, seed)
    summary = (f"repeat-factor sampling (threshold {threshold:g}): {len(records)} -> {len(repeated)} images "
               f"per epoch; {int(np.sum(factors > 1))} images have a factor > 1 (max {factors.max():.2f})")
    return repeated, summary


def _present_classes(record, num_classes):
    classes = np.asarray(record.classes)[~np.asarray(record.ignore, bool)]
    return np.unique(classes[(classes >= 0) & (classes < num_classes)])
