"""The run report: hand-computed P/R/F1, COCO AP against pycocotools, findings on built cases,
tools/report.py WORK_DIR as a user runs it."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from _helpers import REPO, box, det, gt
from kdet.metrics import run_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ a work dir by hand
def coco_files(gts, dets, class_names, size=100, paths=None):
    """COCO ground truth and results for per-image ``gt`` / ``det`` dicts (pixel xyxy)."""
    images, annotations, results = [], [], []
    for i, (g, d) in enumerate(zip(gts, dets), start=1):
        images.append(dict(id=i, file_name=f"{i}.jpg", width=size, height=size,
                           **({"kdet_image_path": paths[i - 1]} if paths else {})))
        for b, c in zip(np.asarray(g["boxes"], float).reshape(-1, 4), g["classes"]):
            annotations.append(dict(id=len(annotations) + 1, image_id=i, category_id=int(c) + 1, iscrowd=0,
                                    bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], area=(b[2] - b[0]) * (b[3] - b[1])))
        for b, s, c in zip(np.asarray(d["boxes"], float).reshape(-1, 4), d["scores"], d["classes"]):
            results.append(dict(image_id=i, category_id=int(c) + 1, score=float(s),
                                bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]]))
    categories = [dict(id=k + 1, name=n) for k, n in enumerate(class_names)]
    return dict(images=images, annotations=annotations, categories=categories), results


def write_work_dir(path, gts, dets, class_names, size=100, preflight=None, log=None, train=None, paths=None,
                   nms=None):
    os.makedirs(path, exist_ok=True)
    truth, results = coco_files(gts, dets, class_names, size, paths)
    (path / "ground_truth.json").write_text(json.dumps(truth))
    (path / "test_detections.json").write_text(json.dumps(results))
    (path / "report_config.json").write_text(json.dumps(dict(class_names=class_names, image_size=size,
                                                              score_threshold=0.25, eval_score_threshold=0.01,
                                                              **({"nms": nms} if nms else {}))))
    if preflight is not None:
        (path / "preflight.json").write_text(json.dumps(preflight))
    if log is not None:
        (path / "log.csv").write_text(log)
    if train is not None:
        truth, results = coco_files(*train, class_names, size)
        (path / "train_ground_truth.json").write_text(json.dumps(truth))
        (path / "train_detections.json").write_text(json.dumps(results))
    return path


def report(tmp_path, *args, **kwargs):
    return run_report.write_run_report(str(write_work_dir(tmp_path / "w", *args, **kwargs)), verbose=False, plots=False)


def kinds(found):
    return [text.split(":")[0] for text in found]


# ------------------------------------------------------------------ P / R / F1, hand-computed
def ranked_case():
    """One class, 4 objects in 2 images; detections 0.9 TP, 0.8 FP, 0.7 TP, 0.6 TP, 0.3 FP."""
    objects = [box(0, 0), box(20, 20), box(40, 40), box(60, 60)]
    gts = [gt(objects[:2], [0, 0]), gt(objects[2:], [0, 0])]
    dets = [det([objects[0], box(80, 0), objects[1]], [0.9, 0.8, 0.7], [0, 0, 0]),
            det([objects[2], box(80, 80)], [0.6, 0.3], [0, 0])]
    return gts, dets


def test_table_precision_recall_f1_and_optimum_by_hand(tmp_path):
    out = report(tmp_path, *ranked_case(), ["cell"])
    row = out["table"]["cell"]
    # Cuts: 0.9 P 1 R .25 F1 .4; 0.8 P .5 R .25 F1 .333; 0.7 P 2/3 R .5 F1 .571;
    #       0.6 P .75 R .75 F1 .75 (best); 0.3 P .6 R .75 F1 .667.
    assert row["best_threshold"] == pytest.approx(0.6)
    assert (row["best_precision"], row["best_recall"], row["best_f1"]) == pytest.approx((0.75, 0.75, 0.75))
    # At the report threshold 0.25 all five count: 3 TP, 2 FP -> P .6, R .75, F1 2*.6*.75/1.35 = .6667.
    assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((0.6, 0.75, 2 / 3))
    assert (row["images"], row["instances"], row["detections"]) == (2, 4, 5)


def test_confidence_curves_by_hand():
    gts, dets = ranked_case()
    grid = np.array([0.0, 0.65, 0.85, 0.95])
    curve = run_report.confidence_curves(gts, dets, ["cell"], grid=grid)["cell"]
    # >= 0: 5 dets 3 TP; >= .65: .9 .8 .7 -> 2 TP of 3; >= .85: .9 -> 1 of 1; >= .95: none.
    np.testing.assert_allclose(curve["precision"][:3], [0.6, 2 / 3, 1.0])
    assert np.isnan(curve["precision"][3])
    np.testing.assert_allclose(curve["recall"], [0.75, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(curve["f1"], [2 / 3, 4 / 7, 0.4, 0.0])


def test_ap_columns_equal_pycocotools(tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(3)
    gts, dets = [], []
    for _ in range(6):
        xy = rng.uniform(0, 70, (4, 2))
        objects = np.c_[xy, xy + rng.uniform(8, 30, (4, 2))]
        classes = rng.integers(0, 2, 4).tolist()
        jitter = objects + rng.normal(0, 3, objects.shape)
        gts.append(gt(objects, classes))
        dets.append(det(np.r_[jitter, objects[:2] + 15], rng.uniform(0, 1, 6).tolist(),
                        classes + rng.integers(0, 2, 2).tolist()))
    out = report(tmp_path, gts, dets, ["a", "b"])
    coco = COCO(str(tmp_path / "w" / "ground_truth.json"))
    evaluator = COCOeval(coco, coco.loadRes(str(tmp_path / "w" / "test_detections.json")), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert out["table"]["all"]["AP50_95"] == pytest.approx(evaluator.stats[0], abs=1e-12)
    assert out["table"]["all"]["AP50"] == pytest.approx(evaluator.stats[1], abs=1e-12)
    for k, name in enumerate(["a", "b"]):
        evaluator.params.catIds = [k + 1]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert out["table"][name]["AP50"] == pytest.approx(evaluator.stats[1], abs=1e-12)


# ------------------------------------------------------------------ findings
def test_over_detection_named_and_explained(tmp_path):
    from test_reports import over_detecting_model

    found = report(tmp_path, *over_detecting_model(), ["cell"], size=400)["findings"]
    text = found[0]
    # 4 TP among 400 boxes: precision 0.01 at 0.01; all four TPs score 0.9, so AP50 = 1.
    assert text.startswith("Over-detection") and "'precision 0.01 but mAP 1.00'" in text
    assert "F1-optimal threshold 0.90 precision is 1.00" in text


def good_model():
    gts = [gt([box(0, 0, 30), box(50, 50, 30)], [0, 1]) for _ in range(4)]
    dets = [det([box(0, 0, 30), box(50, 50, 30)], [0.9, 0.8], [0, 1]) for _ in range(4)]
    return gts, dets


def test_no_findings_for_a_good_model(tmp_path):
    out = report(tmp_path, *good_model(), ["a", "b"], train=good_model())
    assert out["findings"] == []
    assert "findings (0)" in out["text"]


NMS = dict(score_threshold=0.01, iou_threshold=0.45, max_detections=200, pre_nms_top_k=400, class_agnostic=False,
           per_class_top_k=False)


def test_candidate_cap_is_named_only_when_a_wider_cap_scores_higher(tmp_path):
    # good_model scores AP 1.0 / AP50 1.0; a wider cap said to score 1.0 too: harmless, no finding
    nms = dict(NMS, candidates=[100, 900, 1000, 1250], wider=dict(pre_nms_top_k=1250, AP=1.0, AP50=1.0))
    assert report(tmp_path, *good_model(), ["a", "b"], train=good_model(), nms=nms)["findings"] == []
    # the detections as a cap of 400 left them: one 'b' of four missed: COCO's 101-point AP of 'b' is
    # 76 / 101 (recall 0.75 at precision 1), so AP = AP50 = (1 + 76 / 101) / 2 = 0.876: +0.124
    gts, dets = good_model()
    dets[0] = det([box(0, 0, 30)], [0.9], [0])
    nms["wider"] = dict(pre_nms_top_k=1600, AP=1.0, AP50=1.0)
    found = report(tmp_path / "w2", gts, dets, ["a", "b"], nms=nms)["findings"]
    assert kinds(found)[0] == "Candidate cap"
    assert "on 3 of 4 images" in found[0] and "than eval.pre_nms_top_k=400" in found[0]
    assert "with eval.pre_nms_top_k=1600 score AP 1.000 (+0.124) and AP50 1.000 (+0.124)" in found[0]
    per_class = dict(nms, per_class_top_k=True)
    found = report(tmp_path / "w3", gts, dets, ["a", "b"], nms=per_class)["findings"]
    assert "pairs of one class scored" in found[0]


def test_wider_cap_check_rescoring_with_four_times_the_cap_only_when_it_binds(monkeypatch):
    import kdet.inference as inference

    gts, dets = good_model()
    truth, _ = coco_files(gts, dets, ["a", "b"])
    records = [types.SimpleNamespace(image_id=i) for i in range(1, 5)]
    caps = []

    def predict_records(model, records, recipe):  # the cap decides: below 1000 the first image loses an object
        cap = recipe["eval"]["pre_nms_top_k"]
        caps.append(cap)
        out = [dict(boxes=np.asarray(d["boxes"], np.float32), scores=np.asarray(d["scores"]),
                    classes=np.asarray(d["classes"])) for d in dets]
        if cap < 1000:
            out[0] = {k: v[:1] for k, v in out[0].items()}
        return out

    monkeypatch.setattr(inference, "predict_records", predict_records)
    recipe = dict(eval=dict(pre_nms_top_k=400))
    assert run_report.wider_cap_check(None, recipe, records, truth, [100, 200, 300, 400]) is None and caps == []
    wider = run_report.wider_cap_check(None, recipe, records, truth, [100, 900, 1000, 2000])
    assert caps == [1600] and wider == dict(pre_nms_top_k=1600, AP=1.0, AP50=1.0)
    assert run_report.wider_cap_check(None, recipe, records, truth, [500] * 4)["pre_nms_top_k"] == 500  # the most seen
    assert recipe == dict(eval=dict(pre_nms_top_k=400))  # the recipe is not changed


def starved_small_class():
    """'big' (30 px) found at 0.9 in 6 images; 'tiny' (4 px) found in 1 of 6 and low-scored."""
    gts, dets = [], []
    for i in range(6):
        gts.append(gt([box(10, 10, 30), box(70, 70, 4)], [0, 1]))
        tiny = [box(70, 70, 4)] if i == 0 else []
        dets.append(det([box(10, 10, 30)] + tiny, [0.9] + [0.3] * len(tiny), [0] + [1] * len(tiny)))
    return gts, dets


STARVED_PREFLIGHT = dict(
    match_iou=0.5,
    classes=dict(big=dict(images=60, objects=600, share=0.95), tiny=dict(images=20, objects=30, share=0.05)),
    anchor_coverage=dict(per_class=dict(big=dict(covered=0.99, positives_per_box=8.0),
                                        tiny=dict(covered=0.2, positives_per_box=1.1))),
    sizes_at_input=dict(big=dict(objects=600, p50=30.0, tiny_share=0.0),
                        tiny=dict(objects=30, p50=4.0, tiny_share=1.0)))


def test_starved_small_class_is_named_with_its_evidence(tmp_path):
    found = report(tmp_path, *starved_small_class(), ["big", "tiny"], preflight=STARVED_PREFLIGHT)["findings"]
    weakest = next(t for t in found if t.startswith("Weakest class"))
    assert weakest.startswith("Weakest class: tiny")
    assert "30 training objects vs a median of 600 for the others (few examples)" in weakest
    assert "20% of its objects reach the matching IoU 0.5" in weakest and "others 99%" in weakest
    assert "missed (no detection): 5 of 6" in weakest
    small = next(t for t in found if t.startswith("Small objects"))
    # Objects under 8 px are half of all; 1 of 6 found (17%) against 6 of 6 of the 30-px ones.
    assert "50% of the objects are under 8 px" in small and "17% of them are found, against 100%" in small
    assert "Over-detection" not in kinds(found)


def test_confusion_pair_fires_on_swapped_labels(tmp_path):
    gts = [gt([box(0, 0, 30), box(50, 50, 30)], [0, 1]) for _ in range(5)]
    # Every 'cat' is detected as 'dog' (same box), every 'dog' correctly.
    dets = [det([box(0, 0, 30), box(50, 50, 30)], [0.9, 0.9], [1, 1]) for _ in range(5)]
    found = report(tmp_path, gts, dets, ["cat", "dog"])["findings"]
    pair = next(t for t in found if t.startswith("Confusion"))
    assert "5 of 5 cat objects (100%) are detected as dog" in pair


def test_overfitting_from_train_split_and_from_the_log(tmp_path):
    gts, dets = starved_small_class()
    # Perfect on the training images, 0.58 held-out: a gap.
    train = good_model()
    log = ("epoch,loss,loc,conf,val_AP,val_AP50\n0,5.0,2.0,3.0,,\n1,4.0,1.5,2.5,0.40,0.6\n2,3.0,1.0,2.0,,\n"
           "3,2.0,0.8,1.2,0.50,0.7\n4,1.5,0.6,0.9,,\n5,1.0,0.4,0.6,0.30,0.5\n")
    found = report(tmp_path, gts, dets, ["a", "b"], train=train, log=log)["findings"]
    fits = [t for t in found if t.startswith("Overfitting")]
    assert len(fits) == 1  # one finding with both pieces of evidence, not the same line twice
    assert "AP50 is 1.00 on training images" in fits[0]
    assert "; and val_AP peaked at 0.500 after epoch 4 and fell to 0.300 by epoch 6" in fits[0]


def test_underfitting_is_not_called_overfitting(tmp_path):
    gts, dets = starved_small_class()
    found = report(tmp_path, gts, dets, ["big", "tiny"], train=(gts, [det([], [], [])] * len(gts)))["findings"]
    assert any(t.startswith("Underfitting") for t in found)
    assert not any(t.startswith("Overfitting") for t in found)


def test_results_png_reads_sparse_and_old_logs(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,learning_rate,loss\n0,0.01,3.5\n1,0.01,NA\n2,0.005,2.0\n")
    columns = run_report.read_log(str(log))
    assert columns["loss"] == [3.5, None, 2.0] and "val_AP" not in columns
    path = run_report.plot_results(columns, str(tmp_path / "results.png"))
    assert open(path, "rb").read(8) == PNG_SIGNATURE


# ------------------------------------------------------------------ the tool, as a user runs it
def test_tool_rebuilds_every_file_of_a_work_dir(tmp_path):
    from PIL import Image

    image = tmp_path / "img.png"
    Image.fromarray(np.full((100, 100, 3), 128, np.uint8)).save(image)
    gts, dets = starved_small_class()
    log = "epoch,loss,loc,conf,positives_per_image,val_AP,val_AP50\n0,3,1,2,5,,\n1,2,0.5,1.5,5,0.4,0.6\n"
    work = write_work_dir(tmp_path / "w", gts, dets, ["big", "tiny"], preflight=STARVED_PREFLIGHT, log=log,
                          paths=[str(image)] * len(gts))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "tools" / "report.py"), str(work)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in run_report.ARTEFACTS:
        data = (work / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE if name.endswith(".png") else len(data) > 0, name
    assert "Weakest class: tiny" in (work / "report.txt").read_text()
    assert "Weakest class: tiny" in done.stdout
    # A work dir without the evaluation files: one line, exit 2.
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([sys.executable, str(REPO / "tools" / "report.py"), str(empty)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "ground_truth.json" in done.stderr


# ------------------------------------------------------------------ the loss parts, logged
def test_loss_parts_are_logged_by_fit_without_a_second_matching(monkeypatch):
    import keras

    from kdet.losses import MultiBoxLoss, MultiBoxParts
    from kdet.models.anchors import default_boxes

    anchors = default_boxes([4], [0.3, 0.5], [[2]])                       # 16 cells x 4 boxes
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (4, len(anchors), 6)), np.broadcast_to(anchors, (4, len(anchors), 4))],
                       -1).astype("float32")
    y = np.full((4, 2, 6), -1.0, np.float32)
    y[:, 0] = [0.1, 0.1, 0.4, 0.4, 0, 0]                                   # one object per image
    inputs = keras.Input(x.shape[1:])
    outputs = keras.layers.Dense(10, kernel_initializer="identity", use_bias=False)(inputs)
    model = keras.Model(inputs, outputs)
    calls = []
    original = MultiBoxLoss.components
    monkeypatch.setattr(MultiBoxLoss, "components", lambda self, *a: calls.append(1) or original(self, *a))
    loss = MultiBoxLoss(num_classes=1)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss, metrics=[MultiBoxParts(loss)])
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0).history
    assert {"loc", "conf", "positives_per_image"} <= set(history)
    # Learning rate 0: the weights stay the identity, so the epoch means are the means of the two
    # batches' parts (in any order).
    batches = [original(loss, y[i:i + 2], x[i:i + 2]) for i in (0, 2)]
    mean = lambda key: float(np.mean([float(b[key]) for b in batches]))
    assert history["loss"][0] == pytest.approx(mean("loss"), rel=1e-5)
    assert history["loc"][0] == pytest.approx(mean("loc"), rel=1e-5)
    assert history["conf"][0] == pytest.approx(mean("conf"), rel=1e-5)
    assert history["positives_per_image"][0] == pytest.approx(mean("num_positives") / 2, rel=1e-5)
    assert len(calls) == 1   # traced once, by the loss: the metric reused its parts (direct calls above bypass the patch)
