"""kdet.metrics.coco_device: the XLA-compiled streaming engine equals pycocotools / the numpy engine."""

import numpy as np
import pytest
import tensorflow as tf

from kdet.metrics.coco import STAT_NAMES, coco_evaluate, evaluate_arrays, load_coco_arrays
from kdet.metrics.coco_device import COCOAccumulator, padded_batches
from kdet.metrics._coco_common import summarize
from test_coco_eval import det, ground_truth, pycocotools_eval, random_workload

BATCH, GT_WIDTH, DET_WIDTH, NUM_CLASSES = 8, 8, 48, 4


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


@pytest.fixture(scope="module")
def compiled_float64():
    """One accumulator and its XLA-compiled update / result, reused (one static shape)."""
    acc = COCOAccumulator(NUM_CLASSES, capacity=32 * DET_WIDTH, dtype="float64", box_format="xywh")
    return acc, tf.function(acc.update, jit_compile=True), tf.function(acc.result, jit_compile=True)


def run_device(arr, acc, update, result):
    acc.reset()
    for batch in padded_batches(arr, BATCH, gt_width=GT_WIDTH, det_width=DET_WIDTH):
        update(*batch)
    acc.check()
    precision, recall = result()
    return precision.numpy(), recall.numpy()


@pytest.mark.parametrize("case", ["edge", "random0", "random1"])
def test_xla_float64_equals_pycocotools(case, compiled_float64):
    if case == "edge":
        gt, dets = edge_case_workload()
    else:
        gt, dets = random_workload(int(case[-1]), n_images=20, n_classes=NUM_CLASSES, max_gt=GT_WIDTH,
                                   max_random_dets=12)
    arr = load_coco_arrays(gt, dets)
    precision, recall = run_device(arr, *compiled_float64)
    ref_precision, ref_recall = evaluate_arrays(arr)
    np.testing.assert_array_equal(precision, ref_precision)
    np.testing.assert_array_equal(recall, ref_recall)
    ref, _ = pycocotools_eval(gt, dets)
    got = summarize(precision, recall)
    for name in STAT_NAMES:
        assert got[name] == pytest.approx(ref[name], abs=1e-12), name


def test_float32_within_1e4_of_pycocotools():
    gt, dets = random_workload(3, n_images=30, n_classes=3, max_random_dets=20)
    got = coco_evaluate(gt, dets, use_device=True, dtype="float32", batch_size=16, jit_compile=False)
    ref, _ = pycocotools_eval(gt, dets)
    for name in STAT_NAMES:
        assert abs(got[name] - ref[name]) <= 1e-4, name


def test_overflow_is_reported():
    acc = COCOAccumulator(2, capacity=3, box_format="xyxy")
    boxes = np.array([[[0, 0, 10, 10]] * 4], np.float64)
    acc.update(boxes, [[0, 0, 0, 0]], np.zeros((1, 4)), np.full((1, 4), 100.0), boxes, [[0.9] * 4], [[0] * 4])
    with pytest.raises(ValueError, match="capacity=3"):
        acc.check()


def test_xyxy_input_and_ignore_flag():
    # xyxy boxes; an ignore-flagged (difficult) gt: the detection on it is neither TP nor FP,
    # and unlike a crowd it can be matched once only (the second detection on it is a FP)
    acc = COCOAccumulator(1, capacity=8, box_format="xyxy")
    gt = np.array([[[0, 0, 40, 40], [100, 100, 140, 140]]], np.float64)
    dets = np.array([[[0, 0, 40, 40], [100, 100, 140, 140], [100, 100, 140, 140]]], np.float64)
    acc.update(gt, [[0, 0]], [[0, 0]], [[1600.0, 1600.0]], dets, [[0.9, 0.8, 0.7]], [[0, 0, 0]],
               gt_ignore=[[False, True]])
    precision, recall = (x.numpy() for x in acc.result())
    stats = summarize(precision, recall)
    # one regular gt: TP at 0.9, ignored at 0.8, FP at 0.7 -> precision 1 up to recall 1
    assert stats["AP"] == pytest.approx(1.0, abs=1e-12) and stats["AR100"] == 1.0
