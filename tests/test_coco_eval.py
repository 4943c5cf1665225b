"""kdet.metrics.coco against pycocotools (the reference) and hand-computed values."""

import contextlib
import copy
import io
import json
import re

import numpy as np
import pytest

from _helpers import run_tool
from kdet.metrics.coco import (STAT_NAMES, _detection_fields, _key_score_order, _positions, _stable_argsort,
                               coco_evaluate, load_coco_arrays)

pycoco = pytest.importorskip("pycocotools.cocoeval")
from pycocotools.coco import COCO  # noqa: E402


# ------------------------------------------------------------------ helpers
ONE = pytest.approx(1.0, abs=1e-12)


def pycocotools_eval(gt, dets):
    """pycocotools' 12 numbers and precision array (inputs are copied: it writes into them)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = pycoco.COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_NAMES, ev.stats)), ev.eval["precision"]


def _pycocotools_style_eval(module_coco, module_eval, gt, dets):
    """The 12 numbers of a pycocotools-compatible package (COCO / COCOeval / .stats)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = module_coco.COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = module_eval.COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_NAMES, [float(v) for v in ev.stats]))


def faster_coco_eval_eval(gt, dets):
    faster = pytest.importorskip("faster_coco_eval")
    return _pycocotools_style_eval(faster, faster.cocoeval, gt, dets)


def hotcoco_eval(gt, dets):
    hotcoco = pytest.importorskip("hotcoco")
    with contextlib.redirect_stdout(io.StringIO()):
        ev = hotcoco.COCOeval(hotcoco.COCO(copy.deepcopy(gt)), hotcoco.COCO(copy.deepcopy(gt)).load_res(
            copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_NAMES, [float(v) for v in ev.stats]))


def ultrafast_eval(gt, dets):
    ultrafast = pytest.importorskip("ultrafast_pycocotools")
    return _pycocotools_style_eval(ultrafast.coco, ultrafast.cocoeval, gt, dets)


# Independent implementations of the COCO protocol, each a further truth beside pycocotools
# (faster-coco-eval: C++; hotcoco: Rust; ultrafast-pycocotools: numpy). Skipped when not installed.
OTHER_REFERENCES = {"faster_coco_eval": faster_coco_eval_eval, "hotcoco": hotcoco_eval,
                    "ultrafast_pycocotools": ultrafast_eval}


def assert_matches_pycocotools(gt, dets, tol=1e-9):
    ref, ref_precision = pycocotools_eval(gt, dets)
    got = coco_evaluate(gt, dets, return_arrays=True)
    for name in STAT_NAMES:
        assert got[name] == pytest.approx(ref[name], abs=tol), name
    np.testing.assert_allclose(got["precision"], ref_precision, atol=tol, rtol=0)
    return got


def ground_truth(anns, n_images=2, n_classes=2):
    images = [{"id": i + 1, "width": 640, "height": 480} for i in range(n_images)]
    cats = [{"id": c + 1, "name": f"c{c + 1}"} for c in range(n_classes)]
    anns = [dict(a, id=a.get("id", k + 1), iscrowd=a.get("iscrowd", 0),
                 area=a.get("area", a["bbox"][2] * a["bbox"][3])) for k, a in enumerate(anns)]
    return {"images": images, "categories": cats, "annotations": anns}


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


def random_workload(seed, n_images=25, n_classes=4, max_gt=6, max_random_dets=30, crowd=0.1, size=200):
    """Random boxes on a coarse grid (so exact ties and equal IoUs occur), jittered detections."""
    rng = np.random.default_rng(seed)
    images = [{"id": int(i) * 3 + 1, "width": size, "height": size} for i in rng.permutation(n_images)]
    cats = [{"id": c * 2 + 1, "name": f"c{c}"} for c in range(n_classes)]
    anns, dets = [], []

    def box():
        x, y = rng.uniform(0, size * 0.8, 2).round(0)
        w, h = rng.uniform(2, size * 0.5, 2).round(0)
        return [float(x), float(y), float(w), float(h)]

    for im in images:
        for _ in range(rng.integers(0, max_gt + 1)):
            b, c = box(), int(rng.integers(n_classes)) * 2 + 1
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c, "bbox": b,
                         "area": float(b[2] * b[3] * rng.uniform(0.5, 1.2)), "iscrowd": int(rng.random() < crowd)})
            for _ in range(rng.integers(0, 4)):
                j = rng.normal(0, 0.15, 4) * np.array(b[2:] * 2)
                d = np.maximum(np.array(b) + j.round(1), [0, 0, 1, 1])
                cls = c if rng.random() < 0.85 else int(rng.integers(n_classes)) * 2 + 1
                dets.append(det(im["id"], cls, d.tolist(), float(np.round(rng.random(), 2))))
        for _ in range(rng.integers(0, max_random_dets)):
            dets.append(det(im["id"], int(rng.integers(n_classes)) * 2 + 1, box(), float(np.round(rng.random(), 2))))
    rng.shuffle(dets)
    return {"images": images, "categories": cats, "annotations": anns}, dets


def dense_workload(seed, n_images=6, n_classes=3):
    """Crowded images: many jittered copies of each ground truth (groups with one and with several
    candidates), > 100 detections in some image and category, scores on a 0.1 grid (ties), crowds,
    an image and a category without ground truth, boxes outside every area range."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "width": 300, "height": 300} for i in range(n_images)]
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(n_classes + 1)]   # the last one has no gt
    anns, dets = [], []
    for im in images[:-1]:                                                 # the last image has no gt
        for _ in range(rng.integers(1, 8)):
            c = int(rng.integers(n_classes)) + 1
            x, y, w, h = rng.integers(0, 200, 2).tolist() + rng.integers(4, 120, 2).tolist()
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c, "bbox": [x, y, w, h],
                         "area": float(w * h * rng.uniform(0.5, 1.1)), "iscrowd": int(rng.random() < 0.15)})
            for _ in range(rng.integers(0, 30)):
                jitter = rng.normal(0, 0.12, 4).round(1) * [w, h, w, h]
                dets.append(det(im["id"], c, np.maximum([x, y, w, h] + jitter, [0, 0, 1, 1]).tolist(),
                                float(rng.integers(0, 11) / 10)))
    for im in images:
        for _ in range(rng.integers(20, 60)):
            dets.append(det(im["id"], int(rng.integers(n_classes + 1)) + 1,
                            rng.integers(0, 250, 2).tolist() + rng.integers(1, 150, 2).tolist(),
                            float(rng.integers(0, 11) / 10)))
    first = anns[0]                                                        # > 100 detections near it
    for _ in range(110):
        box = np.maximum(np.array(first["bbox"]) + rng.normal(0, 6, 4).round(), 1).tolist()
        dets.append(det(first["image_id"], first["category_id"], box, float(rng.integers(0, 11) / 10)))
    dets.append(det(1, 1, [0, 0, 400, 400], 1.0))                         # larger than 'large' ranges
    rng.shuffle(dets)
    return {"images": images, "categories": cats, "annotations": anns}, dets


# ------------------------------------------------------------------ random workloads
@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_equal_pycocotools(seed):
    many = seed % 2 == 1  # odd seeds: >100 detections in an image and category
    gt, dets = random_workload(seed, n_classes=1 if many else 4, max_random_dets=160 if many else 30)
    assert_matches_pycocotools(gt, dets, tol=1e-12)


@pytest.mark.parametrize("reference", sorted(OTHER_REFERENCES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workloads_equal_other_coco_implementations(seed, reference):
    many = seed % 2 == 1
    gt, dets = random_workload(seed, n_classes=1 if many else 4, max_random_dets=160 if many else 30)
    ref = OTHER_REFERENCES[reference](gt, dets)
    got = coco_evaluate(gt, dets)
    for name in STAT_NAMES:
        assert got[name] == pytest.approx(ref[name], abs=1e-9), name


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_workloads_equal_pycocotools(seed):
    gt, dets = dense_workload(seed)
    ref, ref_precision = pycocotools_eval(gt, dets)
    got = coco_evaluate(gt, dets, return_arrays=True)
    np.testing.assert_array_equal(got["precision"], ref_precision)  # float64: diff 0
    assert [got[n] for n in STAT_NAMES] == [ref[n] for n in STAT_NAMES]


# ------------------------------------------------------------------ hand-made cases
def test_perfect_detection_is_ap_one():
    gt = ground_truth([{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50]}], n_classes=1)
    got = assert_matches_pycocotools(gt, [det(1, 1, [10, 10, 50, 50], 0.9)])
    # precision is tp / (tp + fp + eps), as in pycocotools: 1 - 2e-16
    assert got["AP"] == ONE and got["AR100"] == 1.0 and got["AP_medium"] == ONE
    assert got["AP_small"] == -1.0 and got["AP_large"] == -1.0  # no ground truth in those ranges
    assert got["per_class"] == {"c1": {"AP": ONE, "AP50": ONE}}


def test_iou_exactly_one_half_matches_at_050_only():
    # IoU = 100 / 200 = 0.5 exactly: a hit at t=0.50, a miss at 0.55..0.95
    gt = ground_truth([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}], n_classes=1)
    got = assert_matches_pycocotools(gt, [det(1, 1, [0, 0, 10, 20], 0.5)])
    assert got["AP50"] == ONE and got["AP75"] == 0.0
    assert got["AP"] == pytest.approx(0.1, abs=1e-12)


def test_no_detections_gives_zeros():
    # pycocotools raises IndexError on an empty result list; kdet: AP and AR are 0
    gt = ground_truth([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40]}], n_classes=1)
    got = coco_evaluate(gt, [])
    assert got["AP"] == 0.0 and got["AR100"] == 0.0 and got["AP_small"] == -1.0
    assert got["per_class"]["c1"] == {"AP": 0.0, "AP50": 0.0}


def test_image_without_ground_truth_and_class_without_ground_truth():
    gt = ground_truth([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40]}], n_images=3, n_classes=2)
    dets = [det(1, 1, [0, 0, 40, 40], 0.9), det(2, 1, [5, 5, 40, 40], 0.95),  # FP on an image without gt
            det(3, 2, [0, 0, 40, 40], 0.8)]                                    # class 2 has no gt
    got = assert_matches_pycocotools(gt, dets)
    # class 1: precision 1/2 at recall 1 -> AP 0.5 (101 points all at 0.5); class 2 excluded
    assert got["AP"] == pytest.approx(0.5, abs=1e-12)
    assert got["per_class"]["c2"] == {"AP": -1.0, "AP50": -1.0}


def test_crowd_region_ignores_many_detections():
    # crowd IoU is intersection over the detection's area: both small boxes inside it
    # are ignored (not FP); the regular ground truth is found
    anns = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "iscrowd": 1},
            {"image_id": 1, "category_id": 1, "bbox": [200, 200, 20, 20]}]
    dets = [det(1, 1, [10, 10, 20, 20], 0.9), det(1, 1, [50, 50, 20, 20], 0.8),
            det(1, 1, [200, 200, 20, 20], 0.7)]
    got = assert_matches_pycocotools(ground_truth(anns, n_images=1, n_classes=1), dets)
    assert got["AP"] == ONE


def test_equal_scores_tie_order_matches_pycocotools():
    anns = [{"image_id": i, "category_id": 1, "bbox": [0, 0, 30, 30]} for i in (1, 2)]
    dets = [det(2, 1, [0, 0, 30, 30], 0.5), det(1, 1, [60, 60, 30, 30], 0.5),
            det(1, 1, [0, 0, 30, 30], 0.5), det(2, 1, [60, 60, 30, 30], 0.5)]
    assert_matches_pycocotools(ground_truth(anns, n_classes=1), dets)


def test_more_than_100_detections_are_cut():
    anns = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 30, 30]}]
    dets = [det(1, 1, [100, 100, 30, 30], 0.9)] * 100 + [det(1, 1, [0, 0, 30, 30], 0.1)]
    got = assert_matches_pycocotools(ground_truth(anns, n_images=1, n_classes=1), dets)
    assert got["AR100"] == 0.0  # the true positive is the 101st detection


def test_annotation_area_decides_the_range():
    # a 100x100 box (large) whose annotation area is 500 (small)
    anns = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 500.0}]
    got = assert_matches_pycocotools(ground_truth(anns, n_images=1, n_classes=1), [det(1, 1, [0, 0, 100, 100], 0.9)])
    assert got["AP_small"] == ONE and got["AP_large"] == -1.0 and got["AP_medium"] == -1.0


def test_ground_truth_id_zero_counts_as_matched():
    # pycocotools takes gt id 0 for "unmatched" and scores this perfect detection as a FP
    gt = ground_truth([{"id": 0, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40]}], n_classes=1)
    assert coco_evaluate(gt, [det(1, 1, [0, 0, 40, 40], 0.9)])["AP"] == ONE
    assert pycocotools_eval(gt, [det(1, 1, [0, 0, 40, 40], 0.9)])[0]["AP"] == 0.0


def test_detection_on_unknown_image_names_it():
    gt = ground_truth([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40]}], n_classes=1)
    with pytest.raises(ValueError, match="image id 77"):
        coco_evaluate(gt, [det(77, 1, [0, 0, 40, 40], 0.9)])


def test_bad_files_give_clear_errors(tmp_path):
    bad = tmp_path / "gt.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="gt.json"):
        coco_evaluate(bad, [])
    with pytest.raises(ValueError, match="lacks the field 'score'"):
        coco_evaluate(ground_truth([], n_classes=1), [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])


def test_eval_tool_prints_summary_and_table(tmp_path):
    gt, dets = random_workload(7, n_images=5)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    done = run_tool("eval", "--gt", tmp_path / "gt.json", "--dets", tmp_path / "dets.json", "--json", tmp_path / "out.json")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    ref, _ = pycocotools_eval(gt, dets)
    assert f"Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = {ref['AP']:0.3f}" in out
    assert "c0" in out and "AP50" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["AP"] == pytest.approx(ref["AP"], abs=1e-12)


# ------------------------------------------------------------------ input readers and sorting
def test_fast_and_checked_readers_give_the_same_arrays():
    """Well-formed dicts are read field by field in bulk; anything else goes row by row (and names a bad
    entry): float ids, tuples, numpy scalars and annotations without area/iscrowd give the same arrays."""
    gt, dets = random_workload(2, n_images=8)
    plain = load_coco_arrays(gt, dets)
    odd_dets = [dict(d, image_id=float(d["image_id"]), bbox=tuple(d["bbox"]), score=np.float64(d["score"]))
                for d in dets]
    odd_dets[0]["category_id"] = np.int64(odd_dets[0]["category_id"])
    _detection_fields(dets)                       # the bulk reader takes the plain list...
    with pytest.raises(TypeError):
        _detection_fields(odd_dets)               # ...and leaves float ids to the checked one
    odd_gt = copy.deepcopy(gt)
    for a in odd_gt["annotations"][::2]:
        a["area"] = a["bbox"][2] * a["bbox"][3]
    plain_area = load_coco_arrays(odd_gt, dets)
    for a in odd_gt["annotations"][::2]:
        del a["area"]
    odd_gt["annotations"][1].pop("iscrowd")
    for field in ("det_image", "det_class", "det_xywh", "det_score", "det_rank", "det_source"):
        np.testing.assert_array_equal(getattr(load_coco_arrays(gt, odd_dets), field), getattr(plain, field), field)
    odd = load_coco_arrays(odd_gt, dets)
    for field in ("gt_image", "gt_class", "gt_xywh", "gt_area", "gt_source"):
        np.testing.assert_array_equal(getattr(odd, field), getattr(plain_area, field), field)
    assert not odd.gt_crowd[np.flatnonzero(odd.gt_source == 1)].any()


@pytest.mark.parametrize("bad, message", [
    (dict(category_id="RBC"), "detection 3 has category_id 'RBC', not a number"),
    (dict(image_id="1"), "detection 3 has image_id '1', not a number"),
    (dict(bbox=[0, 0, 10, 10, 5]), "detection 3 has bbox [0, 0, 10, 10, 5]; it must be 4 numbers"),
    (dict(score=[0.5]), "detection 3 has score [0.5], not a number"),
])
def test_bad_detection_is_named(bad, message):
    gt, dets = random_workload(2, n_images=4)
    dets[3] = dict(dets[3], **bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        coco_evaluate(gt, dets)


def test_stable_argsort_equals_numpys():
    rng = np.random.default_rng(0)
    cases = [rng.integers(-3, 3, 500), rng.integers(0, 2 ** 40, 500) // 2 ** 30, rng.integers(0, 2, 500).astype(bool),
             np.round(rng.normal(size=500), 1), np.where(rng.random(500) < 0.5, 0.0, -0.0), np.zeros(1), np.zeros(0)]
    for values in cases:
        np.testing.assert_array_equal(_stable_argsort(values), np.argsort(values, kind="stable"))


def test_key_score_order_equals_lexsort():
    """One float sort + one sort of packed keys == np.lexsort((rows, -scores, keys)), ties, -0.0 and the
    fallback for keys * ranks * rows past int64 included."""
    rng = np.random.default_rng(1)
    for n, n_keys, grid in [(2000, 7, 0.1), (2000, 300, 0.01), (50, 1, 0.5), (2, 2, 1.0), (1, 1, 1.0)]:
        keys = rng.integers(0, n_keys, n)
        scores = np.round(rng.normal(size=n) / grid) * grid
        scores[rng.random(n) < 0.1] = -0.0
        expected = np.lexsort((np.arange(n), -scores, keys))
        np.testing.assert_array_equal(_key_score_order(keys, n_keys, scores), expected)
        np.testing.assert_array_equal(_key_score_order(keys, 2 ** 62, scores), expected)   # the fallback


def test_positions_by_table_equal_searchsorted():
    """Ids -> positions through a lookup table (small id range) == the binary search: ids below, above and
    between the known ones, duplicated known ids (the first wins), negative ids."""
    rng = np.random.default_rng(2)
    for known in [np.unique(rng.integers(-5, 60, 30)), np.sort(rng.integers(0, 20, 25)), np.array([7])]:
        ids = rng.integers(-20, 90, 500)
        pos, found = _positions(known, ids)
        ref = np.searchsorted(known, ids)
        ref_found = (ref < len(known)) & (known[np.minimum(ref, len(known) - 1)] == ids)
        np.testing.assert_array_equal(found, ref_found)
        np.testing.assert_array_equal(pos[found], ref[ref_found])
    sparse = np.array([1, 10 ** 9])                       # a range too wide for a table: the binary search
    np.testing.assert_array_equal(_positions(sparse, np.array([10 ** 9, 5]))[1], [True, False])


def as_columns(dets):
    return {"image_id": np.array([d["image_id"] for d in dets]),
            "category_id": np.array([d["category_id"] for d in dets]),
            "bbox": np.array([d["bbox"] for d in dets], np.float64).reshape(-1, 4),
            "score": np.array([d["score"] for d in dets], np.float64)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_columns_equal_dicts_and_pycocotools(seed):
    """Detections as columns (arrays) give the dict path's numbers exactly, and pycocotools'."""
    gt, dets = dense_workload(seed) if seed == 2 else random_workload(seed, max_random_dets=160 if seed else 30)
    columns = as_columns(dets)
    ref, ref_precision = pycocotools_eval(gt, dets)
    got = coco_evaluate(gt, columns, return_arrays=True)
    from_dicts = coco_evaluate(gt, dets, return_arrays=True)
    np.testing.assert_array_equal(got["precision"], from_dicts["precision"])
    np.testing.assert_array_equal(got["recall"], from_dicts["recall"])
    assert got["per_class"] == from_dicts["per_class"]
    for name in STAT_NAMES:
        assert got[name] == from_dicts[name] == pytest.approx(ref[name], abs=1e-12), name
    np.testing.assert_allclose(got["precision"], ref_precision, atol=1e-12, rtol=0)
    odd = coco_evaluate(gt, columns, max_dets=[1, 5, 20], use_cats=False)
    assert odd == coco_evaluate(gt, dets, max_dets=[1, 5, 20], use_cats=False)
    assert coco_evaluate(gt, {k: v[:0] for k, v in columns.items()})["AP"] == 0.0


@pytest.mark.parametrize("change, message", [
    (dict(score=np.zeros(3)), "image_id, category_id and score must be 1-D of one length"),
    (dict(bbox=np.zeros((4, 5))), "bbox must be [4, 4]"),
    (dict(category_id=np.array(["a", "b", "c", "d"])), "column 'category_id' must hold numbers"),
    (dict(score=np.array(["x"] * 4)), "column 'score' is not an array of numbers"),
    (dict(bbox=np.array([[0, 0, 5, 5], [0, 0, 5, np.nan], [1, 1, 5, 5], [2, 2, 5, 5]])),
     "detection 1 (image id 4) has a non-finite bbox [0.0, 0.0, 5.0, nan]"),
])
def test_bad_columns_are_named(change, message):
    gt, dets = random_workload(2, n_images=4)
    columns = {k: v[:4] for k, v in as_columns([dict(d, image_id=4) for d in dets]).items()}
    with pytest.raises(ValueError, match=re.escape(message)):
        coco_evaluate(gt, dict(columns, **change))

