"""How well SSD default boxes (anchors) cover a dataset's boxes, and fitting them.

Host-side numpy analysis (not model code). Boxes are taken from ``Record``s and
normalised by each image's size: a plain resize to the model input leaves
normalised coordinates unchanged, so they are the boxes the model is trained
on (before augmentation). Sizes for COCO's buckets (small < 32^2 <= medium <
96^2 <= large) are measured in pixels **at the model input size**.

* :func:`anchor_coverage`: for each ground truth the best IoU over all anchors;
  reports the share with best IoU >= 0.5 (those that get a positive anchor by
  the threshold rule, without SSD's forced best-anchor match) and the mean
  best IoU, overall, per class and per size bucket; with ``match_iou`` (the
  loss's positive IoU) also the mean number of positive anchors per box.
* :func:`kmeans_boxes`: k-means on box (width, height) with distance
  ``1 - IoU`` of the two boxes placed at one centre (YOLOv2), seeded and
  deterministic.
* :func:`clusters_to_ssd`: turns the clusters into SSD parameters, one scale per
  feature map (plus the extra one) and per-map aspect-ratio sets; see its doc.
* :func:`fit_anchors`: all of it, with before/after coverage computed by the
  same :func:`anchor_coverage` on the real default boxes of both set-ups.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from kdet.boxes import iou_matrix_np

SIZE_BUCKETS = ("small", "medium", "large")
COCO_SMALL, COCO_MEDIUM = 32 ** 2, 96 ** 2


# --------------------------------------------------------------- the boxes
def _hw(image_size):
    if isinstance(image_size, (int, float, np.integer)):
        return int(image_size), int(image_size)
    height, width = image_size
    return int(height), int(width)


def training_boxes(records, include_ignored=False, min_size=1.0):
    """Normalised boxes ``[N, 4]`` and class ids ``[N]`` of the records' targets.

    Ignored objects (difficult / iscrowd) are left out unless ``include_ignored``;
    degenerate boxes (width or height <= ``min_size`` original pixels) always are.
    """
    boxes, classes = [], []
    for record in records:
        b = np.asarray(record.boxes, np.float64).reshape(-1, 4)
        keep = (b[:, 2] - b[:, 0] > min_size) & (b[:, 3] - b[:, 1] > min_size)
        if not include_ignored:
            keep &= ~np.asarray(record.ignore, bool)
        scale = np.array([record.width, record.height] * 2, np.float64)
        boxes.append(b[keep] / scale)
        classes.append(np.asarray(record.classes)[keep])
    if not boxes:
        return np.zeros((0, 4)), np.zeros((0,), np.int32)
    return np.concatenate(boxes), np.concatenate(classes).astype(np.int32)


def size_buckets(boxes, image_size):
    """COCO size bucket index (0 small, 1 medium, 2 large) of normalised boxes at the input size."""
    height, width = _hw(image_size)
    area = (boxes[:, 2] - boxes[:, 0]) * width * (boxes[:, 3] - boxes[:, 1]) * height
    return np.where(area < COCO_SMALL, 0, np.where(area < COCO_MEDIUM, 1, 2))


# --------------------------------------------------------------- coverage
def anchor_matches(boxes, anchors, match_iou=0.5, chunk=256):
    """``(best [N], positives [N])`` for ``boxes [N, 4]`` against ``anchors [A, 4]`` (chunked).

    ``best`` is each box's best IoU over the anchors; ``positives`` counts the
    anchors with IoU >= ``match_iou`` (at least 1: the loss's forced best-anchor
    match). Boxes of one image compete for anchors in the loss but not here, so
    ``positives`` is an upper bound on crowded images.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    anchors = np.asarray(anchors, np.float64).reshape(-1, 4)
    best, positives = np.zeros((len(boxes),)), np.ones((len(boxes),))
    for start in range(0, len(boxes), chunk):
        iou = iou_matrix_np(boxes[start:start + chunk], anchors)
        best[start:start + chunk] = iou.max(axis=1)
        positives[start:start + chunk] = np.maximum(np.sum(iou >= match_iou, axis=1), 1)
    return best, positives


def anchor_coverage(records, anchors, image_size, class_names, iou_threshold=0.5,
                    include_ignored=False, match_iou=None):
    """Share of ground truths with a best-anchor IoU >= ``iou_threshold``, and mean best IoU.

    Returns ``dict(overall=..., per_class={name: ...}, per_size={small|medium|large: ...},
    num_anchors, iou_threshold, best_iou)`` where each entry is
    ``dict(boxes=n, covered=share or None, mean_best_iou=mean or None)`` and
    ``best_iou [N]`` holds every box's best IoU (numpy; drop it for JSON).
    With ``match_iou`` each entry also has ``positives_per_box`` (see
    :func:`anchor_matches`) and the dict has ``match_iou``.
    """
    boxes, classes = training_boxes(records, include_ignored=include_ignored)
    return coverage_of_boxes(boxes, classes, anchors, image_size, class_names, iou_threshold, match_iou)


def coverage_of_boxes(boxes, classes, anchors, image_size, class_names, iou_threshold=0.5, match_iou=None):
    """:func:`anchor_coverage` on already normalised ``boxes [N, 4]`` and ``classes [N]``."""
    best, positives = anchor_matches(boxes, anchors, match_iou=0.5 if match_iou is None else match_iou)
    buckets = size_buckets(boxes, image_size)

    def summary(mask):
        n = int(mask.sum())
        entry = dict(boxes=n, covered=None, mean_best_iou=None)
        if n:
            entry.update(covered=float(np.mean(best[mask] >= iou_threshold)), mean_best_iou=float(np.mean(best[mask])))
        if match_iou is not None:
            entry["positives_per_box"] = float(np.mean(positives[mask])) if n else None
        return entry

    return dict(
        overall=summary(np.ones(len(best), bool)),
        per_class={name: summary(classes == k) for k, name in enumerate(class_names)},
        per_size={name: summary(buckets == k) for k, name in enumerate(SIZE_BUCKETS)},
        num_anchors=int(len(anchors)),
        iou_threshold=float(iou_threshold),
        best_iou=best,
        **({} if match_iou is None else dict(match_iou=float(match_iou))),
    )


def format_coverage(before, after=None, title="anchor coverage"):
    """A text table of one coverage dict, or of two side by side (before / after)."""
    thr, match = before["iou_threshold"], before.get("match_iou")
    columns = [("before", before)] + ([("after", after)] if after is not None else [])
    head = f"  {'':<16}{'boxes':>7}" + "".join(
        f"  {name + f' IoU>={thr:g}':>16}{name + ' mean IoU':>16}"
        + (f"{name + f' pos@{match:g}':>16}" if match is not None else "") for name, _ in columns)
    anchors = ", ".join(f"{name}: {cov['num_anchors']} anchors" for name, cov in columns)
    lines = [f"{title} ({anchors})", head]
    rows = [("all", "overall", None)]
    rows += [(name, "per_class", name) for name in before["per_class"]]
    rows += [(f"{name} (size)", "per_size", name) for name in SIZE_BUCKETS]
    for label, section, key in rows:
        first = before[section] if key is None else before[section][key]
        cells = ""
        for _, cov in columns:
            entry = cov[section] if key is None else cov[section][key]
            cells += f"  {_pct(entry['covered']):>16}{_num(entry['mean_best_iou']):>16}"
            if match is not None:
                cells += f"{_num(entry['positives_per_box'], '.1f'):>16}"
        lines.append(f"  {label:<16}{first['boxes']:>7}{cells}")
    return "\n".join(lines)


def _pct(value):
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


# --------------------------------------------------------------- k-means
def wh_iou(wh, centroids):
    """IoU ``[N, K]`` of boxes given as (w, h), all placed at the same centre."""
    wh = np.asarray(wh, np.float64).reshape(-1, 2)
    c = np.asarray(centroids, np.float64).reshape(-1, 2)
    inter = np.minimum(wh[:, None, 0], c[None, :, 0]) * np.minimum(wh[:, None, 1], c[None, :, 1])
    union = (wh[:, 0] * wh[:, 1])[:, None] + (c[:, 0] * c[:, 1])[None, :] - inter
    return inter / union


def kmeans_boxes(wh, k, seed=0, max_iter=300, n_init=3):
    """k-means of box sizes with distance ``1 - IoU`` (YOLOv2), deterministic for a seed.

    Initialisation is k-means++ (in 1 - IoU distance) from ``numpy.random.default_rng(seed)``;
    centroids are updated to the median (w, h) of their members; an empty
    cluster is re-seeded at the box farthest from its centroid. The best of
    ``n_init`` runs (highest mean IoU to the assigned centroid) is returned.

    Returns ``(centroids [k, 2] sorted by area, mean IoU of boxes to their centroid)``.
    """
    wh = np.asarray(wh, np.float64).reshape(-1, 2)
    if len(wh) < k:
        raise ValueError(f"k-means needs at least k={k} boxes, got {len(wh)}")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        centroids, score = _kmeans_once(wh, k, rng, max_iter)
        if best is None or score > best[1]:
            best = (centroids, score)
    centroids, score = best
    order = np.argsort(centroids[:, 0] * centroids[:, 1], kind="stable")
    return centroids[order], float(score)


def _kmeans_once(wh, k, rng, max_iter):
    centroids = _kmeans_pp(wh, k, rng)
    assign = None
    for _ in range(max_iter):
        iou = wh_iou(wh, centroids)
        new_assign = iou.argmax(axis=1)
        if assign is not None and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        for j in range(k):
            members = wh[assign == j]
            if len(members):
                centroids[j] = np.median(members, axis=0)
            else:  # re-seed at the worst-served box
                centroids[j] = wh[np.argmin(iou.max(axis=1))]
    iou = wh_iou(wh, centroids)
    return centroids, float(iou.max(axis=1).mean())


def _kmeans_pp(wh, k, rng):
    centroids = [wh[rng.integers(len(wh))]]
    for _ in range(1, k):
        distance = 1.0 - wh_iou(wh, np.array(centroids)).max(axis=1)
        weights = distance ** 2
        total = weights.sum()
        index = rng.integers(len(wh)) if total <= 0 else rng.choice(len(wh), p=weights / total)
        centroids.append(wh[index])
    return np.array(centroids, np.float64)


# --------------------------------------------------------------- clusters -> SSD
def clusters_to_ssd(centroids, default_scales, feature_map_sizes=None, merge_factor=1.5,
                    min_ratio=1.5, max_ratios=2, default_aspect_ratios=None):
    """SSD ``(scales, aspect_ratios, notes)`` from k-means centroids (normalised w, h).

    A centroid of size (w, h) is scale ``s = sqrt(w h)`` and ratio ``r = w / h``
    in SSD's box parameterisation (width ``s sqrt(r)``, height ``s / sqrt(r)``).

    1. **Clusters to maps by scale**: in ascending scale, each cluster goes to
       the map whose current (default) scale is nearest in log space; if that
       map is taken by smaller clusters, it joins them when within
       ``merge_factor`` of their smallest scale, else moves to the next map up
       (finer maps keep the smaller objects: their cell step is small).
    2. **Scales**: a map with clusters gets their geometric mean scale. Maps
       below the first such map keep the default scales times the same factor
       as the first; maps between two such maps are interpolated in log
       space; maps above the last one (and the extra ``s_{m+1}``) keep the
       defaults, raised where needed to keep the sequence increasing.
    3. **Aspect ratios**: per map with clusters, the ratios ``max(r, 1/r) >=
       min_ratio`` of its clusters (each r also gives 1/r), merged when within
       25 % of each other, at most ``max_ratios`` (the most common first),
       rounded to 0.5; an empty set is allowed (only the two square boxes).
       A map never gets more ratios than ``default_aspect_ratios`` gave it
       (but may get one where it had none), and maps without clusters keep
       theirs (default ``[2]``), so the anchor count stays at most the
       current one (when every map had at least one ratio).
    """
    centroids = np.asarray(centroids, np.float64).reshape(-1, 2)
    defaults = [float(s) for s in default_scales]
    num_maps = len(defaults) - 1
    scales_c = np.sqrt(centroids[:, 0] * centroids[:, 1])
    ratios_c = centroids[:, 0] / centroids[:, 1]
    order = np.argsort(scales_c, kind="stable")
    groups = {}   # map index -> list of cluster indices
    last_map = None
    for i in order:
        k = int(np.argmin(np.abs(np.log(np.array(defaults[:num_maps])) - np.log(scales_c[i]))))
        if last_map is not None and k <= last_map:
            smallest = scales_c[groups[last_map][0]]
            if scales_c[i] <= smallest * merge_factor or last_map == num_maps - 1:
                groups[last_map].append(i)
                continue
            k = last_map + 1
        groups[k] = [i]
        last_map = k

    known = {k: float(np.exp(np.mean(np.log(scales_c[idx])))) for k, idx in groups.items()}
    scales = _fill_scales(known, defaults)
    if default_aspect_ratios is None:
        default_aspect_ratios = [[2.0]] * num_maps
    aspect_ratios = []
    for k in range(num_maps):
        if k in groups:   # no more ratios than the map had (at least one allowed)
            limit = min(max_ratios, max(1, len(default_aspect_ratios[k])))
            aspect_ratios.append(_ratio_set(ratios_c[groups[k]], min_ratio, limit))
        else:
            aspect_ratios.append([float(r) for r in default_aspect_ratios[k]])
    notes = _stride_notes(scales_c, groups, feature_map_sizes)
    return scales, aspect_ratios, notes


def _fill_scales(known, defaults):
    num_maps = len(defaults) - 1
    keys = sorted(known)
    scales = list(defaults)
    first, last = keys[0], keys[-1]
    for k in range(first):
        scales[k] = defaults[k] * known[first] / defaults[first]
    for a, b in zip(keys, keys[1:]):
        for k in range(a, b + 1):
            t = (k - a) / (b - a)
            scales[k] = math.exp((1 - t) * math.log(known[a]) + t * math.log(known[b]))
    scales[last] = known[last]
    for k in range(last + 1, num_maps + 1):   # defaults above the data, kept increasing
        scales[k] = max(defaults[k], scales[k - 1] * 1.1)
    return [round(s, 4) for s in scales]


def _ratio_set(ratios, min_ratio, max_ratios):
    folded = sorted((max(r, 1 / r) for r in ratios if max(r, 1 / r) >= min_ratio))
    merged = []   # [representative, members]
    for r in folded:
        if merged and r <= merged[-1][0] * 1.25:
            merged[-1][1].append(r)
        else:
            merged.append([r, [r]])
    merged.sort(key=lambda m: -len(m[1]))
    chosen = sorted({max(1.5, round(2 * float(np.mean(m[1]))) / 2) for m in merged[:max_ratios]})
    return chosen


def _stride_notes(scales_c, groups, feature_map_sizes):
    """Warn about clusters smaller than their map's cell step (coverage suffers)."""
    if feature_map_sizes is None:
        return []
    notes = []
    for k, idx in groups.items():
        size = feature_map_sizes[k]
        cells = min(size) if isinstance(size, (tuple, list)) else size
        step = 1.0 / cells
        small = [float(scales_c[i]) for i in idx if scales_c[i] < step]
        if small:
            notes.append(f"clusters of scale {', '.join(f'{s:.3f}' for s in small)} are smaller than "
                         f"the cell step {step:.3f} of map {k} ({size}); anchors cannot centre on "
                         f"them well: use a larger input size or a finer first feature map")
    return notes


# --------------------------------------------------------------- the whole fit
@dataclass
class AnchorFit:
    """Result of :func:`fit_anchors`."""

    centroids: np.ndarray            # [k, 2] normalised (w, h), by area
    cluster_iou: float               # mean IoU of boxes to their centroid
    scales: list
    aspect_ratios: list
    before: dict
    after: dict
    notes: list = field(default_factory=list)

    def snippet(self):
        return recipe_snippet(self.scales, self.aspect_ratios)

    def to_text(self):
        lines = [f"k-means on box sizes: {len(self.centroids)} clusters, mean IoU to centroid "
                 f"{self.cluster_iou:.3f}",
                 "  clusters (w, h normalised; scale sqrt(wh), ratio w/h):"]
        for w, h in self.centroids:
            lines.append(f"    w {w:.4f}  h {h:.4f}  scale {math.sqrt(w * h):.4f}  ratio {w / h:.2f}")
        lines += ["", format_coverage(self.before, self.after), ""]
        lines += [f"note: {n}" for n in self.notes]
        lines += ["paste into the recipe:", self.snippet()]
        return "\n".join(lines)


def recipe_snippet(scales, aspect_ratios):
    """The proposed parameters as recipe text."""
    scale_text = ", ".join(f"{s:.4g}" for s in scales)
    ratio_text = ", ".join("[" + ", ".join(f"{r:g}" for r in rs) + "]" for rs in aspect_ratios)
    return f"model=dict(anchor_scales=[{scale_text}], aspect_ratios=[{ratio_text}])"


def fit_anchors(records, image_size, feature_map_sizes, scales, aspect_ratios, class_names,
                k=None, seed=0, clip=True, anchor_fn=None, match_iou=None, **ssd_options):
    """k-means on the records' boxes -> SSD scales/ratios, with before/after coverage.

    ``scales`` (``len(feature_map_sizes) + 1`` values) and ``aspect_ratios``
    are the current set-up (the "before"). ``k`` defaults to the number of
    feature maps. ``anchor_fn(feature_map_sizes, scales, aspect_ratios, clip=)``
    builds the default boxes; default ``kdet.models.anchors.default_boxes``.
    ``match_iou``: the loss's positive IoU, for the positives-per-box column.
    """
    if anchor_fn is None:
        from kdet.models.anchors import default_boxes as anchor_fn
    boxes, classes = training_boxes(records)
    if len(boxes) == 0:
        raise ValueError("no (non-degenerate, non-ignored) boxes in the records to fit anchors to")
    k = k or len(feature_map_sizes)
    wh = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
    centroids, cluster_iou = kmeans_boxes(wh, k, seed=seed)
    new_scales, new_ratios, notes = clusters_to_ssd(
        centroids, scales, feature_map_sizes, default_aspect_ratios=aspect_ratios, **ssd_options)
    before = coverage_of_boxes(boxes, classes, anchor_fn(feature_map_sizes, scales, aspect_ratios, clip=clip),
                               image_size, class_names, match_iou=match_iou)
    after = coverage_of_boxes(boxes, classes,
                              anchor_fn(feature_map_sizes, new_scales, new_ratios, clip=clip),
                              image_size, class_names, match_iou=match_iou)
    if after["overall"]["covered"] < before["overall"]["covered"]:
        notes.append("the fitted anchors cover fewer boxes than the current ones: keep the current set-up")
    return AnchorFit(centroids=centroids, cluster_iou=cluster_iou, scales=new_scales,
                     aspect_ratios=new_ratios, before=before, after=after, notes=notes)


# --------------------------------------------------------------- a recipe's anchors, and "auto"
@dataclass
class AnchorSetup:
    """The default boxes a recipe's SSD uses, and what built them."""

    image_size: object
    feature_map_sizes: list
    scales: list
    aspect_ratios: list
    clip: bool = True
    steps: object = None

    def boxes(self, scales=None, aspect_ratios=None):
        from kdet.models.anchors import default_boxes

        return default_boxes(self.feature_map_sizes, self.scales if scales is None else scales,
                             self.aspect_ratios if aspect_ratios is None else aspect_ratios,
                             clip=self.clip, steps=self.steps)


def model_anchor_setup(model_cfg, num_classes):
    """:class:`AnchorSetup` of a recipe's ``model`` section, by building its SSD without weights.

    ``"auto"`` entries are read as ``None`` (the defaults): what "auto" starts from.
    """
    import inspect

    from kdet.models.ssd import SSD

    accepted = inspect.signature(SSD.__init__).parameters
    kwargs = {k: (None if v == "auto" else v) for k, v in model_cfg.items() if k in accepted}
    kwargs.update(num_classes=num_classes, backbone_weights=None)   # never download for this
    try:
        model = SSD(**kwargs)
    except (TypeError, ValueError) as err:  # the first build of a training run: one line naming the section
        from kdet.config import bad_model_section

        raise bad_model_section(err) from err
    layer = model.get_layer("anchors")
    setup = AnchorSetup(model_cfg.get("image_size", 300), list(model.feature_map_sizes),
                        [float(s) for s in layer.scales], [[float(r) for r in rs] for rs in layer.aspect_ratios],
                        layer.clip, layer.steps)
    return setup


def wants_auto_anchors(model_cfg):
    return model_cfg.get("anchor_scales") == "auto" or model_cfg.get("aspect_ratios") == "auto"


def resolve_auto_anchors(recipe, class_names, train_records, seed=0):
    """``(recipe, text)``: ``model.anchor_scales`` / ``model.aspect_ratios`` = ``"auto"`` fitted to the boxes.

    The k-means fit of :func:`fit_anchors` on the training records; only the
    entries set to ``"auto"`` are replaced (the other keeps the recipe's value).
    The returned recipe holds plain numbers, so the SSD built from it stores
    them in its config (``.keras`` reload and export reuse them). When the fit
    would cover fewer boxes than the defaults, the defaults are kept (said in
    ``text``). A recipe without ``"auto"`` is returned unchanged, ``text`` None.
    """
    import copy

    model_cfg = recipe["model"]
    if not wants_auto_anchors(model_cfg):
        return recipe, None
    setup = model_anchor_setup(model_cfg, len(class_names))
    match_iou = float(recipe.get("loss", {}).get("iou_threshold", 0.5))
    boxes, classes = training_boxes(train_records)
    fitted_scales, fitted_ratios, centroids = fit_ssd_parameters(boxes, setup, seed=seed)
    scales = fitted_scales if model_cfg.get("anchor_scales") == "auto" else setup.scales
    ratios = fitted_ratios if model_cfg.get("aspect_ratios") == "auto" else setup.aspect_ratios
    before = coverage_of_boxes(boxes, classes, setup.boxes(), setup.image_size, class_names,
                               iou_threshold=match_iou, match_iou=match_iou)
    after = coverage_of_boxes(boxes, classes, setup.boxes(scales, ratios), setup.image_size, class_names,
                              iou_threshold=match_iou, match_iou=match_iou)
    kept_defaults = after["overall"]["covered"] < before["overall"]["covered"]
    if kept_defaults:
        scales, ratios = setup.scales, setup.aspect_ratios
    resolved = copy.deepcopy(recipe)
    resolved["model"]["anchor_scales"] = [float(s) for s in scales]
    resolved["model"]["aspect_ratios"] = [[float(r) for r in rs] for rs in ratios]
    lines = [f"anchors 'auto': k-means (1 - IoU) on {len(boxes)} training boxes, {len(centroids)} clusters",
             format_coverage(before, after, title=f"anchor coverage at the loss's matching IoU {match_iou:g}")]
    if kept_defaults:
        lines.append("the fitted anchors cover fewer boxes than the defaults: the defaults are kept")
    lines.append("using " + recipe_snippet(resolved["model"]["anchor_scales"], resolved["model"]["aspect_ratios"]))
    return resolved, "\n".join(lines)


def fit_ssd_parameters(boxes, setup, k=None, seed=0):
    """``(scales, aspect_ratios, centroids)``: :func:`kmeans_boxes` on normalised ``boxes`` turned into
    SSD parameters for ``setup`` (an :class:`AnchorSetup`) by :func:`clusters_to_ssd`."""
    if len(boxes) == 0:
        raise ValueError("no (non-degenerate, non-ignored) boxes to fit anchors to")
    k = min(k or len(setup.feature_map_sizes), len(boxes))
    wh = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
    centroids, _ = kmeans_boxes(wh, k, seed=seed)
    scales, ratios, _ = clusters_to_ssd(centroids, setup.scales, setup.feature_map_sizes,
                                        default_aspect_ratios=setup.aspect_ratios)
    return scales, ratios, centroids
