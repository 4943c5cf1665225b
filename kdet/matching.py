"""Box encoding and anchor matching for SSD (``keras.ops`` only).

Boxes are normalised ``xyxy`` (docs/CONVENTIONS.md). Everything is
vectorised over the batch with static shapes, so it runs under XLA and on the
TensorFlow and JAX backends.
"""

import math

from keras import ops

from kdet.boxes import cxcywh_to_xyxy, iou_matrix, xyxy_to_cxcywh

DEFAULT_VARIANCES = (0.1, 0.2)
# Largest log-scale accepted by ``decode_boxes`` (torchvision's bbox_xform_clip):
# a box can grow at most 1000/16 times its anchor, and exp() cannot overflow.
MAX_LOG_SCALE = math.log(1000.0 / 16)
_EPS = 1e-8


def encode_boxes(boxes_xyxy, anchors_xyxy, variances=DEFAULT_VARIANCES):
    """Offsets of ``boxes`` relative to ``anchors`` (SSD parameterisation).

    ``(g_c - a_c) / (a_wh * v0)`` for the centre and ``log(g_wh / a_wh) / v1``
    for the size. Shapes ``[..., 4]`` broadcast against each other. Empty
    boxes (e.g. the zeros of unmatched anchors) give large but finite offsets.
    """
    g = xyxy_to_cxcywh(boxes_xyxy)
    a = xyxy_to_cxcywh(anchors_xyxy)
    a_wh = ops.maximum(a[..., 2:], _EPS)
    g_wh = ops.maximum(g[..., 2:], _EPS)
    centre = (g[..., :2] - a[..., :2]) / (a_wh * variances[0])
    size = ops.log(g_wh / a_wh) / variances[1]
    return ops.concatenate([centre, size], axis=-1)


def decode_boxes(offsets, anchors_xyxy, variances=DEFAULT_VARIANCES):
    """Inverse of :func:`encode_boxes`: offsets ``[..., 4]`` -> ``xyxy`` boxes.

    The log-scale is clamped at ``MAX_LOG_SCALE`` before ``exp`` so untrained
    or diverging heads cannot produce ``inf`` boxes.
    """
    a = xyxy_to_cxcywh(anchors_xyxy)
    centre = a[..., :2] + offsets[..., :2] * variances[0] * a[..., 2:]
    log_scale = ops.minimum(offsets[..., 2:] * variances[1], MAX_LOG_SCALE)
    size = a[..., 2:] * ops.exp(log_scale)
    return cxcywh_to_xyxy(ops.concatenate([centre, size], axis=-1))


def match_anchors(gt_boxes, gt_classes, gt_ignore, anchors, iou_threshold=0.5, negative_iou_threshold=None):
    """Assign ground truths to anchors, for a batch at once.

    Args:
        gt_boxes: ``[B, M, 4]`` normalised ``xyxy``.
        gt_classes: ``[B, M]`` 0-based class ids, ``-1`` on padding rows.
        gt_ignore: ``[B, M]`` bool or 0/1: difficult / iscrowd objects.
        anchors: ``[B or 1, A, 4]`` normalised ``xyxy``.
        iou_threshold: IoU at which an anchor matches its best ground truth.
        negative_iou_threshold: anchors whose best IoU lies in
            ``[negative_iou_threshold, iou_threshold)`` are ignored instead of
            background (RetinaNet's 0.4..0.5 band); ``None``: no band (SSD).

    Returns:
        ``(matched_boxes [B, A, 4], matched_labels [B, A] int32)``. Labels are
        ``0`` background, ``k + 1`` for class ``k``, ``-1`` ignore (neither
        positive nor negative). ``matched_boxes`` holds the matched ground
        truth on positives and zeros elsewhere.

    The rule, in order of precedence:

    1. **Forced**: every valid (non-padding, non-ignore) ground truth claims
       the anchor it overlaps most (ties: lowest anchor index), provided that
       IoU is > 0. If two ground truths claim the same anchor the later one
       (higher row index) wins, as in ssd.pytorch's loop. Forced anchors are
       positive whatever their IoU.
    2. Every other anchor looks at its best ground truth over all non-padding
       rows (ignore rows included; ties: lowest row index). If that IoU is
       ``>= iou_threshold``: positive when the ground truth is a normal one,
       ``-1`` (ignore) when it is flagged ignore.
    3. With ``negative_iou_threshold``, the remaining anchors whose best IoU
       (over non-padding rows) is at least that are ``-1`` (ignore): they half
       cover an object, so neither "object" nor "background" is a fair target.
    4. Everything else is background. Padding rows never match anything.
    """
    gt_boxes = ops.convert_to_tensor(gt_boxes, "float32")
    anchors = ops.convert_to_tensor(anchors, "float32")
    gt_classes = ops.cast(gt_classes, "int32")
    num_gt = gt_boxes.shape[1]
    if num_gt == 0:  # no ground-truth slots at all: every anchor is background
        zeros = ops.zeros_like(anchors[..., 0]) + ops.sum(gt_boxes[..., 0], axis=1, keepdims=True)  # [B, A]
        return ops.expand_dims(zeros, -1) * ops.zeros((4,)), ops.cast(zeros, "int32")

    valid = gt_classes >= 0
    ignore = ops.logical_and(valid, ops.cast(gt_ignore, "bool"))
    claims = ops.logical_and(valid, ops.logical_not(ignore))

    # [B, A, M]; padding columns at -1 so they never win an argmax.
    iou = iou_matrix(anchors, gt_boxes)
    iou = ops.where(ops.expand_dims(valid, 1), iou, -1.0)

    # 2. best ground truth for each anchor.
    best_gt = ops.argmax(iou, axis=2)  # [B, A]
    best_iou = ops.max(iou, axis=2)
    above = best_iou >= iou_threshold
    best_is_ignore = ops.take_along_axis(ignore, best_gt, axis=1)

    # 1. forced best anchor for each claiming ground truth; the last claim wins.
    claimed = _best_anchor_pairs(iou, claims)  # [B, A, M]: ground truth m claims anchor a
    gt_index = ops.arange(ops.shape(gt_boxes)[1], dtype="int32")
    forced_gt = ops.max(ops.where(claimed, gt_index, -1), axis=2)  # [B, A]
    forced = forced_gt >= 0

    matched_gt = ops.where(forced, forced_gt, ops.cast(best_gt, "int32"))
    positive = ops.logical_or(forced, ops.logical_and(above, ops.logical_not(best_is_ignore)))
    ignored = ops.logical_and(ops.logical_not(forced), ops.logical_and(above, best_is_ignore))
    if negative_iou_threshold is not None:
        in_band = ops.logical_and(best_iou >= negative_iou_threshold, ops.logical_not(above))
        ignored = ops.logical_or(ignored, ops.logical_and(in_band, ops.logical_not(forced)))

    return _targets(gt_boxes, gt_classes, matched_gt, positive, ignored)


def atss_match(gt_boxes, gt_classes, gt_ignore, anchors, anchors_per_level, top_k=9, forced_match=False):
    """Adaptive Training Sample Selection (Zhang et al. 2020), for a batch at once.

    Same arguments and return value as :func:`match_anchors`, plus
    ``anchors_per_level``: how many of the ``A`` anchors each feature map
    holds, in order (``SSD.anchors_per_level``). Instead of one IoU threshold
    for every object, each ground truth gets its own:

    1. **Candidates**: on every level, the ``top_k`` anchors whose centres lie
       closest to the ground truth's centre (anchors sharing a centre share a
       distance, so all anchors of the k-th nearest cell are kept).
    2. **Threshold**: mean + standard deviation (``n - 1``) of the candidates'
       IoU with it; small objects, whose candidates overlap little, get a low
       threshold, large ones a high one.
    3. **Positive**: a candidate at or above the threshold whose centre lies
       inside the ground truth. An anchor positive for several ground truths
       takes the one it overlaps most (ties: lowest row index); when that one
       is flagged ignore, the anchor is ``-1`` (ignore).

    4. With ``forced_match``, a ground truth left without a positive (an object smaller than
       the anchor spacing, with no anchor centre inside it) claims the anchor it overlaps most,
       as SSD's forced match does (if that IoU is > 0); it then competes as in step 3.

    Everything else is background. Padding rows never match anything.
    """
    gt_boxes = ops.convert_to_tensor(gt_boxes, "float32")
    anchors = ops.convert_to_tensor(anchors, "float32")
    gt_classes = ops.cast(gt_classes, "int32")
    if anchors.shape[1] is not None and sum(anchors_per_level) != anchors.shape[1]:
        raise ValueError(f"atss_match: anchors_per_level {list(anchors_per_level)} sums to "
                         f"{sum(anchors_per_level)}, but there are {anchors.shape[1]} anchors")
    if gt_boxes.shape[1] == 0:
        return match_anchors(gt_boxes, gt_classes, gt_ignore, anchors)
    valid = gt_classes >= 0
    iou = iou_matrix(anchors, gt_boxes)  # [B, A, M]
    centre = xyxy_to_cxcywh(anchors)[..., :2]  # [B or 1, A, 2]
    candidate = _nearest_centres(xyxy_to_cxcywh(gt_boxes)[..., :2], centre, anchors_per_level, top_k)
    threshold = _mean_plus_std(iou, candidate)  # [B, 1, M]
    inside = _centre_inside(anchors, gt_boxes)
    positive_pair = ops.logical_and(ops.logical_and(candidate, iou >= threshold),
                                    ops.logical_and(inside, ops.expand_dims(valid, 1)))
    if forced_match:  # ground truths left without a positive claim their best anchor
        orphan = ops.logical_and(valid, ops.logical_not(ops.any(positive_pair, axis=1)))  # [B, M]
        positive_pair = ops.logical_or(positive_pair, _best_anchor_pairs(iou, orphan))

    matched_gt = ops.cast(ops.argmax(ops.where(positive_pair, iou, -1.0), axis=2), "int32")  # [B, A]
    matched = ops.any(positive_pair, axis=2)
    ignored = ops.logical_and(matched, ops.take_along_axis(ops.cast(gt_ignore, "bool"), matched_gt, axis=1))
    positive = ops.logical_and(matched, ops.logical_not(ignored))
    return _targets(gt_boxes, gt_classes, matched_gt, positive, ignored)


def _best_anchor_pairs(iou, claims):
    """``[B, A, M]`` bool: each ground truth in ``claims`` ``[B, M]`` whose best IoU is > 0 pairs with the
    anchor it overlaps most (ties: lowest anchor index); ``iou`` is ``[B, A, M]``."""
    claims = ops.logical_and(claims, ops.max(iou, axis=1) > 0)
    best_anchor = ops.cast(ops.argmax(iou, axis=1), "int32")  # [B, M]
    anchor_index = ops.arange(ops.shape(iou)[1], dtype="int32")
    return ops.logical_and(ops.expand_dims(best_anchor, 1) == anchor_index[None, :, None], ops.expand_dims(claims, 1))


def _targets(gt_boxes, gt_classes, matched_gt, positive, ignored):
    """``(boxes [B, A, 4], labels [B, A])`` from each anchor's ground-truth row and its status."""
    classes = ops.take_along_axis(gt_classes, matched_gt, axis=1)
    labels = ops.where(positive, classes + 1, ops.where(ignored, -1, 0))
    box_index = ops.repeat(ops.expand_dims(matched_gt, -1), 4, axis=-1)
    boxes = ops.take_along_axis(gt_boxes, box_index, axis=1)
    boxes = ops.where(ops.expand_dims(positive, -1), boxes, 0.0)
    return boxes, ops.cast(labels, "int32")


def _nearest_centres(gt_centre, anchor_centre, anchors_per_level, top_k):
    """``[B, A, M]`` bool: per level, the anchors at most the k-th smallest centre distance away."""
    distance = ops.sqrt(ops.sum(ops.square(anchor_centre[:, :, None, :] - gt_centre[:, None, :, :]), axis=-1))
    masks, start = [], 0
    for count in anchors_per_level:
        level = distance[:, start:start + count, :]
        k = min(int(top_k), int(count))
        nearest = -ops.top_k(-ops.transpose(level, (0, 2, 1)), k)[0]  # [B, M, k], ascending
        masks.append(level <= ops.expand_dims(nearest[..., -1], 1))
        start += count
    return ops.concatenate(masks, axis=1)


def _mean_plus_std(iou, candidate):
    """Per ground truth, mean + sample standard deviation of the candidates' IoU, ``[B, 1, M]``."""
    weight = ops.cast(candidate, "float32")
    count = ops.sum(weight, axis=1, keepdims=True)
    mean = ops.sum(iou * weight, axis=1, keepdims=True) / ops.maximum(count, 1.0)
    variance = ops.sum(ops.square(iou - mean) * weight, axis=1, keepdims=True) / ops.maximum(count - 1.0, 1.0)
    return mean + ops.sqrt(variance)


def task_aligned_match(gt_boxes, gt_classes, gt_ignore, anchors, pred_boxes, pred_scores,
                       top_k=13, alpha=1.0, beta=6.0):
    """Task-aligned assignment (TOOD, Feng et al. 2021; YOLOv8's ``TaskAlignedAssigner``).

    Same ground truth and anchors as :func:`match_anchors`, plus the model's
    current ``pred_boxes [B, A, 4]`` (decoded ``xyxy``) and ``pred_scores
    [B, A, C]`` (class probabilities); pass them through ``stop_gradient``.

    1. **Alignment** of anchor ``a`` with object ``m``: ``s^alpha * IoU^beta``,
       ``s`` the predicted score of ``m``'s class at ``a`` and ``IoU`` that of
       ``a``'s predicted box with ``m``; zero unless ``a``'s centre lies inside ``m``.
    2. **Candidates**: per object, its ``top_k`` anchors of highest alignment
       (alignment > 0).
    3. An anchor that is a candidate of several objects takes the one its
       predicted box overlaps most (TOOD's and YOLOv8's rule); when that one is
       flagged ignore, the anchor is ``-1`` (ignore), neither positive nor negative.
    4. **Soft target** of a positive: its alignment normalised per object so
       that the object's best-aligned anchor gets the object's best IoU over its
       positives (YOLOv8's ``norm_align_metric``).

    Returns ``(boxes [B, A, 4], labels [B, A], soft_target [B, A])``: boxes and
    labels as :func:`match_anchors`; ``soft_target`` is 0 off the positives.
    """
    gt_boxes = ops.convert_to_tensor(gt_boxes, "float32")
    anchors = ops.convert_to_tensor(anchors, "float32")
    pred_boxes = ops.convert_to_tensor(pred_boxes, "float32")
    pred_scores = ops.convert_to_tensor(pred_scores, "float32")
    gt_classes = ops.cast(gt_classes, "int32")
    if gt_boxes.shape[1] == 0:
        boxes, labels = match_anchors(gt_boxes, gt_classes, gt_ignore, anchors)
        return boxes, labels, ops.zeros_like(pred_boxes[..., 0])
    valid = gt_classes >= 0
    iou = iou_matrix(pred_boxes, gt_boxes)  # [B, A, M]
    allowed = ops.logical_and(_centre_inside(anchors, gt_boxes), ops.expand_dims(valid, 1))  # [B, A, M]
    gt_one_hot = ops.one_hot(ops.maximum(gt_classes, 0), pred_scores.shape[-1])  # [B, M, C]
    score = ops.einsum("bac,bmc->bam", pred_scores, gt_one_hot)  # [B, A, M]: score of m's class
    alignment = ops.where(allowed, _power(score, alpha) * _power(iou, beta), 0.0)

    k = min(int(top_k), int(alignment.shape[1]))
    kth = ops.top_k(ops.transpose(alignment, (0, 2, 1)), k)[0][..., -1]  # [B, M]
    candidate = ops.logical_and(alignment >= ops.expand_dims(kth, 1), alignment > 0)

    matched_gt = ops.cast(ops.argmax(ops.where(candidate, iou, -1.0), axis=2), "int32")  # [B, A]
    matched = ops.any(candidate, axis=2)
    ignored = ops.logical_and(matched, ops.take_along_axis(ops.cast(gt_ignore, "bool"), matched_gt, axis=1))
    positive = ops.logical_and(matched, ops.logical_not(ignored))
    boxes, labels = _targets(gt_boxes, gt_classes, matched_gt, positive, ignored)
    return boxes, labels, _normalised_alignment(alignment, iou, matched_gt, positive)


def _centre_inside(anchors, gt_boxes):
    """``[B, A, M]`` bool: anchor ``a``'s centre strictly inside object ``m`` (one coordinate at a time)."""
    cx = ops.expand_dims((anchors[..., 0] + anchors[..., 2]) / 2, -1)
    cy = ops.expand_dims((anchors[..., 1] + anchors[..., 3]) / 2, -1)
    x1, y1, x2, y2 = (ops.expand_dims(gt_boxes[..., i], 1) for i in range(4))
    return ops.logical_and(ops.logical_and(cx > x1, cx < x2), ops.logical_and(cy > y1, cy < y2))


def _power(x, exponent):
    """``x ** exponent`` for ``x >= 0``; products and square roots for the usual exponents (a CPU's pow is slow)."""
    exponent = float(exponent)
    if exponent == 0.5:
        return ops.sqrt(x)
    if exponent.is_integer() and 1 <= exponent <= 8:
        result, square, n = None, x, int(exponent)
        while n:  # exponentiation by squaring
            if n & 1:
                result = square if result is None else result * square
            n >>= 1
            if n:
                square = square * square
        return result
    return ops.power(x, exponent)


def _normalised_alignment(alignment, iou, matched_gt, positive):
    """Per positive anchor, ``alignment * max IoU / max alignment`` over its object's positives."""
    own = ops.logical_and(  # [B, A, M]: anchor a is a positive of object m
        ops.expand_dims(matched_gt, -1) == ops.arange(ops.shape(iou)[2], dtype="int32"),
        ops.expand_dims(positive, -1))
    best_alignment = ops.max(ops.where(own, alignment, 0.0), axis=1, keepdims=True)  # [B, 1, M]
    best_iou = ops.max(ops.where(own, iou, 0.0), axis=1, keepdims=True)
    normalised = alignment * best_iou / ops.maximum(best_alignment, 1e-9)
    return ops.max(ops.where(own, normalised, 0.0), axis=2)
