"""Decoding raw SSD predictions into detections, with per-class NMS.

``keras.ops`` only, static shapes throughout: the whole of
:func:`decode_detections` compiles under XLA (``jit_compile=True``) and runs on
the TensorFlow and JAX backends. Layouts follow docs/CONVENTIONS.md.
"""

from keras import ops

from kdet.boxes import iou_matrix
from kdet.defaults import NMS_DEFAULTS
from kdet.matching import DEFAULT_VARIANCES, decode_boxes


def decode_detections(
    y_pred,
    score_threshold: float = NMS_DEFAULTS["score_threshold"],
    iou_threshold: float = NMS_DEFAULTS["iou_threshold"],
    max_detections: int = NMS_DEFAULTS["max_detections"],
    pre_nms_top_k: int = NMS_DEFAULTS["pre_nms_top_k"],
    class_agnostic: bool = NMS_DEFAULTS["class_agnostic"],
    per_class_top_k: bool = NMS_DEFAULTS["per_class_top_k"],
    variances=DEFAULT_VARIANCES,
    score_activation: str = "softmax",
) -> dict:
    """Raw predictions ``[B, A, 4 + (1 + C) + 4]`` -> padded detections.

    1. Boxes are decoded from the offsets and anchors and clipped to ``[0, 1]``;
       class scores are the softmax over the logits without the background
       (``score_activation="sigmoid"``: the sigmoid of each class logit, the
       background logit unused, for models trained with a sigmoid class loss).
    2. Candidates are (anchor, class) pairs with score ``> score_threshold``:
       by default the ``pre_nms_top_k`` best pairs **over all classes** of an
       image; with ``per_class_top_k=True`` the ``pre_nms_top_k`` best pairs
       **of each class** (torchvision's rule; costs ``C`` times more memory).
    3. Greedy NMS at ``iou_threshold`` among candidates of the same class (any
       class if ``class_agnostic``).
    4. The ``max_detections`` highest-scoring survivors, sorted by score.

    Args:
        y_pred: the SSD model's raw output ``[B, A, 4 + (1 + C) + 4]`` (docs/CONVENTIONS.md).
        score_threshold, iou_threshold, max_detections, pre_nms_top_k, class_agnostic,
            per_class_top_k: as above; defaults ``kdet.defaults.NMS_DEFAULTS`` (a recipe's
            ``eval`` section sets them all).
        variances: the box-offset variances of the encoding (SSD's 0.1, 0.2).
        score_activation: ``"softmax"`` or ``"sigmoid"``, the model's (``SSD.score_activation``).

    Returns:
        a dict ``boxes [B, K, 4]`` (normalised xyxy), ``scores [B, K]``,
        ``classes [B, K]`` int32 (0-based) and ``num_detections [B]`` int32, with
        ``K = max_detections``; rows past ``num_detections`` hold score 0, class -1
        and a zero box.

    Example:
        Two anchors, one class: zero offsets decode to the anchors themselves, and only
        the first anchor scores its class.

        >>> import numpy as np
        >>> offsets = np.zeros((1, 2, 4))
        >>> logits = np.array([[[0.0, 5.0], [5.0, 0.0]]])             # background first
        >>> anchors = np.array([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
        >>> y_pred = np.concatenate([offsets, logits, anchors], axis=-1).astype("float32")
        >>> out = decode_detections(y_pred, max_detections=3)
        >>> int(out["num_detections"][0]), np.round(np.asarray(out["boxes"][0, 0]), 3).tolist()
        (1, [0.0, 0.0, 0.5, 0.5])
        >>> round(float(out["scores"][0, 0]), 4), np.asarray(out["classes"][0]).tolist()
        (0.9933, [0, -1, -1])
    """
    y_pred = ops.cast(y_pred, "float32")
    num_logits = y_pred.shape[-1] - 8
    num_classes = num_logits - 1
    num_anchors = y_pred.shape[1]
    if num_classes < 1 or num_anchors is None:
        raise ValueError(
            f"decode_detections: y_pred of shape {tuple(y_pred.shape)} is not [B, A, 4 + (1 + C) + 4] "
            "with a static anchor count and C >= 1."
        )
    offsets, logits, anchors = y_pred[..., :4], y_pred[..., 4:4 + num_logits], y_pred[..., 4 + num_logits:]
    boxes = ops.clip(decode_boxes(offsets, anchors, variances), 0.0, 1.0)  # [B, A, 4]
    scores = _class_scores(logits, score_activation)  # [B, A, C]

    if per_class_top_k:
        if class_agnostic:
            raise ValueError("decode_detections: class_agnostic NMS needs per_class_top_k=False.")
        k = min(pre_nms_top_k, num_anchors)
        cand_scores, cand_anchor = ops.top_k(ops.transpose(scores, (0, 2, 1)), k)  # [B, C, k]
        cand_classes = ops.zeros_like(cand_anchor) + ops.arange(num_classes, dtype="int32")[:, None]
        cand_boxes = _gather_boxes(boxes, ops.reshape(cand_anchor, (-1, num_classes * k)))
        cand_boxes = ops.reshape(cand_boxes, (-1, num_classes, k, 4))
        # Classes are already separate rows: plain NMS within each row.
        keep = _greedy_nms(cand_boxes, cand_scores > score_threshold, iou_threshold, None)
        flat = lambda x: ops.reshape(x, (-1, num_classes * k) + tuple(x.shape[3:]))
        cand_boxes, cand_scores, cand_classes, keep = map(flat, (cand_boxes, cand_scores, cand_classes, keep))
    else:
        k = min(pre_nms_top_k, num_anchors * num_classes)
        cand_scores, flat_index = ops.top_k(ops.reshape(scores, (-1, num_anchors * num_classes)), k)  # [B, k]
        cand_anchor = flat_index // num_classes
        cand_classes = ops.cast(flat_index % num_classes, "int32")
        cand_boxes = _gather_boxes(boxes, cand_anchor)
        same_class = None if class_agnostic else cand_classes[:, :, None] == cand_classes[:, None, :]
        keep = _greedy_nms(cand_boxes, cand_scores > score_threshold, iou_threshold, same_class)
    return _select_top(cand_boxes, cand_scores, cand_classes, keep, max_detections)


def count_candidates(y_pred, score_threshold=NMS_DEFAULTS["score_threshold"], score_activation="softmax",
                     per_class=False):
    """The (anchor, class) pairs of each image scoring above ``score_threshold``: what competes for
    ``pre_nms_top_k``. ``per_class=True``: the largest count of one class (``per_class_top_k``'s cap).

    Returns ``[B]`` int32. With more candidates than ``pre_nms_top_k``, the lowest-scored never reach NMS.
    """
    logits = ops.cast(y_pred, "float32")[..., 4:-4]
    above = ops.cast(_class_scores(logits, score_activation) > score_threshold, "int32")  # [B, A, C]
    return ops.max(ops.sum(above, axis=1), axis=-1) if per_class else ops.sum(above, axis=(1, 2))


def _class_scores(logits, score_activation):
    """``[..., 1 + C]`` logits (background first) -> ``[..., C]`` class scores."""
    if score_activation == "sigmoid":
        return ops.sigmoid(logits[..., 1:])
    if score_activation == "softmax":
        return ops.softmax(logits, axis=-1)[..., 1:]
    raise ValueError(f"decode_detections: score_activation must be 'softmax' or 'sigmoid', got {score_activation!r}")


def _gather_boxes(boxes, anchor_index):
    """``boxes [B, A, 4]`` at ``anchor_index [B, K]`` -> ``[B, K, 4]``."""
    index = ops.repeat(ops.expand_dims(ops.cast(anchor_index, "int32"), -1), 4, axis=-1)
    return ops.take_along_axis(boxes, index, axis=1)


def _greedy_nms(boxes, valid, iou_threshold, same_group=None):
    """Greedy NMS over the last candidate axis; candidates are sorted by score.

    ``boxes [..., K, 4]``, ``valid [..., K]`` bool, optional ``same_group
    [..., K, K]`` (only boxes of one group suppress each other). Returns the
    ``keep`` mask ``[..., K]``. Candidate ``i`` is visited in score order; if
    still kept it suppresses every later candidate with IoU ``> iou_threshold``.
    """
    num = boxes.shape[-2]
    suppresses = iou_matrix(boxes, boxes) > iou_threshold  # [..., K, K]
    later = ops.arange(num)[:, None] < ops.arange(num)[None, :]
    suppresses = ops.logical_and(suppresses, later)
    if same_group is not None:
        suppresses = ops.logical_and(suppresses, same_group)

    def visit(i, keep):
        row = ops.take(suppresses, i, axis=-2)  # [..., K]: what candidate i would suppress
        kept_i = ops.take(keep, i, axis=-1)[..., None]
        return ops.logical_and(keep, ops.logical_not(ops.logical_and(row, kept_i)))

    return ops.fori_loop(0, num, visit, valid)


def _select_top(boxes, scores, classes, keep, max_detections):
    """The ``max_detections`` best kept candidates, padded as in the conventions."""
    num = scores.shape[-1]
    if num < max_detections:  # pad so top_k can always take max_detections
        pad = max_detections - num
        boxes = ops.pad(boxes, ((0, 0), (0, pad), (0, 0)))
        scores = ops.pad(scores, ((0, 0), (0, pad)))
        classes = ops.pad(classes, ((0, 0), (0, pad)))
        keep = ops.pad(keep, ((0, 0), (0, pad)))
    ranked, index = ops.top_k(ops.where(keep, scores, -1.0), max_detections)
    valid = ranked >= 0.0
    boxes = ops.where(valid[..., None], _gather_boxes(boxes, index), 0.0)
    return {
        "boxes": boxes,
        "scores": ops.where(valid, ranked, 0.0),
        "classes": ops.where(valid, ops.take_along_axis(ops.cast(classes, "int32"), index, axis=1), -1),
        "num_detections": ops.sum(ops.cast(valid, "int32"), axis=1),
    }
