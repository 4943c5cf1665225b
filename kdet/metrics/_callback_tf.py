"""The TensorFlow side of `kdet.metrics.callback`: detections per replica of a ``tf.distribute`` strategy."""

import tensorflow as tf

from kdet.metrics._coco_common import original_hw
from kdet.training.strategy import is_multi_worker


class DistributedPredictions:
    """``(detections, targets, sizes)`` per batch of a ``tf.data`` validation set, called as
    ``predictions(model, val_dataset)`` (the callback keeps one: the compiled step is made once).

    The detection step ``detect_fn(model, images)`` runs per replica with ``strategy.run`` over
    ``strategy.experimental_distribute_dataset``; the replicas' results are concatenated.
    """

    def __init__(self, detect_fn):
        self.detect_fn = detect_fn
        self._predict = None

    def __call__(self, model, val_dataset):
        strategy = model.distribute_strategy if model is not None else tf.distribute.get_strategy()
        if is_multi_worker(strategy):  # each worker evaluates the whole set, so all log the same val_AP
            strategy = _SINGLE_DEVICE
        if self._predict is None:
            self._predict = _make_predict_fn(strategy, model, self.detect_fn)
        for batch in strategy.experimental_distribute_dataset(val_dataset):
            images, targets = batch[0], batch[1]
            hw = original_hw(batch[2]) if len(batch) > 2 else None  # the original images' sizes
            yield _gather(strategy, *self._predict(images, targets, hw))


def _make_predict_fn(strategy, model, detect_fn):
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


class _ThisWorker:
    """The three strategy methods used here, run plainly on this process's device."""

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
