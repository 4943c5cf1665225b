"""Model-assisted label review (kdet/analysis/label_issues.py, tools/find_label_issues.py).

Hand-made cases with stand-in predictions, where the truth is known: a deleted
box, a swapped class, a shifted box, a box on empty background. Scores are
computed by hand from the formulas in the module docstring.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdet.analysis import label_issues as li
from kdet.data.records import Record

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["RBC", "WBC", "Platelets"]
RBC, WBC, PLT = 0, 1, 2
PUBLIC = {"file", "image_id", "object", "box", "class", "issue", "score"}


def record(image_id, boxes, classes, **kw):
    return Record(image_id=image_id, image_path=f"/data/{image_id}.jpg", width=300, height=300,
                  boxes=np.array(boxes, np.float32).reshape(-1, 4), classes=classes,
                  annotation_path=f"/data/{image_id}.xml", **kw)


def dets(*rows):
    """Stand-in predictions: rows of (box, score, class), as engine.predict_records returns them."""
    return dict(boxes=np.array([r[0] for r in rows], np.float32).reshape(-1, 4),
                scores=np.array([r[1] for r in rows], np.float32), classes=np.array([r[2] for r in rows], np.int32))


def case():
    """Two images with one planted error of each kind.

    img1: object 0 right (RBC found at 0.9); object 1 labelled RBC where the
    models see a WBC (0.8): wrong_class 0.8 * (1 - 0) = 0.8; an RBC detected
    at 0.7 with no label (the deleted box): missing 0.7 * (1 - 0) = 0.7.
    img2: object 0 an RBC shifted by half its width; the models' RBC (0.95) is
    at the true place, IoU 1/3 with the label: bad_box 0.95 * (1 - 0) = 0.95;
    object 1 a Platelets box on empty background; object 2 a Platelets found at 0.8.
    recall: RBC 1/3 (only img1 object 0 matched at >= 0.5), Platelets 1/2,
    so the empty-background box is spurious (1 - 0) * 1/2 = 0.5, and img2
    object 2 spurious (1 - 0.8) * 1/2 = 0.1.
    """
    records = [record("img1", [[10, 10, 50, 50], [100, 100, 140, 140]], [RBC, RBC]),
               record("img2", [[20, 20, 60, 60], [150, 150, 170, 170], [200, 200, 220, 220]], [RBC, PLT, PLT])]
    predictions = [dets(([10, 10, 50, 50], 0.9, RBC), ([101, 101, 141, 141], 0.8, WBC),
                        ([200, 200, 240, 240], 0.7, RBC)),
                   dets(([40, 20, 80, 60], 0.95, RBC), ([200, 200, 220, 220], 0.8, PLT))]
    return records, predictions


def by_kind(entries):
    return {e["issue"]: e for e in entries}


def test_four_kinds_with_hand_computed_scores_and_suggestions():
    records, predictions = case()
    entries = li.score_label_issues(records, predictions, CLASSES)
    kinds = by_kind(entries)
    missing = kinds["missing"]
    assert (missing["image_id"], missing["object"], missing["class"]) == ("img1", None, "RBC")
    assert missing["box"] == [200, 200, 240, 240] and missing["score"] == pytest.approx(0.7, abs=1e-4)
    swapped = kinds["wrong_class"]
    assert (swapped["image_id"], swapped["object"], swapped["class"]) == ("img1", 1, "RBC")
    assert swapped["suggested_class"] == "WBC" and swapped["score"] == pytest.approx(0.8, abs=1e-4)
    shifted = kinds["bad_box"]
    assert (shifted["image_id"], shifted["object"]) == ("img2", 0)
    assert shifted["suggested_box"] == [40, 20, 80, 60] and shifted["score"] == pytest.approx(0.95, abs=1e-4)
    spurious = [e for e in entries if e["issue"] == "spurious"]
    assert [(e["object"], e["score"]) for e in spurious] == [(1, 0.5), (2, 0.1)]
    assert all(e["file"] == f"/data/{e['image_id']}.xml" for e in entries)
    # the shifted box's detection is its suggested box, not also a missing object
    assert len([e for e in entries if e["issue"] == "missing"]) == 1


def test_ranking_is_by_score_highest_first():
    records, predictions = case()
    entries = li.score_label_issues(records, predictions, CLASSES)
    assert [e["issue"] for e in entries] == ["bad_box", "wrong_class", "missing", "spurious", "spurious"]
    scores = [e["score"] for e in entries]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)


def test_correct_labels_are_not_listed():
    """Labels the models find, of the right class and in place, give no entry (score below min_score)."""
    records = [record("ok", [[10, 10, 50, 50], [100, 100, 160, 160]], [RBC, WBC])]
    predictions = [dets(([11, 10, 50, 51], 0.97, RBC), ([100, 101, 161, 160], 0.99, WBC))]
    assert li.score_label_issues(records, predictions, CLASSES) == []


def test_neighbours_detection_is_not_a_better_box():
    """In a cluster, a detection that matches a neighbour label is not suggested for a weakly found one."""
    records = [record("pair", [[0, 0, 40, 40], [30, 0, 70, 40]], [RBC, RBC])]
    predictions = [dets(([30, 0, 70, 40], 0.95, RBC))]  # matches object 1; IoU 1/7 with object 0
    entries = li.score_label_issues(records, predictions, CLASSES)
    # object 0: the neighbour's detection does not count as seeing it: spurious (1 - 0) * recall 1/2
    assert [(e["issue"], e["object"], e["score"]) for e in entries] == [("spurious", 0, 0.5)]


def test_ignored_labels_are_not_judged_but_explain_detections():
    records = [record("d", [[10, 10, 50, 50]], [RBC], difficult=[True])]
    predictions = [dets(([10, 10, 50, 50], 0.9, RBC))]
    assert li.score_label_issues(records, predictions, CLASSES) == []
    records = [record("d", [[10, 10, 50, 50]], [RBC], difficult=[True])]
    assert li.score_label_issues(records, [dets()], CLASSES) == []


def test_object_is_the_index_in_the_annotation_file(tmp_path):
    """VOC skips a degenerate box: later objects keep their XML index; the audit reports the skipped one."""
    from kdet.data.sources import voc

    root = tmp_path / "voc"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (300, 300), (200, 200, 200)).save(root / "JPEGImages" / "a.jpg")
    objects = [("RBC", (11, 11, 50, 50), 0), ("RBC", (80, 80, 80, 80), 0), ("WBC", (101, 101, 140, 140), 0),
               ("RBC", (201, 201, 240, 240), 1)]
    xml = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                  f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    (root / "Annotations" / "a.xml").write_text(
        f"<annotation><filename>a.jpg</filename><size><width>300</width><height>300</height></size>{xml}</annotation>")
    (root / "ImageSets/Main/train.txt").write_text("a\n")
    source = voc(root, "train", class_names=CLASSES, skip_invalid=True)
    records = source.records()
    assert records[0].object_index.tolist() == [0, 2, 3] and records[0].annotation_path == str(root / "Annotations/a.xml")
    predictions = [dets(([10, 10, 50, 50], 0.9, RBC), ([100, 100, 140, 140], 0.9, RBC))]  # object 2 seen as RBC
    entries = li.merge_entries(li.audit_entries(source, CLASSES, records),
                               li.score_label_issues(records, predictions, CLASSES))
    top = entries[0]
    assert (top["issue"], top["object"], top["score"], top["file"]) == ("degenerate", 1, 1.0, str(root / "Annotations/a.xml"))
    swapped = by_kind(entries)["wrong_class"]
    assert (swapped["object"], swapped["class"], swapped["suggested_class"]) == (2, "WBC", "RBC")
    assert 3 not in [e["object"] for e in entries]  # the difficult object is not judged


def test_geometric_duplicates_join_the_ranking():
    from kdet.data.audit import audit_records

    records = [record("dup", [[10, 10, 50, 50], [10, 10, 50, 51]], [RBC, RBC])]
    report = audit_records(records, CLASSES, check_images=False)
    predictions = [dets(([10, 10, 50, 50], 0.9, RBC), ([100, 100, 140, 140], 0.6, WBC))]
    entries = li.merge_entries(li.geometric_entries(report, records), li.score_label_issues(records, predictions, CLASSES))
    assert entries[0]["issue"] == "duplicate" and entries[0]["object"] == 1
    assert entries[0]["file"] == "/data/dup.xml" and entries[0]["score"] == pytest.approx(40 / 41, abs=1e-4)
    # object 0 is found (0.9): spurious only (1 - 0.9) * recall 1 = 0.1; object 1 is listed once, as the duplicate
    assert [(e["issue"], e["object"]) for e in entries] == [("duplicate", 1), ("missing", None), ("spurious", 0)]


def test_json_fields_exactly_and_outputs(tmp_path):
    from PIL import Image

    records, predictions = case()
    for r in records:
        path = tmp_path / f"{r.image_id}.jpg"
        Image.new("RGB", (300, 300), (180, 160, 170)).save(path)
        r.image_path = str(path)
    entries = li.score_label_issues(records, predictions, CLASSES)
    paths = li.write_outputs(tmp_path / "out", entries, records, predictions)
    rows = json.loads(paths["json"].read_text())
    extra = {"wrong_class": {"suggested_class"}, "bad_box": {"suggested_box"}, "missing": set(), "spurious": set()}
    for row in rows:
        assert set(row) == PUBLIC | extra[row["issue"]]
        assert isinstance(row["box"], list) and len(row["box"]) == 4
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert rows[0] == {"file": "/data/img2.xml", "image_id": "img2", "object": 0, "box": [20.0, 20.0, 60.0, 60.0],
                       "class": "RBC", "issue": "bad_box", "score": 0.95, "suggested_box": [40.0, 20.0, 80.0, 60.0]}
    text = paths["text"].read_text()
    assert "bad_box 1" in text and "top 5:" in text
    assert paths["sheet"].stat().st_size > 5000


def test_folds_are_seeded_disjoint_and_cover():
    folds = li.make_folds(10, 3, seed=1)
    assert sorted(i for f in folds for i in f) == list(range(10)) and [len(f) for f in folds] == [4, 3, 3]
    assert folds == li.make_folds(10, 3, seed=1) and folds != li.make_folds(10, 3, seed=2)
    with pytest.raises(ValueError):
        li.make_folds(2, 3)


def test_predictions_round_trip(tmp_path):
    records, predictions = case()
    li.save_predictions(tmp_path / "p.json", records, predictions, [0, 1])
    back = li.load_predictions(tmp_path / "p.json", records[::-1])
    np.testing.assert_allclose(back[1]["boxes"], predictions[0]["boxes"])
    assert back[0]["classes"].tolist() == predictions[1]["classes"].tolist()


def test_recipe_key_and_report_hook():
    from kdet.config import load_recipe

    recipe = load_recipe(REPO / "recipes" / "ssd_shapes.py", ["data.find_label_issues=True"])
    assert li.recipe_wants_label_issues(recipe)
    assert not li.recipe_wants_label_issues(load_recipe(REPO / "recipes" / "ssd_shapes.py"))


def test_tool_end_to_end_tiny(tmp_path):
    """The tool as a user runs it: 2 folds of a tiny model, 1 epoch, 64 px, 8 images, plus a planted degenerate box."""
    from kdet.data.shapes import generate_shapes

    root = generate_shapes(tmp_path / "shapes", num_train=8, num_test=0, image_size=64, max_objects=3)
    xml = root / "Annotations" / "train_00000.xml"
    text = xml.read_text()
    n_objects = text.count("<object>")
    xml.write_text(text.replace("</annotation>", "<object><name>circle</name><difficult>0</difficult><bndbox><xmin>5"
                                "</xmin><ymin>5</ymin><xmax>5</xmax><ymax>9</ymax></bndbox></object></annotation>"))
    recipe = tmp_path / "tiny.py"
    recipe.write_text(
        f"import sys; sys.path.insert(0, {str(REPO / 'recipes')!r})\n"
        "from functools import partial\nfrom _base_ssd import recipe as base\nfrom kdet.config import merge\n"
        "from kdet.data.sources import voc\n"
        f"recipe = merge(base, dict(model=dict(backbone='vgg16_bn', image_size=64, width_multiplier=0.125, "
        f"backbone_weights=None), data=dict(root={str(root)!r}, train=partial(voc, split='train', skip_invalid=True), "
        "batch_size=4, max_boxes=8, augment=None), train=dict(epochs=1, optimizer='adamw', learning_rate=1e-3, "
        "warmup_epochs=0)))\n")
    out = tmp_path / "review"
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "tools/find_label_issues.py", str(recipe), "--out", str(out), "--folds", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the 2 folds will take about" in proc.stdout
    rows = json.loads((out / "label_issues.json").read_text())
    assert rows[0]["issue"] == "degenerate" and rows[0]["object"] == n_objects and rows[0]["file"] == str(xml)
    assert all(PUBLIC <= set(r) for r in rows)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert (out / "label_issues.txt").is_file() and (out / "label_issues.png").is_file()
    assert sorted(p.name for p in out.glob("fold*.keras")) == ["fold0.keras", "fold1.keras"]


def test_tool_bad_input_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "tools/find_label_issues.py", str(tmp_path / "nope.py"), "--out",
                           str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "recipe not found" in proc.stderr and "Traceback" not in proc.stderr


def test_isotonic_fit_by_hand():
    knots, values = li._isotonic(np.array([0.4, 0.1, 0.3, 0.2]), np.array([1.0, 0.0, 0.0, 1.0]))
    # sorted y = 0, 1, 0, 1: the violating pair (1, 0) pools to 0.5
    assert knots.tolist() == [0.1, 0.3, 0.4] and values.tolist() == [0.0, 0.5, 1.0]


def test_calibration_ranks_a_precise_class_above_an_over_eager_one():
    """RBC detections at 0.9 are right half the time, WBC ones almost always: a missing WBC outranks missing RBCs."""
    records, predictions = [], []
    for n in range(60):
        records.append(record(f"i{n}", [[10, 10, 50, 50], [100, 100, 160, 160]], [RBC, WBC]))
        rows = [([10, 10, 50, 50], 0.9, RBC), ([100, 100, 160, 160], 0.9, WBC), ([200, 200, 240, 240], 0.9, RBC)]
        if n == 7:  # the deleted WBC
            rows.append(([200, 50, 260, 110], 0.9, WBC))
        predictions.append(dets(*rows))
    raw = li.score_label_issues(records, predictions, CLASSES, calibrate=False)
    assert {e["score"] for e in raw if e["issue"] == "missing"} == {0.9}
    entries = li.score_label_issues(records, predictions, CLASSES)
    top = entries[0]
    assert (top["issue"], top["class"], top["image_id"]) == ("missing", "WBC", "i7")
    assert top["score"] == pytest.approx(60 / 61, abs=1e-4)
    assert {e["score"] for e in entries[1:] if e["issue"] == "missing"} == {0.5}
