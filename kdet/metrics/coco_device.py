"""Streaming COCO bbox evaluation as XLA-compilable TensorFlow graph code.

`COCOAccumulator` keeps fixed-size buffers (``tf.Variable``) of per-detection match
results. ``update`` takes one padded batch of ground truth and detections, computes
IoU and pycocotools' greedy matching for all 10 IoU thresholds and 4 area ranges
at once, and appends the results; ``result`` sorts the buffer per category and
computes precision at the 101 recall points and recall, with pycocotools' envelope
and ``searchsorted`` rule. Both compile with ``tf.function(jit_compile=True)`` and
run wherever the model runs; no ``py_function`` and no pycocotools.

Semantics are those of :mod:`kdet.metrics.coco` (pycocotools, with kdet's fixes).
Ties between equal scores are broken like pycocotools when images are fed in
ascending image-id order (the order of insertion is the tie order).

How the envelope is computed without a sequential scan: position ``i`` of a category's
sorted detections is reached by recall threshold ``r`` iff ``rc[i] >= recThr[r]``, so
``q[r] = max(pr[i] : bin(i) > r)`` with ``bin(i) = #{r : recThr[r] <= rc[i]}``: one
segment max per (category, threshold, area, bin), then a suffix max over 102 bins.

The recall bins are computed in integers that reproduce pycocotools' float64
comparisons exactly in either dtype. ``dtype="float64"`` reproduces pycocotools
exactly (same float operations for IoU and precision); ``"float32"`` (for devices
without float64) differs only through float32 IoU near a threshold and float32
precision values: measured within 5e-9 of pycocotools on a 600-image synthetic
workload (the tests require 1e-4).
"""

import numpy as np
import tensorflow as tf

from kdet.metrics._coco_common import DEFAULT_PARAMS, RECALL_THRESHOLDS

__all__ = ["COCOAccumulator", "evaluate_arrays_on_device", "padded_batches"]

_NONE, _TP, _FP = 0, 1, 2  # per-detection code for one (threshold, area range)


class COCOAccumulator(tf.Module):
    """Fixed-capacity streaming COCO matcher.

    Args:
      num_classes: number of categories (0-based class ids; -1 marks padding).
      capacity: detection rows the buffer holds (at least images x detections per image);
        rows past it are dropped and `result` raises.
      dtype: ``"float64"`` (exact) or ``"float32"``.
      box_format: ``"xyxy"`` (kdet) or ``"xywh"`` (COCO json; bit-exact with pycocotools).
      params: `kdet.metrics.coco.EvalParams` (IoU thresholds, max detections, area ranges;
        pycocotools' defaults). ``use_cats=False`` is the caller's part: give every ground
        truth and detection class 0 (and ``num_classes=1``).
    """

    def __init__(self, num_classes, capacity, dtype="float64", box_format="xyxy", name=None, params=DEFAULT_PARAMS):
        super().__init__(name=name)
        self.params = params
        if box_format not in ("xyxy", "xywh"):
            raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
        self.num_classes = int(num_classes)
        self.capacity = int(capacity)
        self.dtype = tf.as_dtype(dtype)
        self.box_format = box_format
        self.num_thresholds, self.num_areas = len(params.iou_thresholds), len(params.area_ranges)
        cols = self.num_thresholds * self.num_areas
        rows = self.capacity + 1  # the last row is a sink for overflow
        with tf.init_scope():
            self.scores = tf.Variable(tf.zeros([rows], self.dtype), trainable=False, name="scores")
            self.classes = tf.Variable(-tf.ones([rows], tf.int32), trainable=False, name="classes")
            self.ranks = tf.Variable(tf.zeros([rows], tf.int32), trainable=False, name="ranks")
            self.codes = tf.Variable(tf.zeros([rows, cols], tf.int8), trainable=False, name="codes")
            self.num_gt = tf.Variable(tf.zeros([self.num_classes, self.num_areas], tf.int32),
                                      trainable=False, name="num_gt")
            self.count = tf.Variable(0, dtype=tf.int32, trainable=False, name="count")
            self.dropped = tf.Variable(0, dtype=tf.int32, trainable=False, name="dropped")

    def reset(self):
        self.scores.assign(tf.zeros_like(self.scores))
        self.classes.assign(-tf.ones_like(self.classes))
        self.ranks.assign(tf.zeros_like(self.ranks))
        self.codes.assign(tf.zeros_like(self.codes))
        self.num_gt.assign(tf.zeros_like(self.num_gt))
        self.count.assign(0)
        self.dropped.assign(0)

    # ------------------------------------------------------------ update
    def update(self, gt_boxes, gt_classes, gt_crowd, gt_area, det_boxes, det_scores, det_classes,
               gt_ignore=None):
        """Match one batch and append it.

        gt_boxes [B,G,4], gt_classes [B,G] (-1 = padding), gt_crowd [B,G] (COCO iscrowd:
        ignored, IoU over the detection's area, matchable many times), gt_area [B,G]
        (decides the area range), det_boxes [B,D,4], det_scores [B,D], det_classes [B,D]
        (-1 = padding); optional gt_ignore [B,G] (e.g. VOC difficult: ignored like a
        non-crowd COCO ground truth outside the area range, matchable once).
        Boxes in ``box_format``, in pixels (the area ranges are in pixels).
        """
        f = self.dtype
        gt_xywh = self._to_xywh(tf.cast(gt_boxes, f))
        det_xywh = self._to_xywh(tf.cast(det_boxes, f))
        gt_classes = tf.cast(gt_classes, tf.int32)
        det_classes = tf.cast(det_classes, tf.int32)
        det_scores = tf.cast(det_scores, f)
        gt_valid = gt_classes >= 0

        # detections by descending score, stable: per category this is pycocotools' order
        key = tf.where(det_classes >= 0, det_scores, tf.constant(-np.inf, f))
        order = tf.argsort(key, direction="DESCENDING", stable=True)
        det_xywh = tf.gather(det_xywh, order, batch_dims=1)
        det_scores = tf.gather(det_scores, order, batch_dims=1)
        det_classes = tf.gather(det_classes, order, batch_dims=1)
        rank = _rank_within_class(det_classes)
        det_ok = (det_classes >= 0) & (rank < self.params.max_dets[-1])

        gt_crowd = tf.cast(gt_crowd, tf.bool) & gt_valid
        flagged = gt_crowd if gt_ignore is None else gt_crowd | tf.cast(gt_ignore, tf.bool)
        gt_ignore = flagged[:, None, :] | _outside_areas(tf.cast(gt_area, f), self.params)   # [B,A,G]
        det_outside = _outside_areas(det_xywh[..., 2] * det_xywh[..., 3], self.params)    # [B,A,D]
        same_class = (det_classes[:, :, None] == gt_classes[:, None, :]) & gt_valid[:, None, :]
        same_class &= det_ok[:, :, None]
        ious = tf.where(same_class, _iou_xywh(det_xywh, gt_xywh, gt_crowd), tf.constant(-1.0, f))

        matched, matched_ignored = _greedy_match(ious, gt_crowd, gt_ignore, f, self.params.thresholds)  # [B,D,T,A]
        outside = tf.transpose(det_outside, [0, 2, 1])[:, :, None, :]
        det_ignored = matched_ignored | (~matched & outside)
        code = tf.where(matched & ~det_ignored, _TP, tf.where(~matched & ~det_ignored, _FP, _NONE))
        code = tf.where(det_ok[:, :, None, None], code, _NONE)

        nonignored = tf.cast(gt_valid[:, None, :] & ~gt_ignore, tf.int32)             # [B,A,G]
        one_hot = tf.one_hot(tf.maximum(gt_classes, 0), self.num_classes, dtype=tf.int32)
        self.num_gt.assign_add(tf.einsum("bag,bgk->ka", nonignored, one_hot))
        self._append(det_scores, tf.where(det_ok, det_classes, -1), rank, code)

    def _to_xywh(self, boxes):
        if self.box_format == "xywh":
            return boxes
        return tf.concat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)

    def _append(self, scores, classes, ranks, codes):
        n = tf.size(classes)
        rows = self.count + tf.range(n)
        fits = rows < self.capacity
        rows = tf.where(fits, rows, self.capacity)[:, None]  # overflow -> sink row
        self.scores.scatter_nd_update(rows, tf.reshape(scores, [-1]))
        self.classes.scatter_nd_update(rows, tf.reshape(classes, [-1]))
        self.ranks.scatter_nd_update(rows, tf.reshape(ranks, [-1]))
        self.codes.scatter_nd_update(rows, tf.cast(tf.reshape(codes, [n, -1]), tf.int8))
        lost = tf.reduce_sum(tf.cast(~fits & (tf.reshape(classes, [-1]) >= 0), tf.int32))
        self.dropped.assign_add(lost)
        self.count.assign(tf.minimum(self.count + n, self.capacity))

    # ------------------------------------------------------------ result
    def result(self):
        """``precision [T,R,K,A,M]`` and ``recall [T,K,A,M]`` (-1 where a category has no ground truth)."""
        f = self.dtype
        K, T, A = self.num_classes, self.num_thresholds, self.num_areas
        R = len(RECALL_THRESHOLDS)
        classes = self.classes[: self.capacity]
        valid = classes >= 0
        # stable sort by (class ascending, score descending, insertion order)
        by_score = tf.argsort(tf.where(valid, self.scores[: self.capacity], tf.constant(-np.inf, f)),
                              direction="DESCENDING", stable=True)
        class_key = tf.where(valid, -classes, -K)
        perm = tf.gather(by_score, tf.argsort(tf.gather(class_key, by_score), direction="DESCENDING", stable=True))
        cls = tf.gather(classes, perm)
        valid = cls >= 0
        safe_cls = tf.maximum(cls, 0)
        rank = tf.gather(self.ranks[: self.capacity], perm)
        codes = tf.gather(self.codes[: self.capacity], perm)
        num_gt = tf.cast(self.num_gt, f)                                        # [K,A]
        M = len(self.params.max_dets)
        # columns (m, t, a): a detection counts for maxDets m when its rank is below it
        kept = tf.cast(rank[:, None] < tf.constant(self.params.max_dets, tf.int32)[None, :], tf.int32)   # [N,M]
        is_tp = tf.reshape(kept[:, :, None] * tf.cast(codes == _TP, tf.int32)[:, None, :], [-1, M * T * A])
        is_fp = tf.reshape(kept[:, :, None] * tf.cast(codes == _FP, tf.int32)[:, None, :], [-1, M * T * A])
        npig_row = tf.tile(tf.gather(tf.maximum(self.num_gt, 1), safe_cls), [1, M * T])  # [N,M*T*A] int
        class_size = tf.math.unsorted_segment_sum(tf.cast(valid, tf.int32), safe_cls, K)
        class_start = tf.gather(tf.cumsum(class_size, exclusive=True), safe_cls)

        tp_count = _cumsum_within(is_tp, class_start)
        fp_count = _cumsum_within(is_fp, class_start)
        tp_f, fp_f = tf.cast(tp_count, f), tf.cast(fp_count, f)
        pr = tp_f / (fp_f + tp_f + tf.constant(np.spacing(1), f))
        cols = M * T * A
        segment = (safe_cls[:, None] * cols + tf.range(cols)[None, :]) * (R + 1) + _recall_bin(tp_count, npig_row)
        sink = K * cols * (R + 1)
        segment = tf.where(valid[:, None], segment, sink)
        best = tf.math.unsorted_segment_max(tf.reshape(pr, [-1]), tf.reshape(segment, [-1]), sink + 1)
        best = tf.maximum(tf.reshape(best[:sink], [K, M, T, A, R + 1]), 0)
        q = _suffix_max(best[..., 1:])                                           # [K,M,T,A,R]
        tp_total = tf.math.unsorted_segment_sum(is_tp, safe_cls, K)              # invalid rows add 0
        tp_total = tf.reshape(tf.cast(tp_total, f), [K, M, T, A])
        present = (num_gt > 0)[:, None, None, :]                                 # [K,1,1,A]
        recall = tf.where(present, tp_total / num_gt[:, None, None, :], -1)
        precision = tf.where(present[..., None], q, -1)
        return tf.transpose(precision, [2, 4, 0, 3, 1]), tf.transpose(recall, [2, 0, 3, 1])

    def check(self):
        """Raise (eagerly) when detections were dropped for lack of capacity."""
        dropped = int(self.dropped.numpy())
        if dropped:
            raise ValueError(f"COCOAccumulator: {dropped} detections did not fit in capacity={self.capacity}; "
                             "make the capacity at least images x detections per image")


# ------------------------------------------------------------ graph helpers
def _rank_within_class(classes):
    """Position of each detection among the earlier ones of its class: [B, D]."""
    d = tf.shape(classes)[1]
    earlier = tf.range(d)[None, :] < tf.range(d)[:, None]                  # [i, j]: j before i
    same = classes[:, :, None] == classes[:, None, :]
    return tf.reduce_sum(tf.cast(same & earlier[None], tf.int32), axis=-1)


def _outside_areas(area, params):
    """[..., N] areas -> [..., A, N]: outside each area range (bounds inclusive)."""
    lo, hi = (tf.constant(bound, area.dtype) for bound in params.area_bounds)
    a = area[..., None, :]
    return (a < lo[:, None]) | (a > hi[:, None])


def _iou_xywh(det, gt, gt_crowd):
    """maskUtils.iou with the same float operations: [B, D, G]."""
    dx, dy, dw, dh = (det[:, :, None, i] for i in range(4))
    gx, gy, gw, gh = (gt[:, None, :, i] for i in range(4))
    w = tf.minimum(dw + dx, gw + gx) - tf.maximum(dx, gx)
    h = tf.minimum(dh + dy, gh + gy) - tf.maximum(dy, gy)
    inter = w * h
    det_area = dw * dh
    union = tf.where(gt_crowd[:, None, :], det_area, det_area + gw * gh - inter)
    overlap = (w > 0) & (h > 0)
    return tf.where(overlap, inter / tf.where(overlap, union, tf.ones_like(union)), tf.zeros_like(inter))


def _last_argmax(values, mask):
    """Last index of the masked maximum along the last axis, and whether any."""
    g = tf.range(tf.shape(mask)[-1])
    best = tf.reduce_max(tf.where(mask, values, -2.0 * tf.ones_like(values)), axis=-1, keepdims=True)
    index = tf.reduce_max(tf.where(mask & (values == best), g, -1), axis=-1)
    return index, tf.reduce_any(mask, axis=-1)


def _greedy_match(ious, gt_crowd, gt_ignore, dtype, thresholds):
    """pycocotools' greedy matching for every threshold and area range.

    ious [B,D,G] (-1 where not same class / invalid), detections in score order;
    gt_crowd [B,G]; gt_ignore [B,A,G]. Returns matched, matched_ignored [B,D,T,A].
    """
    B, D, G = tf.shape(ious)[0], tf.shape(ious)[1], tf.shape(ious)[2]
    T, A = len(thresholds), gt_ignore.shape[1]
    thr = tf.constant(thresholds, dtype)[None, :, None, None]
    crowd = gt_crowd[:, None, None, :]
    ignored = gt_ignore[:, None, :, :]
    g_index = tf.range(G)
    per_det = tf.transpose(ious, [1, 0, 2])                                   # [D,B,G]

    def step(d, taken, matched, matched_ignored):
        iou = tf.broadcast_to(per_det[d][:, None, None, :], [B, T, A, G])
        cand = (iou >= thr) & (crowd | ~taken)
        m_reg, has_reg = _last_argmax(iou, cand & ~ignored)
        m_ign, has_ign = _last_argmax(iou, cand & ignored)
        has = has_reg | has_ign
        m = tf.where(has_reg, m_reg, m_ign)
        taken = taken | (has[..., None] & (g_index == m[..., None]))
        return d + 1, taken, matched.write(d, has), matched_ignored.write(d, has_ign & ~has_reg)

    taken = tf.zeros([B, T, A, G], tf.bool)
    arrays = [tf.TensorArray(tf.bool, size=D, element_shape=[None, T, A]) for _ in range(2)]
    _, _, matched, matched_ignored = tf.while_loop(
        lambda d, *_: d < D, step, [tf.constant(0), taken, *arrays])
    return tuple(tf.transpose(ta.stack(), [1, 0, 2, 3]) for ta in (matched, matched_ignored))


def _cumsum_within(values, start):
    """Cumulative sum along axis 0 restarting at each row's class start: [N, C]."""
    total = tf.cumsum(values, axis=0)
    before = tf.gather(total - values, start)
    return total - before


# pycocotools compares float64 tp / npig with linspace thresholds; where tp / npig equals
# r / 100 exactly, the outcome is whether float64(r / 100) >= linspace[r] (a constant per r)
_EQUAL_REACHES = np.array([r / 100.0 >= t for r, t in enumerate(RECALL_THRESHOLDS)])


def _recall_bin(tp, npig):
    """``#{r : recThr[r] <= tp / npig}`` as pycocotools' float64 comparisons, in integers (any dtype).

    ``r < 100 tp / npig`` strictly for ``ceil(100 tp / npig)`` values of r; on exact equality
    ``r = 100 tp / npig`` the float64 outcome is ``_EQUAL_REACHES[r]``.
    """
    n = len(RECALL_THRESHOLDS)
    scaled = (n - 1) * tp
    below = tf.minimum((scaled + npig - 1) // npig, n)
    exact = tf.equal(scaled % npig, 0) & (scaled // npig < n)
    equal_reaches = tf.gather(tf.constant(_EQUAL_REACHES), tf.minimum(scaled // npig, n - 1))
    return below + tf.cast(exact & equal_reaches, tf.int32)


def _suffix_max(x):
    """``out[..., r] = max(x[..., r:])`` by doubling (x >= 0)."""
    n = x.shape[-1]
    shift = 1
    while shift < n:
        pad = tf.zeros_like(x[..., :shift])
        x = tf.maximum(x, tf.concat([x[..., shift:], pad], axis=-1))
        shift *= 2
    return x


# ------------------------------------------------------------ json path
def evaluate_arrays_on_device(arr, dtype="float64", batch_size=64, jit_compile=True, params=DEFAULT_PARAMS):
    """``(precision, recall)`` numpy arrays of `kdet.metrics.coco.CocoArrays` on the device engine."""
    batches = padded_batches(arr, batch_size)
    det_width = batches[0][4].shape[1] if batches else 1
    acc = COCOAccumulator(len(arr.category_ids), capacity=max(len(batches) * batch_size * det_width, 1),
                          dtype=dtype, box_format="xywh", params=params)
    update = tf.function(acc.update, jit_compile=jit_compile)
    for batch in batches:
        update(*batch)
    acc.check()
    precision, recall = tf.function(acc.result, jit_compile=jit_compile)()
    return precision.numpy().astype(np.float64), recall.numpy().astype(np.float64)


def padded_batches(arr, batch_size, gt_width=None, det_width=None):
    """`CocoArrays` as a list of `COCOAccumulator.update` argument tuples (boxes ``xywh``).

    Images in sorted-id order, one static shape: every batch has ``batch_size`` images
    (the last one padded) and ``gt_width`` / ``det_width`` rows (default: the largest image).
    """
    num_images = len(arr.image_ids)
    g_box, g_cls, g_crowd, g_area = _pad_per_image(arr.gt_image, num_images, gt_width, arr.gt_xywh,
                                                   arr.gt_class, arr.gt_crowd, arr.gt_area)
    d_box, d_cls, d_score = _pad_per_image(arr.det_image, num_images, det_width, arr.det_xywh,
                                           arr.det_class, arr.det_score)
    columns = [(g_box, 0), (g_cls, -1), (g_crowd, 0), (g_area, 0), (d_box, 0), (d_score, 0), (d_cls, -1)]
    batches = []
    for lo in range(0, num_images, batch_size):
        pad = max(lo + batch_size - num_images, 0)
        batches.append(tuple(_pad_rows(x[lo:lo + batch_size], pad, fill) for x, fill in columns))
    return batches


def _pad_rows(x, pad, fill):
    return np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)]) if pad else x


def _pad_per_image(image_index, num_images, width, boxes, classes, *extra):
    """Padded per-image arrays (rows kept in their given order); padding class -1."""
    counts = np.bincount(image_index, minlength=num_images)
    needed = max(int(counts.max()) if counts.size else 0, 1)
    width = width or needed
    if width < needed:
        raise ValueError(f"an image has {needed} rows, more than the padded width {width}")
    start = np.cumsum(counts) - counts
    slot = np.arange(len(image_index)) - start[image_index]  # rows are grouped by image
    out_boxes = np.zeros((num_images, width, 4), np.float64)
    out_classes = np.full((num_images, width), -1, np.int32)
    out_boxes[image_index, slot] = boxes
    out_classes[image_index, slot] = classes
    outs = [out_boxes, out_classes]
    for values in extra:
        out = np.zeros((num_images, width), np.float64)
        out[image_index, slot] = values
        outs.append(out)
    return outs
