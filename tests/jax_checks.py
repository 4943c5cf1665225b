"""The device COCO engine, COCOEvalCallback and the task-aligned assigner under KERAS_BACKEND=jax, in one process.

tests/test_coco_jax.py runs this file in a subprocess (the pytest process runs TensorFlow);
``python tests/jax_checks.py`` with KERAS_BACKEND=jax runs it by hand. Prints one line per
check, ``ok NAME`` or ``FAIL NAME: why``, and exits 1 when any failed.
"""

import os
import sys
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import keras  # noqa: E402

from _coco_cases import (CLASS_NAMES, FixedDetector, ValBatches, as_coco_json, edge_case_workload,  # noqa: E402
                         ignore_flag_case, make_data, uncut_update_arguments)
from kdet.metrics._coco_common import STAT_NAMES, summarize  # noqa: E402
from kdet.metrics.callback import COCOEvalCallback  # noqa: E402
from kdet.metrics.coco import coco_evaluate, evaluate_arrays, load_coco_arrays  # noqa: E402
from kdet.metrics.coco_device import COCOAccumulator, padded_batches, to_numpy  # noqa: E402
from test_coco_eval import det, pycocotools_eval, random_workload  # noqa: E402

BATCH, GT_WIDTH, DET_WIDTH, NUM_CLASSES = 8, 8, 48, 4
TOLERANCE = {"float64": 1e-9, "float32": 1e-4}
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def assert_stats_close(got, ref, tol, what):
    for name in STAT_NAMES:
        assert abs(got[name] - ref[name]) <= tol, f"{what}: {name} {got[name]} vs {ref[name]}"


def run_padded(arr, dtype):
    acc = COCOAccumulator(NUM_CLASSES, capacity=32 * DET_WIDTH, dtype=dtype, box_format="xywh")
    update, result = acc.compiled(jit_compile=True)
    for batch in padded_batches(arr, BATCH, gt_width=GT_WIDTH, det_width=DET_WIDTH):
        update(*batch)
    acc.check()
    return (to_numpy(x).astype(np.float64) for x in result())


@check
def edge_cases_and_random_workload_equal_host_evaluator():
    """float64: precision / recall arrays identical to the host evaluator; float32 within 1e-4."""
    cases = {"edge": edge_case_workload(),
             "random": random_workload(1, n_images=20, n_classes=NUM_CLASSES, max_gt=GT_WIDTH, max_random_dets=12)}
    for dtype in ("float64", "float32"):
        for name, (gt, dets) in cases.items():
            arr = load_coco_arrays(gt, dets)
            precision, recall = run_padded(arr, dtype)
            ref_precision, ref_recall = evaluate_arrays(arr)
            if dtype == "float64":
                np.testing.assert_array_equal(precision, ref_precision, err_msg=name)
                np.testing.assert_array_equal(recall, ref_recall, err_msg=name)
            assert_stats_close(summarize(precision, recall), coco_evaluate(gt, dets), TOLERANCE[dtype], f"{name} {dtype}")


@check
def float64_leaves_the_global_x64_setting_alone():
    assert not jax.config.jax_enable_x64, "the checks must start without x64"
    acc = COCOAccumulator(2, capacity=4, dtype="float64")
    assert to_numpy(acc.result()[0]).dtype == np.float64 and not jax.config.jax_enable_x64
    assert keras.ops.convert_to_tensor(np.zeros(1)).dtype == np.float32  # the user's default is untouched


@check
def more_than_100_detections_per_image_are_cut():
    gt, dets = random_workload(0, n_images=3, n_classes=1, max_random_dets=20)
    dets += [det(im["id"], 1, [2 * k, 199, 1, 1], 0.99) for im in gt["images"] for k in range(105)]
    args = uncut_update_arguments(gt, dets)
    ref, ref_precision = pycocotools_eval(gt, dets)
    acc = COCOAccumulator(1, capacity=args[4].shape[0] * args[4].shape[1], dtype="float64", box_format="xywh")
    update, result = acc.compiled()
    update(*args)
    precision, recall = (to_numpy(x) for x in result())
    np.testing.assert_allclose(precision, ref_precision, atol=1e-12, rtol=0)
    assert_stats_close(summarize(precision, recall), ref, 1e-12, "cut")


@check
def ignore_flag_and_crowd_by_hand():
    precision, recall, stats = ignore_flag_case(gt_ignore=True, gt_crowd=False)
    np.testing.assert_allclose(precision, 0.5, rtol=0, atol=1e-12)
    assert abs(stats["AP"] - 0.5) <= 1e-12 and np.all(recall == 1.0)
    _, _, stats = ignore_flag_case(gt_ignore=False, gt_crowd=False)
    assert abs(stats["AP"] - (51 + 50 * 2 / 3) / 101) <= 1e-12
    precision, _, stats = ignore_flag_case(gt_ignore=False, gt_crowd=True)
    np.testing.assert_allclose(precision, 1.0, rtol=0, atol=1e-12)
    assert abs(stats["AP"] - 1.0) <= 1e-12


def fit_and_log(val, epochs=1, **kwargs):
    images, targets, detections = make_data()
    model = FixedDetector(*detections)
    model.compile(optimizer="sgd", loss="mse")
    callback = COCOEvalCallback(val, class_names=CLASS_NAMES, verbose=0, **kwargs)
    history = model.fit(ValBatches(images, np.zeros((len(images), 1), np.float32), 6), epochs=epochs,
                        callbacks=[callback], verbose=0)
    return history.history, coco_evaluate(*as_coco_json(targets, detections))


@check
def callback_with_pydataset_fit_logs_coco_evaluate():
    """model.fit on a PyDataset; validation batches of 5 (short last one), of 1 image; float32 too."""
    images, targets, _ = make_data()
    for batch_size, dtype in ((5, "float64"), (1, "float64"), (5, "float32")):
        logs, reference = fit_and_log(ValBatches(images, targets, batch_size), dtype=dtype)
        got = {name: logs["val_" + name][0] for name in STAT_NAMES}
        assert_stats_close(got, reference, TOLERANCE[dtype], f"batches of {batch_size}, {dtype}")
    assert reference["AP"] > 0.05


@check
def callback_with_tf_data_under_jax():
    """A tf.data validation set (read as numpy) and numpy fit input, where TensorFlow is installed."""
    try:
        import tensorflow as tf
    except ImportError:
        print("  (TensorFlow absent: tf.data check skipped)")
        return
    images, targets, _ = make_data()
    val = tf.data.Dataset.from_tensor_slices((images, targets)).batch(5)
    logs, reference = fit_and_log(val, epochs=2, every_n_epochs=2)
    assert len(logs["val_AP"]) == 1
    assert_stats_close({n: logs["val_" + n][0] for n in STAT_NAMES}, reference, 1e-9, "tf.data")


@check
def task_aligned_match_hand_worked_under_jax():
    """tests/test_loss_levers.py's hand-worked case (4 anchors, objects A, ignore B, C), under JAX."""
    from keras import ops

    from kdet.matching import task_aligned_match

    anchors = np.array([[[i / 4, 0, (i + 1) / 4, 1] for i in range(4)]], np.float32)
    gt = np.array([[[0, 0.2, 0.5, 0.8], [0.5, 0.2, 1.0, 0.8], [0.2, 0.1, 0.6, 0.9], [0, 0, 0, 0]]], np.float32)
    classes, ignore = np.array([[0, 1, 2, -1]]), np.array([[False, True, False, False]])
    pred = np.array([[[0, 0.2, 0.5, 0.8], [0.25, 0.2, 0.5, 0.8], [0.5, 0, 0.75, 1], [0.75, 0, 1, 1]]], np.float32)
    scores = np.array([[[0.5, 0, 0], [0.1, 0, 0.9], [0, 0.6, 0], [0, 0.3, 0]]], np.float32)
    for top_k, labels, soft in ((2, [1, 1, -1, -1], [1.0, (0.1 / 64) / 0.5, 0, 0]),
                                (1, [1, 3, -1, 0], [1.0, 0.46875, 0, 0])):
        _, got_labels, got_soft = task_aligned_match(gt, classes, ignore, anchors, pred, scores, top_k=top_k)
        np.testing.assert_array_equal(ops.convert_to_numpy(got_labels)[0], labels)
        np.testing.assert_allclose(ops.convert_to_numpy(got_soft)[0], soft, rtol=1e-5)


def main():
    assert keras.backend.backend() == "jax", "run with KERAS_BACKEND=jax"
    failed = 0
    for fn in CHECKS:
        try:
            fn()
            print(f"ok {fn.__name__}", flush=True)
        except Exception:  # report every check, then fail
            failed += 1
            print(f"FAIL {fn.__name__}:\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
