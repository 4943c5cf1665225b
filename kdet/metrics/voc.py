"""PASCAL VOC detection metrics: per-class AP, mAP, mAP50 and mAP50-95.

Host-side numpy. Inputs, in the same image order:

* ``gts``: one item per image, a ``kdet.data.records.Record`` or a dict with
  ``boxes [N, 4]`` pixel ``xyxy``, ``classes [N]`` 0-based ids and optionally
  ``difficult [N]`` bool (a Record's ``iscrowd`` objects are ignored too).
* ``dets``: one dict per image with ``boxes [K, 4]`` ``xyxy`` in the same units
  as the ground truth, ``scores [K]`` and ``classes [K]`` (rows with class
  ``-1`` are padding and dropped). ``detections_from_padded`` turns the padded
  model output of docs/CONVENTIONS.md into this list.

Matching follows the classic ``voc_eval.py`` / VOC devkit rules, per class:
detections are sorted by score (descending, stable), each takes the
ground truth of its class with the highest IoU in its image; at
``IoU >= iou_threshold`` it is a true positive if that object is unmatched, a
false positive if an earlier detection already took it (duplicates), and
neither if the object is ``difficult``. Below the threshold it is a false
positive. Difficult objects do not count as positives (recall denominator).
Equal scores keep input order (image order, then detection order), as a stable
sort in ``voc_eval.py`` would; AP can depend on that order when TPs and FPs tie.

IoU uses kdet's continuous boxes (pixel ``i`` covers ``[i, i+1)``, see
docs/CONVENTIONS.md), so areas are plain ``(x2 - x1) * (y2 - y1)``. The classic
script adds ``+1`` to widths and heights because VOC XML stores inclusive pixel
indices; ``kdet.boxes.voc_to_xyxy`` already turns those into continuous corners,
which makes the ``+1`` unnecessary (and wrong on kdet boxes). The devkit tests
``IoU >= threshold`` (``voc_eval.py`` writes ``>``; they differ only on exact ties).

Which number is which:

* **AP (per class)** is the area under the precision-recall curve after making
  precision monotone (each point takes the best precision at equal or higher
  recall). **All-point** (VOC2010+, ``use_07_metric=False``) integrates that
  envelope exactly; **11-point** (VOC2007, ``use_07_metric=True``) averages it
  at recall 0, 0.1, ..., 1.0 and reads a little higher or lower, never the same.
* **mAP** is the mean of per-class AP over classes that have ground truth.
* **mAP50** is mAP at IoU 0.5: the "PASCAL VOC metric" and the "mAP@0.5" of
  most detection tools. It rewards finding objects more than placing boxes.
* **mAP50-95** (``mAP50_95``) averages mAP over IoU 0.50, 0.55, ..., 0.95 and so
  also rewards tight boxes; it is always <= mAP50. It is the headline of YOLO
  tools and approximates **COCO AP** (``AP@[.5:.95]``), which is not identical:
  COCO samples precision at 101 recall points, matches a detection to the best
  *unmatched* ground truth, caps detections per image (100), handles
  ``iscrowd`` regions specially and averages over area ranges. Use
  ``kdet.metrics.coco`` (pycocotools semantics) for numbers comparable to papers.
"""

import numpy as np

from kdet.boxes import denormalize, iou_matrix_np

COCO_IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2))


# ------------------------------------------------------------------ inputs
def _field(item, name, default=None):
    if isinstance(item, dict):
        return item.get(name, default)
    return getattr(item, name, default)


def as_ground_truth(item):
    """One image's ground truth (Record or dict) -> dict of numpy arrays."""
    boxes = np.asarray(_field(item, "boxes"), np.float64).reshape(-1, 4)
    n = len(boxes)
    classes = np.asarray(_field(item, "classes"), np.int64).reshape(n)
    ignore = np.zeros(n, bool)
    for flag in ("difficult", "iscrowd"):
        values = _field(item, flag)
        if values is not None and np.size(values) == n:
            ignore |= np.asarray(values, bool).reshape(n)
    return dict(boxes=boxes, classes=classes, difficult=ignore)


def as_detections(item):
    """One image's detections dict -> numpy arrays without padding rows."""
    boxes = np.asarray(item["boxes"], np.float64).reshape(-1, 4)
    k = len(boxes)
    scores = np.asarray(item["scores"], np.float64).reshape(k)
    classes = np.asarray(item["classes"]).astype(np.int64).reshape(k)
    keep = classes >= 0
    return dict(boxes=boxes[keep], scores=scores[keep], classes=classes[keep])


def prepare_inputs(gts, dets, class_names):
    """Validate and convert ``gts`` and ``dets`` (any accepted form) to numpy dicts."""
    gts, dets = _prepare(gts, dets)
    _check_classes(gts, dets, class_names)
    return gts, dets


def _prepare(gts, dets):
    gts, dets = list(gts), list(dets)
    if len(gts) != len(dets):
        raise ValueError(f"{len(gts)} ground-truth images but {len(dets)} detection entries; "
                         "detections must be a list with one entry per image, in the same order")
    return _convert(gts, as_ground_truth, "ground truth"), _convert(dets, as_detections, "detections")


def _convert(items, convert, what):
    out = []
    for i, item in enumerate(items):
        try:
            out.append(convert(item))
        except (KeyError, TypeError, ValueError) as err:
            expected = "boxes [N, 4], classes [N]" + (", scores [N]" if what == "detections" else "")
            raise ValueError(f"{what} of image {i} is malformed ({type(err).__name__}: {err}); "
                             f"expected {expected}") from None
    return out


def detections_from_padded(detections, image_sizes=None):
    """Padded detections (docs/CONVENTIONS.md) -> list of per-image dicts.

    ``detections``: dict ``boxes [B, K, 4]`` normalised ``xyxy``, ``scores
    [B, K]``, ``classes [B, K]``, ``num_detections [B]`` (numpy or tensors),
    or a list of such dicts (batches, concatenated in order).
    ``image_sizes``: optional ``(width, height)`` per image, or Records; when
    given, boxes are scaled to pixels to match pixel ground truth.
    """
    batches = detections if isinstance(detections, (list, tuple)) else [detections]
    out = []
    for batch in batches:
        boxes = np.asarray(batch["boxes"], np.float32)
        scores = np.asarray(batch["scores"], np.float32)
        classes = np.asarray(batch["classes"]).astype(np.int32)
        counts = np.asarray(batch["num_detections"]).astype(np.int64).reshape(-1)
        for b, n in enumerate(counts):
            out.append(dict(boxes=boxes[b, :n], scores=scores[b, :n], classes=classes[b, :n]))
    if image_sizes is not None:
        sizes = list(image_sizes)
        if len(sizes) != len(out):
            raise ValueError(f"{len(sizes)} image sizes for {len(out)} images of detections")
        for det, size in zip(out, sizes):
            width, height = (size.width, size.height) if hasattr(size, "width") else size
            det["boxes"] = denormalize(det["boxes"], width, height)
    return out


# ---------------------------------------------------------------- matching
def best_overlaps(gts, dets, class_id):
    """Per class: detections sorted by score, with their best same-class GT.

    Returns ``scores, best_iou, gt_index, gt_ignored, num_positives``;
    ``gt_index`` numbers the class's objects across all images (-1: none).
    """
    scores, best_iou, gt_index, gt_ignored = [], [], [], []
    offset, num_positives = 0, 0
    for gt, det in zip(gts, dets):
        g = gt["classes"] == class_id
        d = det["classes"] == class_id
        g_boxes, g_ignore = gt["boxes"][g], gt["difficult"][g]
        num_positives += int((~g_ignore).sum())
        if d.any():
            scores.append(det["scores"][d])
            if len(g_boxes):
                iou = iou_matrix_np(det["boxes"][d], g_boxes)
                j = iou.argmax(axis=1)
                best_iou.append(iou[np.arange(len(j)), j])
                gt_index.append(j + offset)
                gt_ignored.append(g_ignore[j])
            else:
                k = int(d.sum())
                best_iou.append(np.zeros(k))
                gt_index.append(np.full(k, -1))
                gt_ignored.append(np.zeros(k, bool))
        offset += len(g_boxes)
    if not scores:
        empty = np.zeros(0)
        return empty, empty, empty.astype(np.int64), empty.astype(bool), num_positives
    scores = np.concatenate(scores)
    order = np.argsort(-scores, kind="stable")
    return (scores[order], np.concatenate(best_iou)[order], np.concatenate(gt_index)[order],
            np.concatenate(gt_ignored)[order], num_positives)


def voc_labels(best_iou, gt_index, gt_ignored, iou_threshold):
    """Classic VOC labels in score order: +1 TP, 0 FP, -1 ignored (difficult)."""
    hit = (best_iou >= iou_threshold) & (gt_index >= 0)
    labels = np.zeros(len(best_iou), np.int64)
    labels[hit & gt_ignored] = -1
    candidates = np.flatnonzero(hit & ~gt_ignored)
    # The first (highest-scoring) detection on an object takes it; later ones are duplicates.
    _, first = np.unique(gt_index[candidates], return_index=True)
    labels[candidates[first]] = 1
    return labels


def match_class(gts, dets, class_id, iou_threshold=0.5):
    """VOC matching of one class over a data set (inputs already prepared).

    Returns dict ``scores`` (descending), ``tp`` bool, ``num_positives``;
    detections on difficult objects are left out, every other row not ``tp``
    is a false positive.
    """
    return _match_class_at(gts, dets, class_id, [iou_threshold])[0]


def _match_class_at(gts, dets, class_id, iou_thresholds):
    """``match_class`` at several IoU thresholds, computing overlaps once."""
    scores, best_iou, gt_index, gt_ignored, npos = best_overlaps(gts, dets, class_id)
    matches = []
    for t in iou_thresholds:
        labels = voc_labels(best_iou, gt_index, gt_ignored, t)
        keep = labels >= 0
        matches.append(dict(scores=scores[keep], tp=labels[keep] == 1, num_positives=npos))
    return matches


def precision_recall(match):
    """Cumulative ``precision, recall`` along the score-sorted detections."""
    tp = np.cumsum(match["tp"], dtype=np.float64)
    fp = np.cumsum(~match["tp"], dtype=np.float64)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    recall = tp / match["num_positives"] if match["num_positives"] else np.full_like(tp, np.nan)
    return precision, recall


# ----------------------------------------------------------------------- AP
def average_precision(recall, precision, use_07_metric=False):
    """AP from a PR curve: VOC2007 11-point or VOC2010+ all-point area."""
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if use_07_metric:
        # k / 10 rounds like tp / npos, so a recall of exactly 0.3 reaches t = 0.3.
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.arange(11) / 10]))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def class_ap(match, use_07_metric=False):
    """AP of one class's ``match_class`` result (NaN when it has no positives)."""
    if match["num_positives"] == 0:
        return float("nan")  # undefined without positives; left out of the mean
    precision, recall = precision_recall(match)
    return average_precision(recall, precision, use_07_metric)


def _check_classes(gts, dets, class_names):
    num_classes = len(class_names)
    for source, items in (("ground truth", gts), ("detections", dets)):
        for i, item in enumerate(items):
            bad = item["classes"][(item["classes"] < 0) | (item["classes"] >= num_classes)]
            if source == "detections":
                bad = bad[bad >= 0]
            if len(bad):
                raise ValueError(f"{source} of image {i} has class id {int(bad[0])}, "
                                 f"outside 0..{num_classes - 1} ({num_classes} class names)")


def voc_evaluate(gts, dets, class_names, iou_threshold=0.5, use_07_metric=False):
    """Per-class VOC AP and mAP at one IoU threshold.

    Returns dict ``AP`` {class name: AP, NaN if the class has no positives},
    ``mAP`` (mean over classes with positives), ``num_positives`` and
    ``num_detections`` per class, ``iou_threshold``, ``use_07_metric``.
    """
    gts, dets = prepare_inputs(gts, dets, class_names)
    ap, npos, ndet = {}, {}, {}
    for c, name in enumerate(class_names):
        match = match_class(gts, dets, c, iou_threshold)
        ap[name] = class_ap(match, use_07_metric)
        npos[name] = match["num_positives"]
        ndet[name] = int(sum((d["classes"] == c).sum() for d in dets))
    return dict(AP=ap, mAP=mean_ignoring_nan(ap.values()), num_positives=npos, num_detections=ndet,
                iou_threshold=float(iou_threshold), use_07_metric=bool(use_07_metric))


def mean_ignoring_nan(values):
    """Mean of the non-NaN values (NaN if there are none)."""
    values = np.array(list(values), np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def mAP50(gts, dets, class_names, use_07_metric=False):
    """mAP at IoU 0.5 (the PASCAL VOC metric), all-point unless ``use_07_metric``."""
    return voc_evaluate(gts, dets, class_names, 0.5, use_07_metric)["mAP"]


def mAP50_95(gts, dets, class_names, iou_thresholds=COCO_IOU_THRESHOLDS):
    """mAP averaged over IoU 0.50:0.05:0.95 (all-point AP, VOC matching)."""
    gts, dets = prepare_inputs(gts, dets, class_names)
    ap = np.empty((len(class_names), len(iou_thresholds)))
    for c in range(len(class_names)):
        for i, match in enumerate(_match_class_at(gts, dets, c, iou_thresholds)):
            ap[c, i] = class_ap(match, use_07_metric=False)
    return mean_ignoring_nan(mean_ignoring_nan(ap[:, i]) for i in range(len(iou_thresholds)))
