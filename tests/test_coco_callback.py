"""COCOEvalCallback logs val_AP etc. equal to coco_evaluate on the same predictions."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from kdet.metrics.callback import COCOEvalCallback
from kdet.metrics.coco import STAT_NAMES, coco_evaluate

H, W, NUM_IMAGES, MAX_GT, MAX_DET = 48, 64, 12, 5, 16
CLASS_NAMES = ["cat", "dog", "fox"]


class FixedDetector(keras.Model):
    """A stand-in model: ``detect`` returns stored detections for the image whose index is pixel (0,0,0)."""

    def __init__(self, boxes, scores, classes):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self._boxes = tf.constant(boxes, tf.float32)
        self._scores = tf.constant(scores, tf.float32)
        self._classes = tf.constant(classes, tf.int32)

    def call(self, images):
        return self.dense(tf.reduce_mean(images, axis=[1, 2]))

    def detect(self, images):
        index = tf.cast(images[:, 0, 0, 0], tf.int32)
        classes = tf.gather(self._classes, index)
        return {"boxes": tf.gather(self._boxes, index), "scores": tf.gather(self._scores, index),
                "classes": classes, "num_detections": tf.reduce_sum(tf.cast(classes >= 0, tf.int32), -1)}


def make_data(seed=0):
    """Targets [N, MAX_GT, 6] and detections on a 1/16 grid (exact in float32 and in pixels)."""
    rng = np.random.default_rng(seed)
    targets = np.zeros((NUM_IMAGES, MAX_GT, 6), np.float32)
    targets[..., 4] = -1
    boxes = np.zeros((NUM_IMAGES, MAX_DET, 4), np.float32)
    scores = np.zeros((NUM_IMAGES, MAX_DET), np.float32)
    classes = np.full((NUM_IMAGES, MAX_DET), -1, np.int32)

    def grid_box():
        x1, y1 = rng.integers(0, 12, 2)
        w, h = rng.integers(1, 5, 2)
        return np.array([x1, y1, x1 + w, y1 + h]) / 16.0

    for i in range(NUM_IMAGES):
        n_gt = rng.integers(0, MAX_GT + 1)
        k = 0
        for g in range(n_gt):
            box, c = grid_box(), rng.integers(len(CLASS_NAMES))
            targets[i, g] = [*box, c, 0]
            for _ in range(rng.integers(0, 3)):
                boxes[i, k] = np.clip(box + rng.integers(-1, 2, 4) * (rng.random(4) < 0.2) / 16.0, 0, 1)
                classes[i, k], scores[i, k] = c, rng.integers(1, 10) / 10
                k += 1
        while k < MAX_DET and rng.random() < 0.7:
            boxes[i, k], classes[i, k], scores[i, k] = grid_box(), rng.integers(len(CLASS_NAMES)), rng.integers(1, 10) / 10
            k += 1
    images = np.zeros((NUM_IMAGES, H, W, 3), np.float32)
    images[:, 0, 0, 0] = np.arange(NUM_IMAGES)
    return images, targets, (boxes, scores, classes)


def as_coco_json(targets, detections):
    """The same ground truth and predictions as COCO json, boxes in input pixels."""
    boxes, scores, classes = detections
    scale = np.array([W, H, W, H], np.float64)
    gt = {"images": [{"id": i + 1, "width": W, "height": H} for i in range(NUM_IMAGES)],
          "categories": [{"id": c + 1, "name": n} for c, n in enumerate(CLASS_NAMES)], "annotations": []}
    for i, rows in enumerate(targets):
        for row in rows[rows[:, 4] >= 0]:
            x1, y1, x2, y2 = row[:4].astype(np.float64) * scale
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": int(row[4]) + 1,
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                      "iscrowd": 0})
    dets = []
    for i in range(NUM_IMAGES):
        for box, score, c in zip(boxes[i], scores[i], classes[i]):
            if c >= 0:
                x1, y1, x2, y2 = box.astype(np.float64) * scale
                dets.append({"image_id": i + 1, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "score": float(score)})
    return gt, dets


def fit_with_callback(strategy=None, every_n_epochs=1, epochs=2):
    images, targets, detections = make_data()
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = FixedDetector(*detections)
        model.compile(optimizer="sgd", loss="mse")
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
    # a second, empty image: a batch of one image fails in the accumulator's while_loop (reported)
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
