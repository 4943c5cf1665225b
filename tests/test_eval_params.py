"""Evaluator parameters (iou_thresholds, max_dets, area_ranges, use_cats) against pycocotools' Params,
on the host and device engines and in the callback; per-detection match records; the callback on
original image sizes."""

import contextlib
import copy
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from _helpers import REPO
from kdet.metrics.coco import OUTCOMES, coco_evaluate, eval_params, format_summary, match_records
from test_coco_eval import dense_workload, det, ground_truth, random_workload

pycoco = pytest.importorskip("pycocotools.cocoeval")
from pycocotools.coco import COCO  # noqa: E402

PARAM_SETS = {
    "iou_0.5_only": dict(iou_thresholds=[0.5]),
    "few_ious_few_dets": dict(iou_thresholds=[0.3, 0.5, 0.75, 0.9], max_dets=[1, 3, 5]),
    "max_dets_1000": dict(max_dets=[1, 10, 1000]),
    "own_areas": dict(area_ranges={"all": (0, 1e10), "tiny": (0, 20 ** 2), "big": (20 ** 2, 1e10)}),
    "no_cats": dict(use_cats=False),
    "no_cats_few_dets": dict(use_cats=False, max_dets=[1, 2, 4], iou_thresholds=[0.5, 0.75]),
    # IoU >= 0 holds for every pair: no detection can be left out of the greedy step
    "iou_zero_few_dets": dict(iou_thresholds=[0.0, 0.5, 0.75], max_dets=[1, 3, 10]),
}


def edge_case_workload():
    """Crowds, IoU exactly 0.5, equal scores, an image without gt, a class without gt, area != box area."""
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "iscrowd": 1},
        {"image_id": 1, "category_id": 1, "bbox": [200, 200, 20, 20]},
        {"image_id": 1, "category_id": 2, "bbox": [205, 200, 20, 20]},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10]},
        {"image_id": 2, "category_id": 2, "bbox": [0, 0, 100, 100], "area": 500.0},
        {"image_id": 3, "category_id": 2, "bbox": [0, 0, 30, 30]},
    ]
    dets = [det(1, 1, [10, 10, 20, 20], 0.9), det(1, 1, [50, 50, 20, 20], 0.5), det(1, 1, [200, 200, 20, 20], 0.5),
            det(1, 2, [200, 200, 20, 20], 0.5), det(2, 1, [0, 0, 10, 20], 0.5), det(2, 2, [0, 0, 100, 100], 0.7),
            det(3, 2, [60, 60, 30, 30], 0.7), det(3, 2, [0, 0, 30, 30], 0.7), det(4, 2, [0, 0, 30, 30], 0.95),
            det(4, 3, [0, 0, 30, 30], 0.6), det(2, 1, [0, 0, 10, 10], 0.5)]
    return ground_truth(anns, n_images=4, n_classes=4), dets


def pycocotools_with(gt, dets, iou_thresholds=None, max_dets=None, area_ranges=None, use_cats=True):
    """pycocotools' stats, precision and recall with the same Params."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = pycoco.COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        if iou_thresholds is not None:
            ev.params.iouThrs = np.asarray(iou_thresholds, np.float64)
        if max_dets is not None:
            ev.params.maxDets = list(max_dets)
        if area_ranges is not None:
            ev.params.areaRngLbl = list(area_ranges)
            ev.params.areaRng = [list(v) for v in area_ranges.values()]
        ev.params.useCats = int(use_cats)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats, ev.eval["precision"], ev.eval["recall"]


def workload(case):
    if case == "edge":
        return edge_case_workload()
    if case == "dense":
        return dense_workload(0)
    return random_workload(int(case[-1]), n_images=12, n_classes=3, max_random_dets=10)


@pytest.mark.parametrize("case", ["edge", "random0", "random1", "dense"])
@pytest.mark.parametrize("name", list(PARAM_SETS))
def test_host_engine_equals_pycocotools_params(case, name):
    gt, dets = workload(case)
    params = PARAM_SETS[name]
    ref_stats, ref_precision, ref_recall = pycocotools_with(gt, dets, **params)
    got = coco_evaluate(gt, dets, return_arrays=True, **params)
    np.testing.assert_array_equal(got["precision"], ref_precision)  # float64: diff 0
    np.testing.assert_array_equal(got["recall"], ref_recall)
    if name in ("iou_0.5_only", "no_cats"):  # pycocotools' own 12 lines are defined here
        names = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                 "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large"]
        for k, stat in enumerate(names):
            assert got.get(stat, -1.0) == pytest.approx(ref_stats[k], abs=1e-15), stat
    assert ref_precision[..., 0, -1].size and got["AP"] == pytest.approx(_mean_kept(ref_precision[..., 0, -1]), abs=1e-15)


def _mean_kept(values):
    kept = values[values > -1]
    return float(np.mean(kept)) if kept.size else -1.0


@pytest.mark.parametrize("name", ["few_ious_few_dets", "own_areas", "no_cats_few_dets"])
def test_device_engine_equals_pycocotools_params(name):
    gt, dets = workload("random0")
    params = PARAM_SETS[name]
    _, ref_precision, ref_recall = pycocotools_with(gt, dets, **params)
    got = coco_evaluate(gt, dets, return_arrays=True, use_device=True, jit_compile=False, batch_size=4, **params)
    np.testing.assert_array_equal(got["precision"], ref_precision)
    np.testing.assert_array_equal(got["recall"], ref_recall)


def test_device_engine_under_xla_with_params():
    gt, dets = workload("edge")
    params = PARAM_SETS["no_cats_few_dets"]
    _, ref_precision, ref_recall = pycocotools_with(gt, dets, **params)
    got = coco_evaluate(gt, dets, return_arrays=True, use_device=True, jit_compile=True, batch_size=4, **params)
    np.testing.assert_array_equal(got["precision"], ref_precision)
    np.testing.assert_array_equal(got["recall"], ref_recall)


def test_summary_lines_use_the_max_dets_asked_for():
    gt, dets = workload("random1")
    ref_stats, ref_precision, _ = pycocotools_with(gt, dets, max_dets=[1, 10, 1000])
    assert ref_stats[0] == -1  # pycocotools: its first line looks for maxDets=100
    got = coco_evaluate(gt, dets, max_dets=[1, 10, 1000])
    assert got["AP"] == pytest.approx(_mean_kept(ref_precision[..., 0, 2]), abs=1e-15) and got["AP"] > 0
    assert "AR1000" in got and "AR100" not in got
    text = format_summary(got)  # the params travel in the result
    lines = text.splitlines()
    assert len(lines) == 12 and "-1.000" not in lines[0] + lines[8]
    assert "maxDets=1000 ] =" in lines[0] and "maxDets=  1 ]" in lines[6] and "maxDets=1000 ]" in lines[8]
    assert json.loads(json.dumps(got))["params"]["max_dets"] == [1, 10, 1000]
    assert "params" not in coco_evaluate(gt, dets)  # defaults: the result is as before


def test_bad_params_are_rejected():
    with pytest.raises(ValueError, match="max_dets"):
        eval_params(max_dets=[10, 1])
    with pytest.raises(ValueError, match="iou_thresholds"):
        eval_params(iou_thresholds=[1.5])
    with pytest.raises(ValueError, match="area_ranges"):
        eval_params(area_ranges={"all": (10, 0)})


# ------------------------------------------------------------------ match records
def test_match_records_by_hand():
    gt = {"images": [{"id": 1}, {"id": 2}],
          "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
          "annotations": [
              {"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40]},
              {"id": 8, "image_id": 1, "category_id": 1, "bbox": [100, 100, 50, 50], "iscrowd": 1},
              {"id": 9, "image_id": 2, "category_id": 2, "bbox": [0, 0, 40, 40]}]}
    dets = [det(1, 1, [0, 0, 40, 40], 0.9),      # tp
            det(1, 1, [2, 0, 40, 40], 0.8),      # IoU 0.905 with the taken cat: duplicate
            det(1, 1, [110, 110, 20, 20], 0.7),  # inside the crowd region: ignored
            det(1, 1, [20, 0, 40, 40], 0.6),     # IoU 1/3 with the cat: localisation at 0.5
            det(2, 1, [0, 0, 40, 40], 0.5),      # a cat on the dog: other class
            det(2, 1, [300, 300, 9, 9], 0.4),    # nothing there: background (tiny: outside 'medium')
            det(2, 2, [0, 0, 40, 40], 0.3)]      # tp
    records = match_records(gt, dets)
    assert records.det_index.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert records.outcome_names(iou=0.5) == ["tp", "fp_duplicate", "ignored_crowd", "fp_localization",
                                              "fp_other_class", "fp_background", "tp"]
    t50 = 0
    assert records.gt_index[:, t50, 0].tolist() == [0, -1, 1, -1, -1, -1, 2]  # positions in annotations
    assert records.ignored[:, t50, 0].tolist() == [False, False, True, False, False, False, False]
    # at IoU 0.95 the second detection no longer overlaps enough to be a duplicate: localisation
    assert records.outcome_names(iou=0.95)[1] == "fp_localization"
    # area 'medium' (32^2..96^2): the 9x9 background box is outside it, ignored
    assert records.outcome_names(iou=0.5, area="medium")[5] == "ignored"
    assert records.counts(iou=0.5)[1]["tp"] == 1 and records.counts(iou=0.5)[2]["tp"] == 1
    with pytest.raises(ValueError, match="not evaluated"):
        records.counts(iou=0.52)
    # one category: the cat box on the dog now matches it
    assert match_records(gt, dets, use_cats=False).outcome[:, t50, 0].tolist().count(OUTCOMES.index("tp")) == 2


@pytest.mark.parametrize("use_cats", [True, False])
def test_match_records_reproduce_recall(use_cats):
    gt, dets = workload("random0")
    result = coco_evaluate(gt, dets, return_arrays=True, use_cats=use_cats)
    records = match_records(gt, dets, use_cats=use_cats)
    tp = records.outcome == OUTCOMES.index("tp")
    fp = np.isin(records.outcome, [OUTCOMES.index(n) for n in OUTCOMES if n.startswith("fp_")])
    assert not np.any(tp & records.ignored) and np.all(tp | fp | records.ignored) and tp.sum() and fp.sum()
    lo, hi = records.params.area_bounds
    category_ids = sorted(c["id"] for c in gt["categories"]) if use_cats else [-1]
    for k, c in enumerate(category_ids):
        anns = [a for a in gt["annotations"] if (a["category_id"] == c or not use_cats) and not a["iscrowd"]]
        area = np.array([a["area"] for a in anns])
        npig = ((area[:, None] >= lo) & (area[:, None] <= hi)).sum(0)           # [A], counted here by hand
        tp_count = tp[records.category_id == c].sum(0)                          # [T, A]
        expected = np.where(npig > 0, tp_count / np.maximum(npig, 1), -1)
        np.testing.assert_allclose(result["recall"][:, k, :, -1], expected, rtol=0, atol=1e-12)


def test_eval_tool_prints_the_false_positive_breakdown(tmp_path):
    gt, dets = edge_case_workload()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    out = subprocess.run([sys.executable, str(REPO / "tools" / "eval.py"), "--gt", str(tmp_path / "gt.json"),
                          "--dets", str(tmp_path / "dets.json")], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("detections at IoU 0.50"))
    rows = {}
    for line in lines[head + 2:]:
        if not line.strip():
            break
        rows[line.split()[0]] = [int(v) for v in line.split()[1:]]
    records = match_records(gt, dets).counts(iou=0.5)
    # c1: image 1: tp on (200,200), the crowd swallows one, the (10,10) box lies in the crowd too;
    # image 2: (0,0,10,20) vs the 10x10 cat: IoU 0.5 -> tp, the later exact box is a duplicate
    assert rows["c1"][:5] == [records[1][k] for k in ("tp", "fp_duplicate", "fp_other_class",
                                                         "fp_localization", "fp_background")]
    assert rows["c1"][0] == 2 and rows["c1"][1] == 1 and rows["c1"][5] == 2  # 2 TP, 1 dup, 2 crowd


# ------------------------------------------------------------------ the callback
def _fixed_detector_fit(dataset, detections, **callback_kwargs):
    from test_coco_callback import CLASS_NAMES, FixedDetector

    from kdet.metrics.callback import COCOEvalCallback

    model = FixedDetector(*detections)
    model.compile(optimizer="sgd", loss="mse")
    callback = COCOEvalCallback(dataset, class_names=CLASS_NAMES, jit_compile=False, verbose=0, **callback_kwargs)
    callback.set_model(model)
    return callback.evaluate()


def _json_at_sizes(targets, detections, sizes):
    """COCO json of the callback workload with image i at ``sizes[i]`` = (height, width) pixels."""
    from test_coco_callback import CLASS_NAMES

    boxes, scores, classes = detections
    gt = {"images": [{"id": i + 1, "width": int(w), "height": int(h)} for i, (h, w) in enumerate(sizes)],
          "categories": [{"id": c + 1, "name": n} for c, n in enumerate(CLASS_NAMES)], "annotations": []}
    dets = []
    for i, (h, w) in enumerate(sizes):
        scale = np.array([w, h, w, h], np.float64)
        for row in targets[i][targets[i][:, 4] >= 0]:
            x1, y1, x2, y2 = row[:4].astype(np.float64) * scale
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1,
                                      "category_id": int(row[4]) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                      "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for b, s, c in zip(boxes[i], scores[i], classes[i]):
            if c >= 0:
                x1, y1, x2, y2 = b.astype(np.float64) * scale
                dets.append({"image_id": i + 1, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "score": float(s)})
    return gt, dets


def test_callback_uses_original_image_sizes_from_meta():
    from test_coco_callback import NUM_IMAGES, make_data

    images, targets, detections = make_data()  # model input 48 x 64
    sizes = np.array([(480, 640) if i % 2 else (96, 160) for i in range(NUM_IMAGES)], np.int32)
    meta = dict(index=np.arange(NUM_IMAGES, dtype=np.int32), height=sizes[:, 0], width=sizes[:, 1])
    dataset = tf.data.Dataset.from_tensor_slices((images, targets, meta)).batch(5)
    got = _fixed_detector_fit(dataset, detections)
    reference = coco_evaluate(*_json_at_sizes(targets, detections, sizes))
    at_input = coco_evaluate(*_json_at_sizes(targets, detections, [(48, 64)] * NUM_IMAGES))
    assert reference["AP_small"] != at_input["AP_small"]  # the workload tells the two apart
    for name, value in reference.items():
        if name != "per_class":
            assert got[name] == pytest.approx(value, abs=1e-12), name
    # without meta: the model input's pixels, as before
    plain = _fixed_detector_fit(tf.data.Dataset.from_tensor_slices((images, targets)).batch(5), detections)
    assert plain["AP_small"] == pytest.approx(at_input["AP_small"], abs=1e-12)


def test_callback_with_params_equals_coco_evaluate():
    from test_coco_callback import NUM_IMAGES, make_data

    images, targets, detections = make_data(seed=1)
    params = dict(use_cats=False, max_dets=[1, 3, 5], iou_thresholds=[0.5, 0.75])
    got = _fixed_detector_fit(tf.data.Dataset.from_tensor_slices((images, targets)).batch(5), detections, **params)
    reference = coco_evaluate(*_json_at_sizes(targets, detections, [(48, 64)] * NUM_IMAGES), **params)
    assert set(got) - {"per_class"} == set(reference) - {"per_class", "params"}
    for name in set(got) - {"per_class"}:
        assert got[name] == pytest.approx(reference[name], abs=1e-12), name
