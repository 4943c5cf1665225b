"""Streaming COCO bbox matching and accumulation in ``keras.ops``: one implementation for every backend.

Functional: a state (dict of arrays) goes in, a new state comes out. ``update_state`` matches
one padded batch of ground truth and detections (IoU and pycocotools' greedy matching for all
IoU thresholds and area ranges at once) and appends one row per detection; ``state_result``
sorts the rows per category and computes precision at the 101 recall points and recall, with
pycocotools' envelope and ``searchsorted`` rule. Static shapes throughout, so each backend's
compiler takes them whole (``tf.function(jit_compile=True)``, ``jax.jit``);
`kdet.metrics.coco_device.COCOAccumulator` is the stateful wrapper that compiles them.

Semantics are those of :mod:`kdet.metrics.coco` (pycocotools, with kdet's fixes). Ties between
equal scores are broken like pycocotools when images are fed in ascending image-id order (the
order of insertion is the tie order).

How the envelope is computed without a sequential scan: position ``i`` of a category's sorted
detections is reached by recall threshold ``r`` iff ``rc[i] >= recThr[r]``, so
``q[r] = max(pr[i] : bin(i) > r)`` with ``bin(i) = #{r : recThr[r] <= rc[i]}``: one segment max
per (category, threshold, area, bin), then a suffix max over 102 bins. The recall bins are
computed in integers that reproduce pycocotools' float64 comparisons exactly in either dtype.

``dtype="float64"`` reproduces pycocotools exactly (same float operations for IoU and
precision; under JAX the caller enables x64 around the calls, see ``coco_device``);
``"float32"`` differs only through float32 IoU near a threshold and float32 precision values.
"""

from dataclasses import dataclass

import numpy as np
from keras import ops

from kdet.metrics._coco_common import DEFAULT_PARAMS, RECALL_THRESHOLDS, EvalParams

__all__ = ["StreamSpec", "initial_state", "match_batch", "append_slots", "update_state", "state_result",
           "stable_argsort"]

NONE, TP, FP = 0, 1, 2  # per-detection code for one (threshold, area range)
ROW_FIELDS = ("scores", "classes", "ranks", "codes")  # one buffer row per detection
STATE_FIELDS = ROW_FIELDS + ("num_gt", "count", "dropped")


@dataclass(frozen=True)
class StreamSpec:
    """The static shape of one evaluation: classes, buffer rows, dtype, box format, COCO params."""

    num_classes: int
    capacity: int
    dtype: str = "float64"
    box_format: str = "xyxy"
    params: EvalParams = DEFAULT_PARAMS

    def __post_init__(self):
        if self.box_format not in ("xyxy", "xywh"):
            raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {self.box_format!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @property
    def num_thresholds(self):
        return len(self.params.iou_thresholds)

    @property
    def num_areas(self):
        return len(self.params.area_ranges)

    @property
    def columns(self):
        """Codes per detection: one per (IoU threshold, area range)."""
        return self.num_thresholds * self.num_areas


def initial_state(spec):
    """The empty state as numpy arrays; the buffers have one extra sink row for overflow."""
    rows = spec.capacity + 1
    return dict(scores=np.zeros([rows], spec.dtype), classes=np.full([rows], -1, np.int32),
                ranks=np.zeros([rows], np.int32), codes=np.zeros([rows, spec.columns], np.int8),
                num_gt=np.zeros([spec.num_classes, spec.num_areas], np.int32),
                count=np.zeros([], np.int32), dropped=np.zeros([], np.int32))


def stable_argsort(x, descending=False):
    """Stable argsort along the last axis (``keras.ops.argsort`` promises no stability)."""
    from keras import backend

    name = backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.argsort(x, axis=-1, direction="DESCENDING" if descending else "ASCENDING", stable=True)
    if name == "jax":
        import jax.numpy as jnp

        return jnp.argsort(x, axis=-1, stable=True, descending=descending).astype("int32")
    if name == "torch":
        import torch

        return torch.argsort(x, dim=-1, stable=True, descending=descending).to(torch.int32)
    x = np.asarray(x)
    order = np.argsort(-x if descending else x, axis=-1, kind="stable")
    return order.astype(np.int32)


# ------------------------------------------------------------ update
def update_state(spec, state, gt_boxes, gt_classes, gt_crowd, gt_area, det_boxes, det_scores, det_classes,
                 gt_ignore=None):
    """The state after matching one batch and appending its rows (see `match_batch` for the arguments)."""
    rows, num_gt = match_batch(spec, gt_boxes, gt_classes, gt_crowd, gt_area, det_boxes, det_scores,
                               det_classes, gt_ignore)
    slots, lost, count = append_slots(spec, state["count"], rows["classes"])
    new = {k: ops.scatter_update(state[k], slots[:, None], rows[k]) for k in ROW_FIELDS}
    new.update(num_gt=state["num_gt"] + num_gt, count=count, dropped=state["dropped"] + lost)
    return new


def append_slots(spec, count, classes):
    """Buffer rows for ``n`` new rows: ``slots [n]`` (overflow -> the sink row), detections lost, new count."""
    n = ops.shape(classes)[0]
    slots = ops.cast(count, "int32") + ops.arange(n, dtype="int32")
    fits = slots < spec.capacity
    lost = ops.cast(ops.sum(ops.cast(ops.logical_not(fits) & (classes >= 0), "int32")), "int32")
    new_count = ops.cast(ops.minimum(ops.cast(count, "int32") + n, spec.capacity), "int32")
    return ops.cast(ops.where(fits, slots, spec.capacity), "int32"), lost, new_count


def match_batch(spec, gt_boxes, gt_classes, gt_crowd, gt_area, det_boxes, det_scores, det_classes, gt_ignore=None):
    """Match one batch: its buffer rows and its ground-truth counts.

    gt_boxes [B,G,4], gt_classes [B,G] (-1 = padding), gt_crowd [B,G] (COCO iscrowd: ignored,
    IoU over the detection's area, matchable many times), gt_area [B,G] (decides the area range),
    det_boxes [B,D,4], det_scores [B,D], det_classes [B,D] (-1 = padding); optional gt_ignore
    [B,G] (e.g. VOC difficult: ignored like a non-crowd COCO ground truth outside the area range,
    matchable once). Boxes in ``spec.box_format``, in pixels (the area ranges are in pixels).

    Returns ``{"scores", "classes", "ranks": [B*D], "codes": [B*D, T*A] int8}`` and
    ``num_gt [K, A]`` (non-ignored ground truths per class and area range).
    """
    f, params = spec.dtype, spec.params
    gt_xywh = _to_xywh(ops.cast(gt_boxes, f), spec.box_format)
    det_xywh = _to_xywh(ops.cast(det_boxes, f), spec.box_format)
    gt_classes, det_classes = ops.cast(gt_classes, "int32"), ops.cast(det_classes, "int32")
    det_scores = ops.cast(det_scores, f)
    gt_valid = gt_classes >= 0

    # detections by descending score, stable: per category this is pycocotools' order
    order = stable_argsort(ops.where(det_classes >= 0, det_scores, -np.inf), descending=True)
    det_xywh = ops.take_along_axis(det_xywh, order[:, :, None], axis=1)
    det_scores = ops.take_along_axis(det_scores, order, axis=1)
    det_classes = ops.take_along_axis(det_classes, order, axis=1)
    rank = _rank_within_class(det_classes)
    det_ok = (det_classes >= 0) & (rank < params.max_dets[-1])  # the best max_dets[-1] per class

    gt_crowd = ops.cast(gt_crowd, "bool") & gt_valid
    flagged = gt_crowd if gt_ignore is None else gt_crowd | ops.cast(gt_ignore, "bool")
    gt_ignored = flagged[:, None, :] | _outside_areas(ops.cast(gt_area, f), params, f)      # [B,A,G]
    det_outside = _outside_areas(det_xywh[..., 2] * det_xywh[..., 3], params, f)           # [B,A,D]
    same_class = (det_classes[:, :, None] == gt_classes[:, None, :]) & gt_valid[:, None, :] & det_ok[:, :, None]
    ious = ops.where(same_class, _iou_xywh(det_xywh, gt_xywh, gt_crowd), -1.0)

    matched, matched_ignored = _greedy_match(ious, gt_crowd, gt_ignored, params.thresholds, f)  # [B,D,T,A]
    outside = ops.transpose(det_outside, [0, 2, 1])[:, :, None, :]
    det_ignored = matched_ignored | (ops.logical_not(matched) & outside)
    kept = ops.logical_not(det_ignored) & det_ok[:, :, None, None]
    code = ops.where(kept, ops.where(matched, TP, FP), NONE)

    rows = {"scores": ops.reshape(det_scores, [-1]),
            "classes": ops.reshape(ops.where(det_ok, det_classes, -1), [-1]),
            "ranks": ops.reshape(rank, [-1]),
            "codes": ops.cast(ops.reshape(code, [-1, spec.columns]), "int8")}
    return rows, _count_ground_truth(gt_classes, gt_valid, gt_ignored, spec.num_classes)


def _to_xywh(boxes, box_format):
    if box_format == "xywh":
        return boxes
    return ops.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def _count_ground_truth(gt_classes, gt_valid, gt_ignored, num_classes):
    """Non-ignored ground truths per class and area range: [K, A] int32."""
    counted = ops.cast(gt_valid[:, None, :] & ops.logical_not(gt_ignored), "int32")        # [B,A,G]
    per_row = ops.reshape(ops.transpose(counted, [0, 2, 1]), [-1, ops.shape(counted)[1]])  # [B*G,A]
    segment = ops.reshape(ops.where(gt_valid, gt_classes, num_classes), [-1])
    return ops.cast(ops.segment_sum(per_row, segment, num_segments=num_classes + 1)[:num_classes], "int32")


def _rank_within_class(classes):
    """Position of each detection among the earlier ones of its class: [B, D]."""
    index = ops.arange(ops.shape(classes)[1], dtype="int32")
    earlier = index[None, :] < index[:, None]                                 # [i, j]: j before i
    same = classes[:, :, None] == classes[:, None, :]
    return ops.cast(ops.sum(ops.cast(same & earlier[None], "int32"), axis=-1), "int32")  # int64 under x64


def _outside_areas(area, params, dtype):
    """[..., N] areas -> [..., A, N]: outside each area range (bounds inclusive)."""
    lo, hi = (ops.convert_to_tensor(bound, dtype) for bound in params.area_bounds)
    a = area[..., None, :]
    return (a < lo[:, None]) | (a > hi[:, None])


def _iou_xywh(det, gt, gt_crowd):
    """maskUtils.iou with the same float operations: [B, D, G]."""
    dx, dy, dw, dh = (det[:, :, None, i] for i in range(4))
    gx, gy, gw, gh = (gt[:, None, :, i] for i in range(4))
    w = ops.minimum(dw + dx, gw + gx) - ops.maximum(dx, gx)
    h = ops.minimum(dh + dy, gh + gy) - ops.maximum(dy, gy)
    inter = w * h
    det_area = dw * dh
    union = ops.where(gt_crowd[:, None, :], det_area, det_area + gw * gh - inter)
    overlap = (w > 0) & (h > 0)
    return ops.where(overlap, inter / ops.where(overlap, union, ops.ones_like(union)), ops.zeros_like(inter))


def _last_argmax(values, mask):
    """Last index of the masked maximum along the last axis, and whether any."""
    g = ops.arange(ops.shape(mask)[-1], dtype="int32")
    best = ops.max(ops.where(mask, values, -2.0), axis=-1, keepdims=True)
    index = ops.max(ops.where(mask & (values == best), g, -1), axis=-1)
    return index, ops.any(mask, axis=-1)


def _greedy_match(ious, gt_crowd, gt_ignored, thresholds, dtype):
    """pycocotools' greedy matching for every threshold and area range, one detection per loop step.

    ious [B,D,G] (-1 where not same class / invalid), detections in score order; gt_crowd [B,G];
    gt_ignored [B,A,G]. Returns matched, matched_ignored [B,D,T,A].
    """
    batch, num_dets, num_gt = ops.shape(ious)
    shape = [batch, len(thresholds), ops.shape(gt_ignored)[1], num_gt]                    # [B,T,A,G]
    thr = ops.convert_to_tensor(thresholds, dtype)[None, :, None, None]
    crowd = gt_crowd[:, None, None, :]
    ignored = gt_ignored[:, None, :, :]
    g_index = ops.arange(num_gt, dtype="int32")

    per_det = ops.transpose(ious, [1, 0, 2])                                               # [D,B,G]

    def step(d, carry):
        taken, matched, matched_ignored = carry
        iou = ops.broadcast_to(ops.take(per_det, d, axis=0)[:, None, None, :], shape)
        candidate = (iou >= thr) & (crowd | ops.logical_not(taken))
        m_regular, has_regular = _last_argmax(iou, candidate & ops.logical_not(ignored))
        m_ignored, has_ignored = _last_argmax(iou, candidate & ignored)
        has = has_regular | has_ignored
        m = ops.where(has_regular, m_regular, m_ignored)
        taken = taken | (has[..., None] & (g_index == m[..., None]))
        row = ops.reshape(ops.cast(d, "int32"), [1, 1])
        matched = ops.scatter_update(matched, row, has[None])
        matched_ignored = ops.scatter_update(matched_ignored, row, (has_ignored & ops.logical_not(has_regular))[None])
        return taken, matched, matched_ignored

    # a scan would be natural, but keras.ops.scan under TensorFlow wants each step's output shaped as the carry
    outputs = ops.zeros([num_dets] + shape[:3], "bool")                                   # [D,B,T,A]
    _, matched, matched_ignored = ops.fori_loop(0, num_dets, step, (ops.zeros(shape, "bool"), outputs, outputs))
    return ops.transpose(matched, [1, 0, 2, 3]), ops.transpose(matched_ignored, [1, 0, 2, 3])


# ------------------------------------------------------------ result
def state_result(spec, state):
    """``precision [T,R,K,A,M]`` and ``recall [T,K,A,M]`` (-1 where a category has no ground truth)."""
    f, K, cap = spec.dtype, spec.num_classes, spec.capacity
    T, A, M, R = spec.num_thresholds, spec.num_areas, len(spec.params.max_dets), len(RECALL_THRESHOLDS)
    cls, rank, codes, num_gt = _rows_by_class_and_score(state, cap, K)
    valid = cls >= 0
    safe_cls = ops.maximum(cls, 0)
    # columns (m, t, a): a detection counts for maxDets m when its rank is below it
    kept = ops.cast(rank[:, None] < ops.convert_to_tensor(spec.params.max_dets, "int32")[None, :], "int32")
    cols = M * T * A
    is_tp = ops.reshape(kept[:, :, None] * ops.cast(codes == TP, "int32")[:, None, :], [-1, cols])
    is_fp = ops.reshape(kept[:, :, None] * ops.cast(codes == FP, "int32")[:, None, :], [-1, cols])
    npig_row = ops.tile(ops.take(ops.maximum(num_gt, 1), safe_cls, axis=0), [1, M * T])   # [N,cols]
    class_size = ops.segment_sum(ops.cast(valid, "int32"), safe_cls, num_segments=K)
    class_start = ops.take(ops.cumsum(class_size) - class_size, safe_cls, axis=0)
    num_gt_f = ops.cast(num_gt, f)

    tp_count = _cumsum_within(is_tp, class_start)
    fp_count = _cumsum_within(is_fp, class_start)
    tp_f, fp_f = ops.cast(tp_count, f), ops.cast(fp_count, f)
    pr = tp_f / (fp_f + tp_f + ops.convert_to_tensor(np.spacing(1), f))
    segment = (safe_cls[:, None] * cols + ops.arange(cols, dtype="int32")[None, :]) * (R + 1)
    segment = segment + _recall_bin(tp_count, npig_row)
    sink = K * cols * (R + 1)
    segment = ops.where(valid[:, None], segment, sink)
    best = ops.segment_max(ops.reshape(pr, [-1]), ops.reshape(segment, [-1]), num_segments=sink + 1)
    best = ops.maximum(ops.reshape(best[:sink], [K, M, T, A, R + 1]), 0.0)
    q = _suffix_max(best[..., 1:])                                                       # [K,M,T,A,R]
    tp_total = ops.reshape(ops.cast(ops.segment_sum(is_tp, safe_cls, num_segments=K), f), [K, M, T, A])
    present = (num_gt > 0)[:, None, None, :]                                             # [K,1,1,A]
    # "+ 0 * tp_total": a full-shape divisor; XLA turns a division by a broadcast into a product
    # with its reciprocal (1 ulp off pycocotools' tp / npig)
    divisor = ops.maximum(num_gt_f, 1.0)[:, None, None, :] + 0.0 * tp_total
    recall = ops.where(present, tp_total / divisor, -1.0)
    precision = ops.where(present[..., None], q, -1.0)
    return ops.transpose(precision, [2, 4, 0, 3, 1]), ops.transpose(recall, [2, 0, 3, 1])


def _rows_by_class_and_score(state, capacity, num_classes):
    """Rows in (class ascending, score descending, insertion order), stable: classes, ranks, codes, num_gt."""
    classes = ops.convert_to_tensor(state["classes"])[:capacity]
    valid = classes >= 0
    scores = ops.convert_to_tensor(state["scores"])[:capacity]
    by_score = stable_argsort(ops.where(valid, scores, -np.inf), descending=True)
    class_key = ops.take(ops.where(valid, classes, num_classes), by_score, axis=0)
    perm = ops.take(by_score, stable_argsort(class_key), axis=0)
    ranks = ops.convert_to_tensor(state["ranks"])[:capacity]
    codes = ops.convert_to_tensor(state["codes"])[:capacity]
    return (ops.take(classes, perm, axis=0), ops.take(ranks, perm, axis=0), ops.take(codes, perm, axis=0),
            ops.convert_to_tensor(state["num_gt"]))


def _cumsum_within(values, start):
    """Cumulative sum along axis 0 restarting at each row's class start: [N, C]."""
    total = ops.cast(ops.cumsum(values, axis=0), "int32")  # int64 under JAX's x64
    return total - ops.take(total - values, start, axis=0)


# pycocotools compares float64 tp / npig with linspace thresholds; where tp / npig equals
# r / 100 exactly, the outcome is whether float64(r / 100) >= linspace[r] (a constant per r)
_EQUAL_REACHES = np.array([r / 100.0 >= t for r, t in enumerate(RECALL_THRESHOLDS)], np.int32)


def _recall_bin(tp, npig):
    """``#{r : recThr[r] <= tp / npig}`` as pycocotools' float64 comparisons, in integers (any dtype).

    ``r < 100 tp / npig`` strictly for ``ceil(100 tp / npig)`` values of r; on exact equality
    ``r = 100 tp / npig`` the float64 outcome is ``_EQUAL_REACHES[r]``.
    """
    n = len(RECALL_THRESHOLDS)
    scaled = (n - 1) * tp
    quotient = ops.floor_divide(scaled, npig)
    below = ops.minimum(ops.floor_divide(scaled + npig - 1, npig), n)
    exact = (ops.mod(scaled, npig) == 0) & (quotient < n)
    equal_reaches = ops.take(ops.convert_to_tensor(_EQUAL_REACHES), ops.minimum(quotient, n - 1), axis=0)
    return below + ops.where(exact, equal_reaches, 0)


def _suffix_max(x):
    """``out[..., r] = max(x[..., r:])`` by doubling (x >= 0)."""
    n = x.shape[-1]
    shift = 1
    while shift < n:
        x = ops.maximum(x, ops.concatenate([x[..., shift:], ops.zeros_like(x[..., :shift])], axis=-1))
        shift *= 2
    return x
