"""COCO workloads shared by the device-engine tests under TensorFlow (in pytest) and JAX (tests/jax_checks.py).

No TensorFlow here: the JAX checks import it in a process with KERAS_BACKEND=jax.
"""

import keras
import numpy as np
from keras import ops

from kdet.metrics.callback import ArrayBatches
from kdet.metrics.coco_device import COCOAccumulator, to_numpy
from kdet.metrics._coco_common import summarize
from test_coco_eval import det, ground_truth

NUM_CLASSES = 4


def edge_case_workload():
    """Crowds, IoU exactly 0.5, equal scores, an image without gt, a class without gt, area != box area."""
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "iscrowd": 1},
        {"image_id": 1, "category_id": 1, "bbox": [200, 200, 20, 20]},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10]},
        {"image_id": 2, "category_id": 2, "bbox": [0, 0, 100, 100], "area": 500.0},
        {"image_id": 3, "category_id": 2, "bbox": [0, 0, 30, 30]},
    ]
    dets = [det(1, 1, [10, 10, 20, 20], 0.9), det(1, 1, [50, 50, 20, 20], 0.5), det(1, 1, [200, 200, 20, 20], 0.5),
            det(2, 1, [0, 0, 10, 20], 0.5), det(2, 2, [0, 0, 100, 100], 0.7), det(3, 2, [60, 60, 30, 30], 0.7),
            det(3, 2, [0, 0, 30, 30], 0.7), det(4, 2, [0, 0, 30, 30], 0.95), det(4, 3, [0, 0, 30, 30], 0.6)]
    return ground_truth(anns, n_images=4, n_classes=NUM_CLASSES), dets



def uncut_update_arguments(gt, dets):
    """``COCOAccumulator.update`` arguments (xywh) for all images in one batch, every detection kept
    (``load_coco_arrays`` already cuts each image to 100 per class; the callback feeds ``detect`` uncut)."""
    image_ids = sorted(im["id"] for im in gt["images"])
    class_of = {c["id"]: k for k, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))}

    def padded(items, fields):
        rows = [[a for a in items if a["image_id"] == i] for i in image_ids]
        width = max(max(len(r) for r in rows), 1)
        boxes = np.zeros((len(rows), width, 4))
        classes = np.full((len(rows), width), -1, np.int32)
        extra = [np.zeros((len(rows), width)) for _ in fields]
        for i, row in enumerate(rows):
            for j, a in enumerate(row):
                boxes[i, j], classes[i, j] = a["bbox"], class_of[a["category_id"]]
                for out, field in zip(extra, fields):
                    out[i, j] = a[field]
        return boxes, classes, extra

    g_box, g_cls, (g_crowd, g_area) = padded(gt["annotations"], ("iscrowd", "area"))
    d_box, d_cls, (d_score,) = padded(dets, ("score",))
    return g_box, g_cls, g_crowd, g_area, d_box, d_score, d_cls



def ignore_flag_case(gt_ignore, gt_crowd):
    """One image, two ground truths (regular A, flagged B), four detections, xyxy input.

    Scores: 0.9 and 0.85 on B, 0.8 on A, 0.7 on nothing. The flag on B decides the ranking's TP/FP.
    """
    acc = COCOAccumulator(1, capacity=8, box_format="xyxy")
    gt = np.array([[[0, 0, 40, 40], [100, 100, 140, 140]]], np.float64)
    dets = np.array([[[100, 100, 140, 140], [100, 100, 140, 140], [0, 0, 40, 40], [200, 0, 240, 40]]], np.float64)
    acc.update(gt, [[0, 0]], [[False, gt_crowd]], [[1600.0, 1600.0]], dets, [[0.9, 0.85, 0.8, 0.7]], [[0, 0, 0, 0]],
               gt_ignore=[[False, gt_ignore]])
    precision, recall = (to_numpy(x) for x in acc.result())
    return precision[:, :, 0, 0, -1], recall[:, 0, 0, -1], summarize(precision, recall)  # all areas, 100 dets


# ------------------------------------------------------------------ the callback's workload
H, W, NUM_IMAGES, MAX_GT, MAX_DET = 48, 64, 12, 5, 16
CLASS_NAMES = ["cat", "dog", "fox"]


class FixedDetector(keras.Model):
    """A stand-in model: ``detect`` returns stored detections for the image whose index is pixel (0,0,0)."""

    def __init__(self, boxes, scores, classes):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self._boxes = np.asarray(boxes, np.float32)
        self._scores = np.asarray(scores, np.float32)
        self._classes = np.asarray(classes, np.int32)

    def call(self, images):
        return self.dense(ops.mean(images, axis=[1, 2]))

    def detect(self, images):
        index = ops.cast(images[:, 0, 0, 0], "int32")
        take = lambda x: ops.take(ops.convert_to_tensor(x), index, axis=0)
        classes = take(self._classes)
        return {"boxes": take(self._boxes), "scores": take(self._scores), "classes": classes,
                "num_detections": ops.sum(ops.cast(classes >= 0, "int32"), axis=-1)}


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


ValBatches = ArrayBatches  # the callback's own numpy PyDataset
