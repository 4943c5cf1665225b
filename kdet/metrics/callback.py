"""Keras callback: COCO bbox AP on a validation set, streamed on the device.

Every ``every_n_epochs`` epochs the callback runs the model over ``val_dataset``
(``(images, targets)`` or ``(images, targets, meta)`` batches; targets ``[B, M, 6]`` as in
docs/CONVENTIONS.md: normalised ``xyxy``, class id, ignore flag; padding class -1), matches the detections
with `kdet.metrics.coco_device.COCOAccumulator` and writes the 12 COCO numbers into
the epoch ``logs`` with a ``val_`` prefix (``val_AP``, ``val_AP50``, ..., ``val_AR_large``),
so ``ModelCheckpoint(monitor="val_AP", mode="max")``, ``EarlyStopping`` and TensorBoard
see them. Put this callback *before* those in the ``callbacks`` list.

Conventions:

* boxes are scaled to pixels of the **original images** when the batches carry ``meta``
  with ``width`` and ``height`` (``make_dataset(..., with_meta=True)``, what the engine
  feeds it), so COCO's small / medium / large ranges use the same areas as the final
  evaluation (``coco_evaluate`` on ``records_to_coco_json``) and the 12 numbers agree;
  without ``meta``, pixels of the model input (the images' ``H x W``). A 7th target
  column, when present, is taken as the area instead;
* ignore-flagged ground truths (VOC ``difficult``, ``iscrowd``) are, by default, COCO crowd
  regions, exactly as ``kdet.data.coco.records_to_coco_json`` writes them for pycocotools
  (which has no other way to ignore an object), so ``val_AP`` equals ``coco_evaluate`` on
  the same predictions; ``ignore_as_crowd=False`` ignores them as non-crowd objects instead
  (a detection matched to one is neither TP nor FP, and it matches at most once);
* score ties between images are broken by dataset order (pycocotools: image-id order).

Backends: the matching is `kdet.metrics.coco_device` (``keras.ops``, compiled by the backend).
Under TensorFlow the detection step is a ``tf.function``; under a ``tf.distribute`` strategy it
runs per replica with ``strategy.run`` over ``strategy.experimental_distribute_dataset(val_dataset)``
and the per-replica results are gathered and matched on the default device. Under JAX it is a
``jax.jit`` of ``detect_fn`` over the model's current weights (a ``keras.StatelessScope``), on the
default device. ``val_dataset`` is a ``tf.data.Dataset`` (read as numpy under other backends),
a ``keras.utils.PyDataset`` or any re-iterable of batches (numpy arrays or backend tensors).
Under a multi-worker strategy each worker instead runs the whole validation set on its own
device, so all workers log the same ``val_AP`` (early stopping and ``best.keras`` decide alike).
"""

import numpy as np
import keras
from keras import ops

from kdet.log import get_logger
from kdet.metrics._coco_common import EvalParams, format_per_class, original_hw, per_class, summarize
from kdet.metrics.coco_device import COCOAccumulator, to_numpy
from kdet.metrics.coco_stream import stable_argsort

logger = get_logger(__name__)

__all__ = ["ArrayBatches", "COCOEvalCallback", "default_detect"]

_MIN_CAPACITY = 1024


def default_detect(model, images):
    """``model.detect(images)``: the CONVENTIONS detection dict."""
    return model.detect(images)


class COCOEvalCallback(keras.callbacks.Callback):
    """COCO bbox evaluation every ``every_n_epochs`` epochs, logged as ``val_AP`` etc.

    Args:
      val_dataset: batches of ``(images, targets)`` or ``(images, targets, meta)``: a
        ``tf.data.Dataset``, a ``keras.utils.PyDataset`` or a re-iterable (e.g. a list).
      every_n_epochs: evaluate when ``(epoch + 1) % every_n_epochs == 0``.
      final_epoch: also evaluate after this epoch (1-based; the run's last, set by ``train.time_budget``).
      class_names: names of the classes (their number sets the class count).
      detect_fn: ``detect_fn(model, images) -> {"boxes", "scores", "classes", ...}``;
        default ``model.detect(images)``.
      dtype: ``"float64"`` (exact COCO) or ``"float32"`` (devices without float64).
      jit_compile: compile the detection and matching steps (XLA under TensorFlow, ``jax.jit``).
      verbose: print the summary and a per-class table after each evaluation.
      prefix: prefix of the log keys.
      ignore_as_crowd: evaluate ignore-flagged ground truths as COCO crowd regions (default,
        matches ``records_to_coco_json`` + pycocotools) or as non-crowd ignored objects.
      iou_thresholds, max_dets, area_ranges, use_cats: pycocotools' ``Params`` (see
        `kdet.metrics.coco.eval_params`); the logged names follow them (``val_AR1000``...).
    """

    def __init__(self, val_dataset, every_n_epochs=1, class_names=None, detect_fn=None,
                 dtype="float64", jit_compile=True, verbose=1, prefix="val_", ignore_as_crowd=True,
                 iou_thresholds=None, max_dets=None, area_ranges=None, use_cats=True, final_epoch=None):
        super().__init__()
        self.final_epoch = final_epoch
        self.eval_params = EvalParams.make(iou_thresholds, max_dets, area_ranges, use_cats)
        self.ignore_as_crowd = ignore_as_crowd
        if not class_names:
            raise ValueError("COCOEvalCallback needs class_names")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.val_dataset = val_dataset
        self.every_n_epochs = int(every_n_epochs)
        self.class_names = list(class_names)
        self.detect_fn = detect_fn or default_detect
        self.dtype = dtype
        self.jit_compile = jit_compile
        self.verbose = verbose
        self.prefix = prefix
        self.last_result = None
        self._accumulator = None
        self._update_fn = None
        self._result_fn = None
        self._predict_fn = None
        self._batch_size = None
        self._rows = 0  # buffer rows used, counted on the host (no device read per batch)

    # ------------------------------------------------------------ keras hooks
    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs and epoch + 1 != self.final_epoch:
            return
        result = self.evaluate()
        if logs is not None:
            logs.update({self.prefix + name: result[name] for name in self.eval_params.stat_names})
        if self.verbose:
            logger.info(f"\nCOCO evaluation after epoch {epoch + 1}:")
            logger.info("  " + "  ".join(f"{n}={result[n]:.4f}" for n in self.eval_params.stat_names))
            if result["per_class"]:
                logger.info(format_per_class(result["per_class"]))

    # ------------------------------------------------------------ evaluation
    def evaluate(self):
        """Run the model over the validation set; returns the 12 numbers and ``per_class``."""
        if self._accumulator is not None:
            self._accumulator.reset()
        self._rows = 0
        for detections, targets, sizes in self._predictions():
            self._stream(detections, targets, sizes)
        if self._accumulator is None:
            raise ValueError("COCOEvalCallback: the validation dataset is empty")
        self._accumulator.check()
        precision, recall = (to_numpy(x).astype(np.float64) for x in self._result_fn())
        result = summarize(precision, recall, self.eval_params)
        result["per_class"] = per_class(precision, self.class_names, self.eval_params) if self.eval_params.use_cats else {}
        self.last_result = result
        return result

    def _predictions(self):
        """``(detections, targets, sizes [B, 2])`` per validation batch, on the device."""
        if keras.backend.backend() == "tensorflow" and _is_tf_dataset(self.val_dataset):
            from kdet.metrics._callback_tf import DistributedPredictions

            if self._predict_fn is None:
                self._predict_fn = DistributedPredictions(self.detect_fn)
            yield from self._predict_fn(self.model, self.val_dataset)
            return
        if self._predict_fn is None:
            self._predict_fn = _make_predict_fn(self.model, self.detect_fn, self.jit_compile)
        for batch in _host_batches(self.val_dataset):
            images, targets = batch[0], batch[1]
            hw = original_hw(batch[2]) if len(batch) > 2 else None  # the original images' sizes
            yield self._predict_fn(images, targets, hw)

    def _stream(self, detections, targets, sizes):
        """Stream one batch in (a short last batch padded to the first batch's size: one compiled shape)."""
        batch = int(ops.shape(targets)[0])
        self._batch_size = self._batch_size or batch
        if batch > self._batch_size:
            raise ValueError(f"COCOEvalCallback: a validation batch of {batch} images after one of "
                             f"{self._batch_size}; only the last batch may be smaller")
        pad = self._batch_size - batch
        args = [{k: detections[k] for k in ("boxes", "scores", "classes")}, targets, sizes]
        if pad:
            args = [_pad_batch(x, pad) for x in args]
        self._ensure_capacity(self._batch_size * int(ops.shape(detections["classes"])[1]))
        self._update_fn(*args)
        self._rows += self._batch_size * int(ops.shape(detections["classes"])[1])

    def _ensure_capacity(self, rows):
        """Create the accumulator, or a bigger one (state copied) when the next batch does not fit."""
        acc = self._accumulator
        if acc is not None and self._rows + rows <= acc.capacity:
            return
        capacity = max(2 * (self._rows + rows), _MIN_CAPACITY)
        num_classes = len(self.class_names) if self.eval_params.use_cats else 1
        if acc is None:
            acc = COCOAccumulator(num_classes, capacity, dtype=self.dtype, params=self.eval_params)
        else:
            acc = acc.grown(capacity)
        self._accumulator = acc
        # compiled once per accumulator: recompiling at every evaluation would retrace each time
        self._update_fn, self._result_fn = acc.compiled(self.jit_compile, prepare=self._prepare)

    def _prepare(self, detections, targets, sizes):
        """`COCOAccumulator.update` arguments of one batch, boxes scaled to pixels (``sizes``: height, width)."""
        f = self.dtype
        sizes = ops.cast(sizes, f)
        height, width = sizes[:, 0, None], sizes[:, 1, None]
        scale = ops.stack([width, height, width, height], axis=-1)                      # [B, 1, 4]
        targets = ops.cast(targets, f)
        gt_boxes = targets[..., :4] * scale
        gt_classes = ops.cast(targets[..., 4], "int32")
        gt_ignore = targets[..., 5] > 0
        if targets.shape[-1] > 6:
            gt_area = targets[..., 6]
        else:
            gt_area = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])
        det_boxes = ops.cast(detections["boxes"], f) * scale
        det_classes = ops.cast(detections["classes"], "int32")
        det_scores = detections["scores"]
        if not self.eval_params.use_cats:  # one category: matching across classes
            # pycocotools breaks score ties between categories by category: rows in class order first
            order = stable_argsort(ops.where(det_classes >= 0, det_classes, np.iinfo(np.int32).max))
            det_boxes = ops.take_along_axis(det_boxes, order[:, :, None], axis=1)
            det_scores, det_classes = (ops.take_along_axis(x, order, axis=1) for x in (det_scores, det_classes))
            gt_classes, det_classes = (ops.where(c >= 0, 0, -1) for c in (gt_classes, det_classes))
        if self.ignore_as_crowd:
            gt_crowd, gt_ignore = gt_ignore, ops.zeros_like(gt_ignore)
        else:
            gt_crowd = ops.zeros_like(gt_ignore)
        return gt_boxes, gt_classes, gt_crowd, gt_area, det_boxes, det_scores, det_classes, gt_ignore


def _make_predict_fn(model, detect_fn, jit_compile):
    """``predict(images, targets, hw) -> (detections, targets, sizes)`` for one host batch, on the device."""

    def step(images, targets, hw):
        detections = detect_fn(model, images)
        if hw is None:  # no meta: pixels of the model input
            shape = ops.shape(images)
            sizes = ops.broadcast_to(ops.convert_to_tensor([shape[1], shape[2]], "int32"), [shape[0], 2])
        else:
            sizes = ops.stack([ops.cast(hw[0], "int32"), ops.cast(hw[1], "int32")], axis=-1)
        return {k: detections[k] for k in ("boxes", "scores", "classes")}, targets, sizes

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(step, reduce_retracing=True)
    return compiled_over_weights(model, step) if jit_compile else step


def compiled_over_weights(model, fn):
    """``fn`` compiled by the backend, reading ``model``'s current weights at each call.

    TensorFlow: a ``tf.function``. JAX: ``jax.jit`` of ``fn`` in a ``keras.StatelessScope`` over the
    weights' values (passed in, so later training is seen without retracing). Others: ``fn`` itself.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if backend != "jax":
        return fn
    import jax

    variables = list(model.variables) if model is not None else []

    def pure_fn(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    compiled = jax.jit(pure_fn)
    return lambda *args: compiled([v.value for v in variables], *args)


def _is_tf_dataset(data):
    return type(data).__module__.startswith("tensorflow") and hasattr(data, "as_numpy_iterator")


def _host_batches(data):
    """The batches of a ``tf.data.Dataset`` (as numpy), a ``PyDataset`` or a re-iterable."""
    if _is_tf_dataset(data):
        return data.as_numpy_iterator()
    if isinstance(data, keras.utils.PyDataset):
        count = data.num_batches if data.num_batches is not None else len(data)
        return (data[i] for i in range(count))
    return iter(data)


def _pad_batch(x, pad):
    """A batch's ``x`` (detections dict, targets or sizes) with ``pad`` more rows that count for nothing."""
    if isinstance(x, dict):  # detections: class -1
        return {k: _pad_rows(v, pad, -1 if k == "classes" else 0) for k, v in x.items()}
    x = _pad_rows(x, pad, 0)
    if len(x.shape) == 3:  # targets: class column -1
        padding_row = ops.arange(ops.shape(x)[0])[:, None, None] >= ops.shape(x)[0] - pad
        class_column = ops.arange(ops.shape(x)[2])[None, None, :] == 4
        x = ops.where(padding_row & class_column, ops.cast(-1, x.dtype), x)
    return x


def _pad_rows(x, pad, fill):
    x = ops.convert_to_tensor(x)
    return ops.pad(x, [[0, pad]] + [[0, 0]] * (len(x.shape) - 1), constant_values=fill)


class ArrayBatches(keras.utils.PyDataset):
    """Numpy ``images`` and ``targets`` as a ``PyDataset`` of ``batch_size`` rows (the last one
    shorter): a validation input for `COCOEvalCallback` without tf.data (so without TensorFlow)."""

    def __init__(self, images, targets, batch_size):
        super().__init__()
        self.images, self.targets, self.batch_size = images, targets, batch_size

    def __len__(self):
        return -(-len(self.images) // self.batch_size)

    def __getitem__(self, i):
        rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.images[rows], self.targets[rows]
