"""kdet.metrics.coco_device: the XLA-compiled streaming engine equals pycocotools / the numpy engine."""

import numpy as np
import pytest
import tensorflow as tf

from kdet.metrics.coco import STAT_NAMES, coco_evaluate, evaluate_arrays, load_coco_arrays
from kdet.metrics.coco_device import COCOAccumulator, padded_batches
from kdet.metrics._coco_common import summarize
from test_coco_eval import det, pycocotools_eval, random_workload
from _coco_cases import edge_case_workload, ignore_flag_case, uncut_update_arguments

BATCH, GT_WIDTH, DET_WIDTH = 8, 8, 48
NUM_CLASSES = 4


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


@pytest.mark.parametrize("jit_compile", [True, False])
def test_float32_within_1e4_of_pycocotools(jit_compile):
    gt, dets = random_workload(3, n_images=30, n_classes=3, max_random_dets=20)
    got = coco_evaluate(gt, dets, use_device=True, dtype="float32", batch_size=16, jit_compile=jit_compile)
    ref, _ = pycocotools_eval(gt, dets)
    for name in STAT_NAMES:
        assert abs(got[name] - ref[name]) <= 1e-4, name


def test_more_than_100_detections_per_image_on_the_device():
    """COCO keeps each image's 100 best detections per class: the device engine must cut there itself."""
    gt, dets = random_workload(0, n_images=3, n_classes=1, max_random_dets=20)
    # 105 top-scored misses in each image push every true positive past the 100th detection
    dets += [det(im["id"], 1, [2 * k, 199, 1, 1], 0.99) for im in gt["images"] for k in range(105)]
    assert pycocotools_eval(gt, dets)[0]["AR100"] == 0.0 < coco_evaluate(gt, dets[:-105])["AR100"]
    args = uncut_update_arguments(gt, dets)
    ref, ref_precision = pycocotools_eval(gt, dets)
    # float32 under XLA (as on an accelerator without float64); float64 in graph mode (XLA: the edge test)
    for dtype, tol, jit_compile in (("float32", 1e-4, True), ("float64", 1e-12, False)):
        acc = COCOAccumulator(1, capacity=args[4].shape[0] * args[4].shape[1], dtype=dtype, box_format="xywh")
        tf.function(acc.update, jit_compile=jit_compile)(*args)
        acc.check()
        precision, recall = (x.numpy() for x in tf.function(acc.result, jit_compile=jit_compile)())
        np.testing.assert_allclose(precision, ref_precision, atol=tol, rtol=0, err_msg=dtype)
        got = summarize(precision.astype(np.float64), recall.astype(np.float64))
        for name in STAT_NAMES:
            assert got[name] == pytest.approx(ref[name], abs=tol), (dtype, name)


def test_overflow_is_reported():
    acc = COCOAccumulator(2, capacity=3, box_format="xyxy")
    boxes = np.array([[[0, 0, 10, 10]] * 4], np.float64)
    acc.update(boxes, [[0, 0, 0, 0]], np.zeros((1, 4)), np.full((1, 4), 100.0), boxes, [[0.9] * 4], [[0] * 4])
    with pytest.raises(ValueError, match="capacity=3"):
        acc.check()


def test_xyxy_input_and_ignore_flag():
    # Ignored (difficult): 0.9 -> ignored, 0.85 -> FP (an ignored non-crowd gt matches once), 0.8 -> TP,
    # 0.7 -> FP. Ranked TP/FP of the rest: FP, TP, FP -> precision 0, 1/2, 1/3 at recall 0, 1, 1:
    # interpolated 1/2 at every recall threshold (every IoU threshold: the boxes are exact).
    precision, recall, stats = ignore_flag_case(gt_ignore=True, gt_crowd=False)
    np.testing.assert_allclose(precision, 0.5, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(recall, 1.0)
    assert stats["AP"] == pytest.approx(0.5, abs=1e-12)

    # No flag, two regular gts: TP, FP, TP, FP -> precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1:
    # interpolated 1 at recall thresholds 0..0.50 (51 of them), 2/3 at 0.51..1 (50).
    precision, recall, stats = ignore_flag_case(gt_ignore=False, gt_crowd=False)
    expected = np.r_[np.ones(51), np.full(50, 2 / 3)]
    np.testing.assert_allclose(precision, np.broadcast_to(expected, precision.shape), rtol=0, atol=1e-12)
    assert stats["AP"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)

    # Crowd: matches any number of detections -> 0.9, 0.85 ignored; TP, FP -> precision 1 everywhere.
    precision, _, stats = ignore_flag_case(gt_ignore=False, gt_crowd=True)
    np.testing.assert_allclose(precision, 1.0, rtol=0, atol=1e-12)
