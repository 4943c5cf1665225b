"""COCOEvalCallback logs val_AP etc. equal to coco_evaluate on the same predictions."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from kdet.metrics.callback import COCOEvalCallback
from kdet.metrics.coco import STAT_NAMES, coco_evaluate

from _coco_cases import (CLASS_NAMES, H, MAX_DET, MAX_GT, NUM_IMAGES, W, FixedDetector,  # noqa: F401
                         ValBatches, as_coco_json, make_data)


def fit_with_callback(strategy=None, every_n_epochs=1, epochs=2, val=None):
    images, targets, detections = make_data()
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = FixedDetector(*detections)
        model.compile(optimizer="sgd", loss="mse")
    if val is None:
        val = tf.data.Dataset.from_tensor_slices((images, targets)).batch(5)
    callback = COCOEvalCallback(val, every_n_epochs=every_n_epochs, class_names=CLASS_NAMES,
                                jit_compile=False, verbose=0)
    history = model.fit(images, np.zeros((NUM_IMAGES, 1), np.float32), batch_size=6, epochs=epochs,
                        callbacks=[callback], verbose=0)
    return history.history, callback, coco_evaluate(*as_coco_json(targets, detections))


def test_logged_numbers_equal_coco_evaluate():
    logs, callback, reference = fit_with_callback(every_n_epochs=2, epochs=2)
    assert len(logs["val_AP"]) == 1  # evaluated after epoch 2 only
    assert reference["AP"] > 0.05  # the workload is not degenerate
    for name in STAT_NAMES:
        assert logs["val_" + name][0] == pytest.approx(reference[name], abs=1e-12), name
    for name in CLASS_NAMES:
        assert callback.last_result["per_class"][name] == pytest.approx(reference["per_class"][name], abs=1e-12)


def test_under_a_distribution_strategy():
    logs, _, reference = fit_with_callback(strategy=tf.distribute.OneDeviceStrategy("/cpu:0"), epochs=1)
    assert logs["val_AP"][0] == pytest.approx(reference["AP"], abs=1e-12)
    assert logs["val_AR100"][0] == pytest.approx(reference["AR100"], abs=1e-12)


@pytest.mark.parametrize("kind", ["tf.data", "PyDataset"])
def test_validation_batches_of_one_image(kind):
    """Batches of a single image (was: the matching's tf.while_loop failed on B = 1), from tf.data
    or a numpy PyDataset; a PyDataset of 5-image batches ends with a short one (padded)."""
    images, targets, _ = make_data()
    val = (tf.data.Dataset.from_tensor_slices((images, targets)).batch(1) if kind == "tf.data"
           else ValBatches(images, targets, 1))
    logs, _, reference = fit_with_callback(epochs=1, val=val)
    for name in STAT_NAMES:
        assert logs["val_" + name][0] == pytest.approx(reference[name], abs=1e-12), name
    logs, _, _ = fit_with_callback(epochs=1, val=ValBatches(images, targets, 5))
    assert logs["val_AP"][0] == pytest.approx(reference["AP"], abs=1e-12)


def test_needs_class_names():
    with pytest.raises(ValueError, match="class_names"):
        COCOEvalCallback(tf.data.Dataset.range(1))


@pytest.mark.parametrize("ignore_as_crowd, expected_ap", [(True, 1.0), (False, 0.5)])
def test_ignore_flag_as_crowd_or_as_ignored_object_by_hand(ignore_as_crowd, expected_ap):
    """One 200 x 200 image: regular object A, ignore-flagged object B; detections scored 0.9 and 0.85
    on B, 0.8 on A, 0.7 on nothing. As a crowd, B absorbs both: TP, FP -> precision 1, AP 1. As an
    ignored non-crowd object B matches once: 0.85 is a FP ranked above the TP -> FP, TP, FP:
    interpolated precision 1/2 at every recall threshold, AP 1/2 (the device test computes the same)."""
    s = 200.0
    # a second, empty image (padding rows of the batch count for nothing)
    targets = np.array([[[0, 0, 40 / s, 40 / s, 0, 0], [100 / s, 100 / s, 140 / s, 140 / s, 0, 1]],
                        [[0, 0, 0, 0, -1, 0]] * 2], np.float32)
    boxes = np.array([[[100, 100, 140, 140], [100, 100, 140, 140], [0, 0, 40, 40], [160, 0, 200, 40]],
                      [[0, 0, 0, 0]] * 4]) / s
    detections = dict(boxes=tf.constant(boxes, tf.float32), scores=tf.constant([[0.9, 0.85, 0.8, 0.7], [0.0] * 4]),
                      classes=tf.constant([[0, 0, 0, 0], [-1] * 4], tf.int32))
    dataset = tf.data.Dataset.from_tensors((tf.zeros((2, 200, 200, 3), tf.uint8), tf.constant(targets)))
    callback = COCOEvalCallback(dataset, class_names=["x"], detect_fn=lambda model, images: detections,
                                verbose=0, ignore_as_crowd=ignore_as_crowd, jit_compile=False)
    result = callback.evaluate()
    assert result["AP"] == pytest.approx(expected_ap, abs=1e-12)
    assert result["AP50"] == pytest.approx(expected_ap, abs=1e-12) and result["AR100"] == 1.0
