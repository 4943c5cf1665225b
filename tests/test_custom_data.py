"""Data as users have it: YOLO txt, VOC folders without ImageSets, COCO exports, auto-detection, seeded split.

Every layout is written by hand into tmp_path from one pixel-box truth; the
normalised YOLO numbers below are computed by hand from it.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from _helpers import REPO
from kdet.boxes import xyxy_to_yolo, yolo_to_xyxy
from kdet.data.base import DatasetError
from kdet.data.detect import detect_layout
from kdet.data.records import Record
from kdet.data.sources import auto
from kdet.data.split import stratified_split

CLASSES = ["cat", "dog"]
SIZES = {"a": (200, 100), "b": (100, 100), "c": (50, 80), "d": (80, 40), "e": (100, 50)}
# image -> [(pixel xyxy, class)]; "c" has no objects
TRUTH = {
    "a": [((20, 10, 60, 50), 0), ((100, 0, 200, 100), 1)],
    "b": [((10, 20, 30, 60), 1)],
    "c": [],
    "d": [((0, 0, 8, 4), 0)],
    "e": [((25, 5, 75, 45), 0)],
}
# The same boxes as YOLO lines "class cx cy w h", by hand: e.g. a's cat: cx = 40/200, cy = 30/100, w = 40/200, h = 40/100
YOLO_LINES = {
    "a": ["0 0.2 0.3 0.2 0.4", "1 0.75 0.5 0.5 1.0"],
    "b": ["1 0.2 0.4 0.2 0.4"],
    "d": ["0 0.05 0.05 0.1 0.1"],
    "e": ["0 0.5 0.5 0.5 0.8"],
}
TRAIN, VAL = ["a", "b", "c", "d"], ["e"]


def write_image(path, stem):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", SIZES[stem], (120, 60, 30)).save(path)


def voc_xml(stem):
    w, h = SIZES[stem]
    objects = "".join(f"<object><name>{CLASSES[c]}</name><bndbox><xmin>{b[0] + 1}</xmin><ymin>{b[1] + 1}</ymin>"
                      f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for b, c in TRUTH[stem])
    return (f"<annotation><filename>{stem}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")


def assert_truth(source, stems):
    records = {r.image_id: r for r in source.records()}
    assert sorted(records) == sorted(stems)
    for stem in stems:
        r = records[stem]
        assert (r.width, r.height) == SIZES[stem]
        np.testing.assert_allclose(r.boxes, np.reshape([b for b, _ in TRUTH[stem]], (-1, 4)), atol=1e-4)
        assert r.classes.tolist() == [c for _, c in TRUTH[stem]]


def write_yolo(root, splits=(("train", TRAIN), ("val", VAL)), roboflow=False):
    for split, stems in splits:
        for stem in stems:
            images = root / split / "images" if roboflow else root / "images" / split
            labels = root / split / "labels" if roboflow else root / "labels" / split
            write_image(images / f"{stem}.jpg", stem)
            if stem in YOLO_LINES:  # "c": no label file, a background image
                labels.mkdir(parents=True, exist_ok=True)
                (labels / f"{stem}.txt").write_text("\n".join(YOLO_LINES[stem]) + "\n")
    return root


# ------------------------------------------------------------------ YOLO conversion
def test_yolo_conversion_matches_hand_computed_values_and_round_trips():
    pixel = np.array([[20, 10, 60, 50], [100, 0, 200, 100]], float)
    yolo = np.array([[0.2, 0.3, 0.2, 0.4], [0.75, 0.5, 0.5, 1.0]])
    np.testing.assert_allclose(xyxy_to_yolo(pixel, 200, 100), yolo, atol=1e-12)
    np.testing.assert_allclose(yolo_to_xyxy(yolo, 200, 100), pixel, atol=1e-9)
    rng = np.random.default_rng(0)
    corners = np.sort(rng.uniform(0, 1, (100, 2, 2)), axis=1).reshape(100, 4)[:, [0, 2, 1, 3]] * [640, 480, 640, 480]
    np.testing.assert_allclose(yolo_to_xyxy(xyxy_to_yolo(corners, 640, 480), 640, 480), corners, atol=1e-9)


# ------------------------------------------------------------------ YOLO layouts
def test_yolo_ultralytics_layout_with_names_dict(tmp_path, capsys):
    root = write_yolo(tmp_path / "data")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\n"
                                    "names:\n  0: cat\n  1: dog\n")
    assert detect_layout(root).kind == "YOLO"
    train, val = auto(root, "train"), auto(root, "val")
    assert train.class_names == CLASSES and val.class_names == CLASSES
    assert_truth(train, TRAIN)
    assert_truth(val, VAL)
    assert auto(root, "test") is None
    out = capsys.readouterr().out
    assert "YOLO layout" in out and "no test split" in out
    assert "1 of 4 images have no labels: kept as background images" in out


def test_yolo_roboflow_variant_paths_relative_to_a_parent(tmp_path):
    root = write_yolo(tmp_path / "rf", splits=(("train", TRAIN), ("valid", VAL), ("test", ["e"])), roboflow=True)
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\n"
                                    "nc: 2\nnames: ['cat', 'dog']\n")
    assert_truth(auto(root, "train"), TRAIN)
    assert_truth(auto(root, "val"), VAL)
    assert_truth(auto(root, "test"), ["e"])


def test_yolo_yaml_written_on_another_machine_is_found_by_its_tail(tmp_path):
    root = write_yolo(tmp_path / "moved")
    (root / "data.yaml").write_text("path: /content/datasets/moved\ntrain: /content/datasets/moved/images/train\n"
                                    "val: /content/datasets/moved/images/val\nnames: [cat, dog]\n")
    assert_truth(auto(root, "train"), TRAIN)
    assert_truth(auto(root, "val"), VAL)


def test_yolo_without_yaml_reads_classes_txt(tmp_path):
    root = write_yolo(tmp_path / "noyaml")
    (root / "classes.txt").write_text("cat\ndog\n")
    layout = detect_layout(root)
    assert layout.kind == "YOLO" and layout.class_names() == CLASSES


def test_yolo_polygon_line_becomes_the_bounding_box_of_its_points(tmp_path, capsys):
    root = write_yolo(tmp_path / "poly", splits=(("train", ["a"]), ("val", ["e"])))
    # a triangle with corners (20, 10), (60, 30), (40, 50) px in the 200x100 image: box (20, 10, 60, 50)
    (root / "labels" / "train" / "a.txt").write_text("0 0.1 0.1 0.3 0.3 0.2 0.5\n")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [cat, dog]\n")
    record = auto(root, "train").records()[0]
    np.testing.assert_allclose(record.boxes, [[20, 10, 60, 50]], atol=1e-4)
    assert "1 label lines are polygons" in capsys.readouterr().out


@pytest.mark.parametrize("line, problem", [("0 0.5 0.5 0.2", "got 4 numbers"), ("2 0.5 0.5 0.2 0.2", "class id 2"),
                                           ("0 0.5 0.5 x 0.2", "not numbers"), ("0 0.9 0.5 0.4 0.2", "outside"),
                                           ("0 0.5 0.5 0 0.2", "zero or negative")])
def test_yolo_bad_line_names_file_and_line_or_is_counted(tmp_path, line, problem):
    root = write_yolo(tmp_path / "bad", splits=(("train", ["a", "b"]), ("val", ["e"])))
    (root / "labels" / "train" / "a.txt").write_text(f"0 0.2 0.3 0.2 0.4\n{line}\n")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [cat, dog]\n")
    with pytest.raises(DatasetError, match=rf"a\.txt:2: .*{problem}"):
        auto(root, "train").records()
    with pytest.warns(UserWarning, match="skipped 1 box"):
        records = auto(root, "train", skip_invalid=True).records()
    assert sum(len(r) for r in records) == 2


# ------------------------------------------------------------------ VOC without ImageSets, VOC with, COCO
def test_voc_folder_xmls_beside_images_background_and_sorted_names(tmp_path, capsys):
    root = tmp_path / "labelimg"
    for stem in TRAIN + VAL:
        write_image(root / f"{stem}.jpg", stem)
        if TRUTH[stem]:  # LabelImg writes no XML for an image without objects
            (root / f"{stem}.xml").write_text(voc_xml(stem))
    layout = detect_layout(root)
    assert layout.kind == "VOC folder" and layout.class_names() == ["cat", "dog"]
    train, val = auto(root, "train", val_fraction=0.2), auto(root, "val", val_fraction=0.2)
    assert len(train) + len(val) == 5 and 1 <= len(val) <= 2  # 20% of 5, plus what stratification needs
    assert_truth(train, [r.image_id for r in train.records()])
    out = capsys.readouterr().out
    assert "1 of 5 images have no XML: kept as background" in out
    assert "seeded split" in out and "train images" in out


def test_voc_folder_sibling_folders_without_imagesets(tmp_path):
    root = tmp_path / "cvat"
    for stem in TRAIN:
        write_image(root / "JPEGImages" / f"{stem}.jpg", stem)
        (root / "Annotations").mkdir(exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(stem))
    layout = detect_layout(root)
    assert layout.kind == "VOC folder" and "JPEGImages + Annotations" in layout.where
    train, val = auto(root, "train"), auto(root, "val")
    assert_truth(train, [r.image_id for r in train.records()])
    assert len(train) + len(val) == 4
    for c in range(2):  # both classes have two images: one on each side
        assert any(c in r.classes for r in train.records()) and any(c in r.classes for r in val.records())


def test_voc_with_imagesets_uses_its_split_files(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem in TRAIN + VAL:
        write_image(root / "JPEGImages" / f"{stem}.jpg", stem)
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(stem))
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(TRAIN))
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(VAL))
    assert detect_layout(root).kind == "VOC"
    assert_truth(auto(root, "train"), TRAIN)
    assert_truth(auto(root, "val"), VAL)


def coco_json(stems, with_parent=False):
    categories = [dict(id=1, name="cat", supercategory="pets"), dict(id=2, name="dog", supercategory="pets")]
    if with_parent:  # Roboflow's export: category 0 named after the others' supercategory, never used
        categories.insert(0, dict(id=0, name="pets", supercategory="none"))
    images, annotations = [], []
    for k, stem in enumerate(stems, 1):
        images.append(dict(id=k, file_name=f"{stem}.jpg", width=SIZES[stem][0], height=SIZES[stem][1]))
        for b, c in TRUTH[stem]:
            annotations.append(dict(id=len(annotations) + 1, image_id=k, category_id=c + 1, iscrowd=0,
                                    bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], area=(b[2] - b[0]) * (b[3] - b[1])))
    return dict(images=images, annotations=annotations, categories=categories)


def assert_coco_truth(source, stems):
    records = source.records()
    assert [os.path.basename(r.image_path)[:-4] for r in records] == stems
    for r, stem in zip(records, stems):
        np.testing.assert_allclose(r.boxes, np.reshape([b for b, _ in TRUTH[stem]], (-1, 4)), atol=1e-4)
        assert r.classes.tolist() == [c for _, c in TRUTH[stem]]


def test_coco_annotations_folder_layout(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split, stems in (("train", TRAIN), ("val", VAL)):
        for stem in stems:
            write_image(root / f"{split}2017" / f"{stem}.jpg", stem)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco_json(stems)))
    assert detect_layout(root).kind == "COCO"
    assert auto(root, "train").class_names == CLASSES
    assert_coco_truth(auto(root, "train"), TRAIN)
    assert_coco_truth(auto(root, "val"), VAL)


def test_coco_roboflow_export_drops_the_unused_parent_category(tmp_path):
    root = tmp_path / "rfcoco"
    for split, stems in (("train", TRAIN), ("valid", VAL)):
        for stem in stems:
            write_image(root / split / f"{stem}.jpg", stem)
        (root / split / "_annotations.coco.json").write_text(json.dumps(coco_json(stems, with_parent=True)))
    layout = detect_layout(root)
    assert layout.kind == "COCO" and layout.class_names() == CLASSES
    assert_coco_truth(auto(root, "train"), TRAIN)
    assert_coco_truth(auto(root, "val"), VAL)


def test_no_layout_is_one_line_naming_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError) as err:
        detect_layout(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "no dataset layout recognised" in message
    for looked_for in ("data.yaml", "ImageSets/Main", "instances_", "labels/", ".xml"):
        assert looked_for in message
    with pytest.raises(DatasetError, match="not found"):
        detect_layout(tmp_path / "missing")


# ------------------------------------------------------------------ seeded stratified split
def records_with(classes_per_image):
    return [Record(image_id=i, image_path=None, width=10, height=10, boxes=[[0, 0, 5, 5]] * len(cs), classes=cs)
            for i, cs in enumerate(classes_per_image)]


def test_split_is_stratified_seeded_and_sized():
    # 10 images: class 2 ("rare") in images 0 and 1 only, class 1 in 3..7, class 0 in all but 8 and 9 (background)
    classes = [[0, 2], [0, 2], [0], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [], []]
    records = records_with(classes)
    for seed in range(20):
        train, val = stratified_split(records, 3, val_fraction=0.2, seed=seed)
        assert sorted(train + val) == list(range(10)) and len(val) == 2
        for c in range(3):  # every class with >= 2 images is on both sides
            assert any(c in classes[i] for i in train) and any(c in classes[i] for i in val), (seed, c)
        # the rare class puts exactly one of its two images into val (round(0.2 * 2) -> at least 1, at most 1)
        assert len({0, 1} & set(val)) == 1
        assert stratified_split(records, 3, 0.2, seed) == (train, val)
    splits = {tuple(stratified_split(records, 3, 0.2, seed)[1]) for seed in range(20)}
    assert len(splits) > 1  # the seed matters


def test_split_keeps_a_single_image_class_for_training():
    classes = [[0], [0], [0], [1], [0]]
    for seed in range(10):
        train, val = stratified_split(records_with(classes), 2, 0.4, seed)
        assert 3 in train and len(val) == 2


def test_split_without_removing_stratification_fails_the_check():
    """The check above can fail: a plain random split of this set misses the rare class in val for some seed."""
    classes = [[0, 2], [0, 2], [0], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [], []]
    misses = 0
    for seed in range(20):
        val = np.random.default_rng(seed).permutation(10)[:2]
        misses += not any(2 in classes[i] for i in val)
    assert misses > 0


# ------------------------------------------------------------------ backbone_weights="auto"
def test_auto_backbone_weights_fall_back_offline_and_use_pretrained_online(monkeypatch, capsys):
    import kdet.models.ssd
    from kdet.engine import resolve_backbone_weights
    from kdet.models.backbones import WeightsDownloadError

    recipe = dict(model=dict(backbone="vgg16_bn", width_multiplier=0.125, backbone_weights="auto"),
                  train=dict(learning_rate=5e-3),
                  pretrained=dict(model=dict(backbone="vgg16", width_multiplier=1.0), train=dict(learning_rate=1e-3)))

    def offline(**kwargs):
        raise WeightsDownloadError("could not download ImageNet weights for VGG16 (no internet?)")

    monkeypatch.setattr(kdet.models.ssd, "SSD", offline)
    scratch = resolve_backbone_weights(recipe, CLASSES)
    assert scratch["model"] == dict(backbone="vgg16_bn", width_multiplier=0.125, backbone_weights=None)
    assert scratch["train"]["learning_rate"] == 5e-3
    assert "from scratch instead" in capsys.readouterr().out
    monkeypatch.setattr(kdet.models.ssd, "SSD", lambda **kwargs: None)
    online = resolve_backbone_weights(recipe, CLASSES)
    assert online["model"] == dict(backbone="vgg16", width_multiplier=1.0, backbone_weights="imagenet")
    assert online["train"]["learning_rate"] == 1e-3


# ------------------------------------------------------------------ the recipe, as a user runs it
def test_ssd_custom_recipe_trains_on_a_yolo_folder(tmp_path):
    root = tmp_path / "yolo"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        (root / "labels" / split).mkdir(parents=True)
        (root / "images" / split).mkdir(parents=True)
        for k in range(n):  # a bright square on a dark image, labelled in YOLO numbers
            x, y, s = rng.integers(8, 40), rng.integers(8, 40), 20
            pixels = np.full((64, 64, 3), 30, np.uint8)
            pixels[y:y + s, x:x + s] = 220
            Image.fromarray(pixels).save(root / "images" / split / f"{k}.png")
            (root / "labels" / split / f"{k}.txt").write_text(f"0 {(x + s / 2) / 64} {(y + s / 2) / 64} {s / 64} {s / 64}\n")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [square]\n")
    work = tmp_path / "work"
    sets = ["data.root=" + str(root), "model.image_size=64", "model.width_multiplier=0.125",
            "model.backbone_weights=None", "train.epochs=1", "data.min_images_per_epoch=16", "data.batch_size=4",
            "data.max_boxes=8", "eval.max_detections=20"]
    result = subprocess.run([sys.executable, "tools/train.py", "recipes/ssd_custom.py", "--work-dir", str(work),
                             *[arg for s in sets for arg in ("--set", s)]],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "YOLO layout" in result.stdout and "['square']" in result.stdout
    metrics = json.loads((work / "metrics.json").read_text())
    assert "AP50" in metrics


def test_auto_epochs_and_small_set_repetition():
    from kdet.config import load_recipe
    from kdet.engine import _repeated_to_epoch_size, _resolve_auto_epochs

    recipe = load_recipe(str(REPO / "recipes" / "ssd_custom.py"))
    assert recipe["train"]["epochs"] == "auto" and recipe["model"]["backbone_weights"] == "auto"
    records = records_with([[0]] * 10)
    repeated = _repeated_to_epoch_size(recipe, records)  # min_images_per_epoch 256: round(256 / 10) = 26 copies
    assert len(repeated) == 260 and all(a is b for a, b in zip(repeated[10:20], records))
    larger = records_with([[0]] * 205)
    assert _repeated_to_epoch_size(recipe, larger) is larger  # round(256 / 205) = 1: unchanged
    train_cfg = dict(epochs="auto", auto_steps=3000)
    _resolve_auto_epochs(train_cfg, steps_per_epoch=32)  # 3000 / 32 = 93.75 -> 94 epochs
    assert train_cfg["epochs"] == 94
    fixed = dict(epochs=7, auto_steps=3000)
    _resolve_auto_epochs(fixed, steps_per_epoch=32)
    assert fixed["epochs"] == 7


def test_recipe_data_options_reach_the_auto_source(tmp_path):
    from kdet.config import load_recipe
    from kdet.data.audit import recipe_sources

    root = tmp_path / "folder"
    for stem in TRAIN + VAL:
        write_image(root / f"{stem}.jpg", stem)
        (root / f"{stem}.xml").write_text(voc_xml(stem))
    recipe = load_recipe(str(REPO / "recipes" / "ssd_custom.py"),
                         [f"data.root={root}", "data.val_fraction=0.4", "data.split_seed=3", "data.min_val_images=2"])
    sources = recipe_sources(recipe)
    assert sorted(sources) == ["train", "val"]  # no test split in the data
    assert len(sources["val"]) >= 2 and len(sources["train"]) + len(sources["val"]) == 5  # 40% of 5
    assert sources["train"].class_names == CLASSES


def test_train_tool_says_in_one_line_when_no_layout_is_found(tmp_path, capsys):
    from tools_train import main

    (tmp_path / "empty").mkdir()
    assert main([str(REPO / "recipes" / "ssd_custom.py"), "--set", f"data.root={tmp_path / 'empty'}",
                 "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no dataset layout recognised" in err and "\n" not in err


def test_min_val_images_trains_on_every_image_when_the_split_would_be_too_small(tmp_path, capsys):
    root = tmp_path / "labelimg"
    for stem in TRAIN + VAL:
        write_image(root / f"{stem}.jpg", stem)
        if TRUTH[stem]:
            (root / f"{stem}.xml").write_text(voc_xml(stem))
    # 0.4 of 5 images = 2 validation images: split when 2 are enough, none when 3 are asked for
    split = dict(val_fraction=0.4, min_val_images=2)
    assert len(auto(root, "train", data=split)) == 3 and len(auto(root, "val", data=split)) == 2
    small = dict(val_fraction=0.4, min_val_images=3)
    train, val = auto(root, "train", data=small), auto(root, "val", data=small)
    assert len(train) == 5 and len(val) == 0
    assert_truth(train, [r.image_id for r in train.records()])
    assert "would be 2 < data.min_val_images=3: training on all of them" in capsys.readouterr().out
