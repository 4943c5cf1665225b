"""Reports: P/R/F1 at thresholds, PR curves, confusion matrix, and the COCO-json CLI."""

import importlib.util
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kdet.metrics import reports, voc  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


from _helpers import box, det, gt  # noqa: E402


def empty_spots(n, start=200):
    """``n`` small boxes on a grid far from every object."""
    return [box(start + 6 * (i % 20), start + 6 * (i // 20), 5) for i in range(n)]


# ------------------------------------------------------------ over-detection
def over_detecting_model():
    """4 objects in 2 images, each found at score 0.9, plus 396 false boxes at 0.02."""
    gts = [gt([box(0, 0), box(20, 20)], [0, 0]), gt([box(0, 0), box(40, 0)], [0, 0])]
    dets = [det([box(0, 0), box(20, 20)] + empty_spots(200), [0.9] * 2 + [0.02] * 200, [0] * 202),
            det([box(0, 0), box(40, 0)] + empty_spots(196), [0.9] * 2 + [0.02] * 196, [0] * 198)]
    return gts, dets


def test_over_detection_low_precision_at_low_threshold_but_high_ap():
    gts, dets = over_detecting_model()
    low = reports.precision_recall_f1(gts, dets, ["cell"], score_threshold=0.01)
    row = low["per_class"]["cell"]
    # At 0.01 every box counts: 4 TP, 396 FP -> precision 4/400 = 0.01, recall 4/4 = 1.
    assert (row["tp"], row["fp"], row["fn"]) == (4, 396, 0)
    assert row["precision"] == pytest.approx(0.01)
    assert row["recall"] == pytest.approx(1.0)
    assert row["f1"] == pytest.approx(2 * 0.01 * 1 / 1.01)
    # Yet the four true boxes rank first: precision 1 up to recall 1 -> AP 1.
    assert row["AP"] == pytest.approx(1.0)
    assert low["overall"]["mAP"] == pytest.approx(1.0)
    # The F1-optimal threshold (0.9) and a sensible one (0.5) show the real quality.
    assert row["best_threshold"] == pytest.approx(0.9)
    assert (row["best_precision"], row["best_recall"], row["best_f1"]) == (1.0, 1.0, 1.0)
    high = reports.precision_recall_f1(gts, dets, ["cell"], score_threshold=0.5)["per_class"]["cell"]
    assert (high["tp"], high["fp"], high["precision"], high["recall"]) == (4, 0, 1.0, 1.0)
    table = reports.format_precision_recall(low)
    assert "cell" in table and "0.010" in table and "396" in table


# -------------------------------------------------- thresholds and F1 optimum
# Class "a": 4 objects; detections by score .9 T, .8 T, .7 F, .6 T, .5 F, .4 F.
#   cut at .9: P 1,   R .25 F1 .4     .8: P 1,   R .5  F1 .667   .7: P .667 R .5 F1 .571
#       at .6: P .75, R .75 F1 .75    .5: P .6,  R .75 F1 .667   .4: P .5   R .75 F1 .6
#   -> best threshold .6 with P = R = F1 = .75
# Class "b": 2 objects; .9 T, then four detections tied at .5: one T, three F.
#   A threshold keeps all tied boxes or none: cut .9: P 1 R .5 F1 .667; cut .5: P .4 R 1 F1 .571
#   -> best .9 (a per-box cut after the tied TP would wrongly claim F1 = 1).
A_OBJECTS = [box(0, 0), box(20, 0), box(40, 0), box(60, 0)]
B_OBJECTS = [box(0, 40), box(20, 40)]


def two_class_case():
    gts = [gt(A_OBJECTS + B_OBJECTS, [0, 0, 0, 0, 1, 1])]
    spots = empty_spots(6)
    a = det([A_OBJECTS[0], A_OBJECTS[1], spots[0], A_OBJECTS[2], spots[1], spots[2]],
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0] * 6)
    b = det([B_OBJECTS[0], B_OBJECTS[1], spots[3], spots[4], spots[5]], [0.9, 0.5, 0.5, 0.5, 0.5], [1] * 5)
    dets = [dict(boxes=np.concatenate([a["boxes"], b["boxes"]]), scores=a["scores"] + b["scores"],
                 classes=a["classes"] + b["classes"])]
    return gts, dets


def test_precision_recall_f1_at_threshold_and_optimum():
    gts, dets = two_class_case()
    result = reports.precision_recall_f1(gts, dets, ["a", "b"], score_threshold=0.55)
    a, b, overall = result["per_class"]["a"], result["per_class"]["b"], result["overall"]
    assert (a["tp"], a["fp"], a["fn"]) == (3, 1, 1)
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((0.75, 0.75, 0.75))
    assert a["best_threshold"] == pytest.approx(0.6)
    assert (a["best_precision"], a["best_recall"], a["best_f1"]) == pytest.approx((0.75, 0.75, 0.75))
    # Ties: the best cut for "b" is .9, not "after the tied TP".
    assert (b["tp"], b["fp"], b["fn"]) == (1, 0, 1)
    assert b["best_threshold"] == pytest.approx(0.9)
    assert b["best_f1"] == pytest.approx(2 / 3)
    # Overall (micro) at .55: TP 3 + 1, FP 1 + 0, 6 objects -> P .8, R 4/6, F1 8/11.
    assert (overall["tp"], overall["fp"], overall["fn"]) == (4, 1, 2)
    assert (overall["precision"], overall["recall"], overall["f1"]) == pytest.approx((0.8, 4 / 6, 8 / 11))
    # Shared best cut over the merged ranking: .9 (F1 .5), .8 (.667), .7 (.6), .6 (8/11), .5 (.625).
    assert overall["best_threshold"] == pytest.approx(0.6)
    assert overall["best_f1"] == pytest.approx(8 / 11)
    assert overall["num_positives"] == 6 and overall["num_detections"] == 11


def test_class_without_detections_or_objects():
    gts = [gt([box(0, 0)], [0])]
    dets = [det([box(50, 50)], [0.9], [1])]  # class 1 has no objects, class 0 no detections
    result = reports.precision_recall_f1(gts, dets, ["a", "b"], score_threshold=0.5)
    a, b = result["per_class"]["a"], result["per_class"]["b"]
    assert (a["tp"], a["fp"], a["fn"], a["precision"], a["recall"], a["f1"]) == (0, 0, 1, 0.0, 0.0, 0.0)
    assert b["fp"] == 1 and np.isnan(b["recall"]) and np.isnan(b["AP"])
    assert np.isnan(a["best_threshold"])
    reports.format_precision_recall(result)  # NaNs print


# ----------------------------------------------------------- confusion matrix
def confusion_case():
    cat_a, dog_b, cat_c = box(0, 0), box(20, 20), box(40, 40)
    gts = [gt([cat_a, dog_b, cat_c], [0, 1, 0]),
           gt([box(0, 0), box(20, 20)], [1, 1], difficult=[True, False])]
    dets = [det([cat_a, dog_b, box(60, 60), [0, 0.5, 10, 10.5], cat_c],
                [0.9, 0.8, 0.7, 0.6, 0.1], [0, 0, 1, 0, 1]),
            det([box(0, 0), box(20, 20)], [0.9, 0.5], [1, 1])]
    return gts, dets


def test_confusion_matrix_hand_case():
    # Image 1: cat A found (cat/cat); dog B called cat (dog/cat); a dog box on nothing
    # (background/dog); a second cat box on A, a duplicate (background/cat); the dog box
    # on cat C scores 0.1, below 0.25, so C is missed (cat/background).
    # Image 2: the dog box on the difficult dog counts nowhere; dog E found (dog/dog).
    gts, dets = confusion_case()
    m = reports.confusion_matrix(gts, dets, ["cat", "dog"], iou_threshold=0.5, score_threshold=0.25)
    np.testing.assert_array_equal(m, [[1, 0, 1],
                                      [1, 1, 0],
                                      [1, 1, 0]])
    # At 0.05 the 0.1 dog box on cat C is a confusion instead of a miss.
    m = reports.confusion_matrix(gts, dets, ["cat", "dog"], score_threshold=0.05)
    np.testing.assert_array_equal(m, [[1, 1, 0],
                                      [1, 1, 0],
                                      [1, 1, 0]])
    # Diagonal = true positives of the P/R/F1 report at the same threshold; rows sum to objects.
    prf = reports.precision_recall_f1(gts, dets, ["cat", "dog"], score_threshold=0.05)
    assert [prf["per_class"][n]["tp"] for n in ("cat", "dog")] == list(np.diag(m)[:2])
    assert [prf["per_class"][n]["num_positives"] for n in ("cat", "dog")] == list(m[:2].sum(1))
    text = reports.format_confusion_matrix(m, ["cat", "dog"])
    assert "background" in text and text.splitlines()[-1].split() == ["background", "1", "1", "0"]


def test_confusion_prefers_same_class_then_best_overlap():
    # One cat object; a dog box overlaps it better (IoU 1) than the cat box (IoU .8) and
    # scores higher. The cat box still takes the cat (diagonal first); the dog box is a FP.
    gts = [gt([box(0, 0)], [0])]
    dets = [det([box(0, 0), [0, 0, 10, 8]], [0.9, 0.8], [1, 0])]
    m = reports.confusion_matrix(gts, dets, ["cat", "dog"])
    np.testing.assert_array_equal(m, [[1, 0, 0], [0, 0, 0], [0, 1, 0]])


# ------------------------------------------------------------------------ PNGs
def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 2000
    assert plt.imread(path).ndim == 3


def test_pr_curve_png_with_ap_in_legend(tmp_path, monkeypatch):
    gts, dets = two_class_case()
    curves = reports.pr_curves(gts, dets, ["a", "b"])
    assert curves["a"]["AP"] == pytest.approx(voc.voc_evaluate(gts, dets, ["a", "b"])["AP"]["a"])
    np.testing.assert_allclose(curves["b"]["recall"], [0.5, 1, 1, 1, 1])
    legends = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (
        legends.extend(t.get_text() for t in fig.axes[0].get_legend().get_texts()), save(fig, *a, **k))[1])
    path = reports.plot_pr_curves(curves, tmp_path / "pr.png", score_threshold=0.55)
    assert_png(path)
    ap_a = curves["a"]["AP"]  # all-point: .25 * 1 + .25 * 1 + .25 * .75 = .6875
    assert ap_a == pytest.approx(0.6875)
    # "b": ties keep input order (stable, as voc_eval): .9 T, .5 T first -> precision 1 to recall 1.
    assert f"a AP={ap_a:.3f}" in legends and "b AP=1.000" in legends


def test_confusion_png(tmp_path):
    gts, dets = confusion_case()
    m = reports.confusion_matrix(gts, dets, ["cat", "dog"])
    assert_png(reports.plot_confusion_matrix(m, ["cat", "dog"], tmp_path / "cm.png"))


# ------------------------------------------------------------------------- CLI
def load_cli():
    path = Path(__file__).resolve().parents[1] / "tools" / "report.py"
    spec = importlib.util.spec_from_file_location("kdet_tools_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_coco(tmp_path):
    # Category ids 3 (cat) and 7 (dog) -> classes 0, 1. Image 11: a cat and a crowd dog;
    # image 12: a dog. Results: cat found, a dog box on the crowd (ignored), dog found late
    # after a wrong dog box. dog ranking: .8 FP, .6 TP with 1 object -> AP .5; cat AP 1.
    gt_json = dict(
        images=[dict(id=11, file_name="a.jpg", width=100, height=100),
                dict(id=12, file_name="b.jpg", width=100, height=100)],
        categories=[dict(id=7, name="dog"), dict(id=3, name="cat")],
        annotations=[dict(id=1, image_id=11, category_id=3, bbox=[0, 0, 10, 10], iscrowd=0, area=100),
                     dict(id=2, image_id=11, category_id=7, bbox=[50, 50, 20, 20], iscrowd=1, area=400),
                     dict(id=3, image_id=12, category_id=7, bbox=[10, 20, 30, 40], iscrowd=0, area=1200)])
    results = [dict(image_id=11, category_id=3, bbox=[0, 0, 10, 10], score=0.9),
               dict(image_id=11, category_id=7, bbox=[50, 50, 20, 20], score=0.95),
               dict(image_id=12, category_id=7, bbox=[60, 60, 10, 10], score=0.8),
               dict(image_id=12, category_id=7, bbox=[11, 21, 30, 40], score=0.6)]
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "res.json").write_text(json.dumps(results))
    return tmp_path / "gt.json", tmp_path / "res.json"


def test_cli_writes_report(tmp_path, capsys):
    gt_path, res_path = write_coco(tmp_path)
    cli = load_cli()
    gts, dets, names = cli.load_coco(gt_path, res_path)
    assert names == ["cat", "dog"]
    np.testing.assert_allclose(gts[1]["boxes"], [[10, 20, 40, 60]])  # COCO xywh -> xyxy
    out = tmp_path / "out"
    assert cli.main(["--gt", str(gt_path), "--results", str(res_path), "--out", str(out),
                     "--score-threshold", "0.7"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["voc"]["AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(0.5)}
    assert metrics["voc"]["mAP"] == pytest.approx(0.75)
    # At 0.7: cat 1 TP; dog: the crowd hit is ignored, the .8 box is a FP, the .6 one is cut.
    assert metrics["confusion_matrix"] == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    report = (out / "report.txt").read_text()
    assert "mAP@0.50" in report and "0.7500" in report
    for name in ("pr_curves.png", "confusion_matrix.png"):
        assert_png(out / name)
    assert "wrote" in capsys.readouterr().out


def test_cli_rejects_unknown_category(tmp_path, capsys):
    gt_path, res_path = write_coco(tmp_path)
    res_path.write_text(json.dumps([dict(image_id=11, category_id=5, bbox=[0, 0, 1, 1], score=0.5)]))
    assert load_cli().main(["--gt", str(gt_path), "--results", str(res_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "res.json" in err and "category_id 5" in err
