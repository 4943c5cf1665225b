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

Under a ``tf.distribute`` strategy the detection step runs per replica with
``strategy.run`` over ``strategy.experimental_distribute_dataset(val_dataset)``; the
per-replica results are gathered and matched on the default device. Under a multi-worker
strategy each worker instead runs the whole validation set on its own device, so all
workers log the same ``val_AP`` (early stopping and ``best.keras`` decide alike).
"""

import numpy as np
import tensorflow as tf
import keras

from kdet.metrics._coco_common import EvalParams, format_per_class, per_class, summarize
from kdet.metrics.coco_device import COCOAccumulator
from kdet.training.strategy import is_multi_worker

__all__ = ["COCOEvalCallback", "default_detect"]


def default_detect(model, images):
    """``model.detect(images)``: the CONVENTIONS detection dict."""
    return model.detect(images)


class COCOEvalCallback(keras.callbacks.Callback):
    """COCO bbox evaluation every ``every_n_epochs`` epochs, logged as ``val_AP`` etc.

    Args:
      val_dataset: ``tf.data.Dataset`` of ``(images, targets)``.
      every_n_epochs: evaluate when ``(epoch + 1) % every_n_epochs == 0``.
      class_names: names of the classes (their number sets the class count).
      detect_fn: ``detect_fn(model, images) -> {"boxes", "scores", "classes", ...}``;
        default ``model.detect(images)``.
      dtype: ``"float64"`` (exact COCO) or ``"float32"`` (devices without float64).
      jit_compile: compile the matching step with XLA.
      verbose: print the summary and a per-class table after each evaluation.
      prefix: prefix of the log keys.
      ignore_as_crowd: evaluate ignore-flagged ground truths as COCO crowd regions (default,
        matches ``records_to_coco_json`` + pycocotools) or as non-crowd ignored objects.
      iou_thresholds, max_dets, area_ranges, use_cats: pycocotools' ``Params`` (see
        `kdet.metrics.coco.eval_params`); the logged names follow them (``val_AR1000``...).
    """

    def __init__(self, val_dataset, every_n_epochs=1, class_names=None, detect_fn=None,
                 dtype="float64", jit_compile=True, verbose=1, prefix="val_", ignore_as_crowd=True,
                 iou_thresholds=None, max_dets=None, area_ranges=None, use_cats=True):
        super().__init__()
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

    # ------------------------------------------------------------ keras hooks
    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        result = self.evaluate()
        if logs is not None:
            logs.update({self.prefix + name: result[name] for name in self.eval_params.stat_names})
        if self.verbose:
            print(f"\nCOCO evaluation after epoch {epoch + 1}:")
            print("  " + "  ".join(f"{n}={result[n]:.4f}" for n in self.eval_params.stat_names))
            if result["per_class"]:
                print(format_per_class(result["per_class"]))

    # ------------------------------------------------------------ evaluation
    def evaluate(self):
        """Run the model over the validation set; returns the 12 numbers and ``per_class``."""
        strategy = self.model.distribute_strategy if self.model is not None else tf.distribute.get_strategy()
        if is_multi_worker(strategy):  # each worker evaluates the whole set, so all log the same val_AP
            strategy = _SINGLE_DEVICE
        if self._predict_fn is None:
            self._predict_fn = self._make_predict_fn(strategy)
        if self._accumulator is not None:
            self._accumulator.reset()
        for batch in strategy.experimental_distribute_dataset(self.val_dataset):
            images, targets = batch[0], batch[1]
            hw = _original_hw(batch[2]) if len(batch) > 2 else None  # the original images' sizes
            detections, targets, size = self._predict_fn(images, targets, hw)
            self._update(*_gather(strategy, detections, targets, size))
        if self._accumulator is None:
            raise ValueError("COCOEvalCallback: the validation dataset is empty")
        self._accumulator.check()
        precision, recall = self._result_fn()
        precision, recall = precision.numpy().astype(np.float64), recall.numpy().astype(np.float64)
        result = summarize(precision, recall, self.eval_params)
        result["per_class"] = per_class(precision, self.class_names, self.eval_params) if self.eval_params.use_cats else {}
        self.last_result = result
        return result

    def _make_predict_fn(self, strategy):
        model, detect_fn = self.model, self.detect_fn

        def step(images, targets, height=None, width=None):
            detections = detect_fn(model, images)
            if height is None:  # no meta: pixels of the model input
                sizes = tf.broadcast_to(tf.shape(images)[1:3], [tf.shape(images)[0], 2])
            else:
                sizes = tf.stack([tf.cast(height, tf.int32), tf.cast(width, tf.int32)], axis=-1)
            return {k: detections[k] for k in ("boxes", "scores", "classes")}, targets, sizes

        @tf.function(reduce_retracing=True)
        def predict(images, targets, hw):
            args = (images, targets) if hw is None else (images, targets, *hw)
            return strategy.run(step, args=args)

        return predict

    def _update(self, detections, targets, sizes):
        """Scale one gathered batch to pixels (``sizes [B, 2]``: height, width) and stream it in."""
        height, width = (tf.cast(sizes[:, i, None], tf.float64) for i in (0, 1))
        scale = tf.stack([width, height, width, height], axis=-1)                # [B, 1, 4]
        targets = tf.cast(targets, tf.float64)
        gt_boxes = targets[..., :4] * scale
        gt_classes = tf.cast(targets[..., 4], tf.int32)
        gt_ignore = targets[..., 5] > 0
        if targets.shape[-1] > 6:
            gt_area = targets[..., 6]
        else:
            gt_area = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])
        det_boxes = tf.cast(detections["boxes"], tf.float64) * scale
        det_classes = tf.cast(detections["classes"], tf.int32)
        det_scores = detections["scores"]
        if not self.eval_params.use_cats:  # one category: matching across classes
            # pycocotools breaks score ties between categories by category: rows in class order first
            order = tf.argsort(tf.where(det_classes >= 0, det_classes, tf.int32.max), axis=-1, stable=True)
            det_boxes, det_scores, det_classes = (tf.gather(x, order, batch_dims=1)
                                                  for x in (det_boxes, det_scores, det_classes))
            gt_classes, det_classes = (tf.where(c >= 0, 0, -1) for c in (gt_classes, det_classes))
        if self.ignore_as_crowd:
            gt_crowd, gt_ignore = gt_ignore, tf.zeros_like(gt_ignore)
        else:
            gt_crowd = tf.zeros_like(gt_ignore)
        args = [gt_boxes, gt_classes, gt_crowd, gt_area, det_boxes, det_scores, det_classes, gt_ignore]
        # a short last batch is padded (class -1) to the first batch's size: one compiled shape
        self._batch_size = self._batch_size or int(gt_boxes.shape[0])
        pad = self._batch_size - int(gt_boxes.shape[0])
        if pad > 0:
            args = [_pad_batch(x, pad, -1 if x is gt_classes or x is det_classes else 0) for x in args]
        self._ensure_capacity(self._batch_size * int(det_classes.shape[1]))
        self._update_fn(*args)

    def _ensure_capacity(self, rows):
        """Create the accumulator, or a bigger one (state copied) when the next batch does not fit."""
        acc = self._accumulator
        if acc is not None and int(acc.count.numpy()) + rows <= acc.capacity:
            return
        used = 0 if acc is None else int(acc.count.numpy())
        capacity = max(2 * (used + rows), 1024)
        num_classes = len(self.class_names) if self.eval_params.use_cats else 1
        bigger = COCOAccumulator(num_classes, capacity, dtype=self.dtype, params=self.eval_params)
        if acc is not None:
            for name in ("scores", "classes", "ranks", "codes"):
                old = getattr(acc, name)[:used]
                getattr(bigger, name)[:used].assign(old)
            bigger.num_gt.assign(acc.num_gt)
            bigger.count.assign(acc.count)
        self._accumulator = bigger
        self._update_fn = tf.function(bigger.update, jit_compile=self.jit_compile)
        # built once per accumulator: a new tf.function at every evaluation retraces each time (and warns)
        self._result_fn = tf.function(bigger.result, jit_compile=self.jit_compile)


def _pad_batch(x, pad, fill):
    padding = tf.fill(tf.concat([[pad], tf.shape(x)[1:]], 0), tf.cast(fill, x.dtype))
    return tf.concat([x, padding], axis=0)


def _original_hw(meta):
    """``(height, width)`` ``[B]`` of the original images from a batch's ``meta`` dict, else None."""
    if isinstance(meta, dict) and "height" in meta and "width" in meta:
        return meta["height"], meta["width"]
    return None


class _ThisWorker:
    """The three strategy methods `evaluate` uses, run plainly on this process's device."""

    @staticmethod
    def experimental_distribute_dataset(dataset):
        return dataset

    @staticmethod
    def run(fn, args=()):
        return fn(*args)

    @staticmethod
    def experimental_local_results(value):
        return (value,)


_SINGLE_DEVICE = _ThisWorker()


def _gather(strategy, detections, targets, sizes):
    """Concatenate per-replica results on the host side."""
    local = strategy.experimental_local_results
    cat = lambda x: tf.concat(local(x), axis=0)
    detections = {k: cat(v) for k, v in detections.items()}
    return detections, cat(targets), cat(sizes)
