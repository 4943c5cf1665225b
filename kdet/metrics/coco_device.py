"""Streaming COCO bbox evaluation on the accelerator, under every Keras backend.

`COCOAccumulator` holds the state of :mod:`kdet.metrics.coco_stream` (the matching and
accumulation, written once in ``keras.ops``) and compiles its update and result with the
backend's compiler: ``tf.function(jit_compile=True)`` under TensorFlow (the state lives in
``tf.Variable`` buffers, updated in place), ``jax.jit`` under JAX (the state is a dict of
arrays, donated to each update). No ``py_function`` and no pycocotools.

``dtype="float64"`` reproduces pycocotools exactly. JAX computes in float32 unless x64 is
enabled: the accumulator enables it only around its own calls (``jax.enable_x64``), so the
user's global setting and the model stay as they are. ``"float32"`` (for devices without
float64) differs only through float32 IoU near a threshold and float32 precision values:
measured within 5e-9 of pycocotools on a 600-image synthetic workload (the tests require 1e-4).

Ties between equal scores are broken like pycocotools when images are fed in ascending
image-id order (the order of insertion is the tie order).
"""

import contextlib

import numpy as np
import keras
from keras import ops

from kdet.metrics._coco_common import DEFAULT_PARAMS
from kdet.metrics.coco_stream import (ROW_FIELDS, STATE_FIELDS, StreamSpec, append_slots, initial_state,
                                      match_batch, state_result, update_state)

__all__ = ["COCOAccumulator", "evaluate_arrays_on_device", "padded_batches", "precision_scope", "to_numpy"]


def precision_scope(dtype):
    """Context in which ``dtype`` computes as itself: x64 on under JAX for float64, else nothing."""
    if keras.backend.backend() != "jax" or dtype != "float64":
        return contextlib.nullcontext()
    import jax

    if hasattr(jax, "enable_x64"):  # jax >= 0.7: a config context manager
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


def to_numpy(x):
    """A backend tensor (or variable) as a numpy array, its dtype kept."""
    return np.asarray(ops.convert_to_numpy(x))


class COCOAccumulator:
    """Fixed-capacity streaming COCO matcher.

    Args:
      num_classes: number of categories (0-based class ids; -1 marks padding).
      capacity: detection rows the buffer holds (at least images x detections per image);
        rows past it are dropped and `check` raises.
      dtype: ``"float64"`` (exact) or ``"float32"``.
      box_format: ``"xyxy"`` (kdet) or ``"xywh"`` (COCO json; bit-exact with pycocotools).
      params: `kdet.metrics.coco.EvalParams` (IoU thresholds, max detections, area ranges;
        pycocotools' defaults). ``use_cats=False`` is the caller's part: give every ground
        truth and detection class 0 (and ``num_classes=1``).

    ``update`` / ``result`` run eagerly (under TensorFlow they also trace inside a caller's
    ``tf.function``); ``compiled(jit_compile)`` gives their compiled forms for this backend.
    """

    def __init__(self, num_classes, capacity, dtype="float64", box_format="xyxy", name=None, params=DEFAULT_PARAMS):
        self.spec = StreamSpec(int(num_classes), int(capacity), str(dtype), box_format, params)
        self.params, self.num_classes, self.capacity = params, self.spec.num_classes, self.spec.capacity
        self.dtype, self.box_format = self.spec.dtype, box_format
        self.num_thresholds, self.num_areas = self.spec.num_thresholds, self.spec.num_areas
        on_tf = keras.backend.backend() == "tensorflow"
        self._store = _VariableStore(self.spec, name) if on_tf else _ArrayStore(self.spec)

    def reset(self):
        self._store.load(initial_state(self.spec))

    def update(self, gt_boxes, gt_classes, gt_crowd, gt_area, det_boxes, det_scores, det_classes, gt_ignore=None):
        """Match one batch and append it (arguments: `kdet.metrics.coco_stream.match_batch`)."""
        batch = (gt_boxes, gt_classes, gt_crowd, gt_area, det_boxes, det_scores, det_classes)
        self._store.update(batch + (() if gt_ignore is None else (gt_ignore,)))

    def result(self):
        """``precision [T,R,K,A,M]`` and ``recall [T,K,A,M]`` (-1 where a category has no ground truth)."""
        return self._store.result()

    def compiled(self, jit_compile=True, prepare=None):
        """``(update_fn, result_fn)`` compiled for this backend; ``update_fn(*args)`` streams
        ``prepare(*args)`` (default: the `update` arguments) in, inside the compiled step."""
        return self._store.compiled(jit_compile, prepare)

    def state(self):
        """The state as numpy arrays (``kdet.metrics.coco_stream.STATE_FIELDS``)."""
        return self._store.numpy_state()

    def load_state(self, state):
        """Replace the state by ``state`` (numpy arrays of this accumulator's shapes)."""
        self._store.load(state)

    def grown(self, capacity):
        """A new accumulator of ``capacity`` rows holding this one's state."""
        if capacity < self.capacity:
            raise ValueError(f"cannot shrink capacity {self.capacity} to {capacity}")
        bigger = COCOAccumulator(self.num_classes, capacity, self.dtype, self.box_format, params=self.params)
        old, state = self.state(), initial_state(bigger.spec)
        used = int(old["count"])
        for name in ROW_FIELDS:
            state[name][:used] = old[name][:used]
        state.update(num_gt=old["num_gt"], count=old["count"], dropped=old["dropped"])
        bigger.load_state(state)
        return bigger

    def check(self):
        """Raise when detections were dropped for lack of capacity."""
        dropped = int(self.state()["dropped"])
        if dropped:
            raise ValueError(f"COCOAccumulator: {dropped} detections did not fit in capacity={self.capacity}; "
                             "make the capacity at least images x detections per image")


class _VariableStore:
    """TensorFlow: the state in ``tf.Variable`` buffers; an update scatters its rows in place."""

    def __init__(self, spec, name):
        import tensorflow as tf

        self.spec = spec
        prefix = f"{name}/" if name else ""
        with tf.init_scope():
            self.variables = {k: tf.Variable(v, trainable=False, name=prefix + k)
                              for k, v in initial_state(spec).items()}

    def load(self, state):
        for k, v in self.variables.items():
            v.assign(state[k])

    def numpy_state(self):
        return {k: v.numpy() for k, v in self.variables.items()}

    def update(self, batch):
        rows, num_gt = match_batch(self.spec, *batch)
        v = self.variables
        slots, lost, count = append_slots(self.spec, v["count"], rows["classes"])
        for k in ROW_FIELDS:
            v[k].scatter_nd_update(slots[:, None], rows[k])
        v["num_gt"].assign_add(num_gt)
        v["dropped"].assign_add(lost)
        v["count"].assign(count)

    def result(self):
        return state_result(self.spec, {k: v.read_value() for k, v in self.variables.items()})

    def compiled(self, jit_compile, prepare):
        import tensorflow as tf

        def update_fn(*args):
            self.update(prepare(*args) if prepare else args)

        return tf.function(update_fn, jit_compile=jit_compile), tf.function(self.result, jit_compile=jit_compile)


class _ArrayStore:
    """JAX (and other backends): the state as a dict of arrays, replaced by each functional update."""

    def __init__(self, spec):
        self.spec = spec
        self.load(initial_state(spec))

    def load(self, state):
        with precision_scope(self.spec.dtype):
            self.arrays = {k: ops.convert_to_tensor(state[k]) for k in STATE_FIELDS}

    def numpy_state(self):
        return {k: to_numpy(v) for k, v in self.arrays.items()}

    def update(self, batch):
        with precision_scope(self.spec.dtype):
            self.arrays = update_state(self.spec, self.arrays, *batch)

    def result(self):
        with precision_scope(self.spec.dtype):
            return state_result(self.spec, self.arrays)

    def compiled(self, jit_compile, prepare):
        spec = self.spec

        def pure_update(state, *args):
            return update_state(spec, state, *(prepare(*args) if prepare else args))

        def pure_result(state):
            return state_result(spec, state)

        if jit_compile and keras.backend.backend() == "jax":
            import jax

            pure_update, pure_result = jax.jit(pure_update, donate_argnums=0), jax.jit(pure_result)

        def update_fn(*args):
            with precision_scope(spec.dtype):
                self.arrays = pure_update(self.arrays, *args)

        def result_fn():
            with precision_scope(spec.dtype):
                return pure_result(self.arrays)

        return update_fn, result_fn


# ------------------------------------------------------------ json path
def evaluate_arrays_on_device(arr, dtype="float64", batch_size=64, jit_compile=True, params=DEFAULT_PARAMS):
    """``(precision, recall)`` numpy arrays of `kdet.metrics.coco.CocoArrays` on the device engine."""
    batches = padded_batches(arr, batch_size)
    det_width = batches[0][4].shape[1] if batches else 1
    acc = COCOAccumulator(len(arr.category_ids), capacity=max(len(batches) * batch_size * det_width, 1),
                          dtype=dtype, box_format="xywh", params=params)
    update, result = acc.compiled(jit_compile)
    for batch in batches:
        update(*batch)
    acc.check()
    precision, recall = result()
    return to_numpy(precision).astype(np.float64), to_numpy(recall).astype(np.float64)


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
