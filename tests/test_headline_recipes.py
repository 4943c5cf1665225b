"""The headline recipes (ssd300_voc.py, ssd300_fpn_voc.py, ssd300_coco.py) on local folders in the official layouts.

End to end: ``tools/train.py RECIPE --set data.root=<miniature folder>`` in a fresh process, one short
epoch of a small model (tests/_official_layouts.SMALL), then metrics.json, the run report and the
SavedModel exist and the AP in metrics.json equals pycocotools' on the ground truth the test wrote
itself from its own truth (VOC ``difficult`` -> an ignored crowd, COCO's json as written, crowd RLE
included). In process: what ``voc_or_tfds`` / ``coco_or_tfds`` decide from what is on disk.
"""

import json

import numpy as np
import pytest

from _helpers import REPO
from _official_layouts import (COCO_CATEGORIES, SMALL, VOC_CLASSES, check_run, run_train, voc_ground_truth,
                               write_coco2017, write_vocdevkit)
from kdet.data.base import ConcatSource, DatasetError
from kdet.data.sources import coco_or_tfds, voc_or_tfds

RECIPES = REPO / "recipes"


@pytest.fixture(scope="module")
def devkit(tmp_path_factory):
    return write_vocdevkit(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "coco"
    return root, write_coco2017(root)


# ------------------------------------------------------------------ end to end, fresh processes
def test_ssd300_voc_trains_on_a_local_vocdevkit_and_scores_as_pycocotools(devkit, tmp_path):
    folder, truth = devkit
    work = tmp_path / "work"
    proc = run_train(RECIPES / "ssd300_voc.py", work, [f"data.root={folder}", *SMALL])
    metrics, detections = check_run(proc, work, voc_ground_truth(truth[("2007", "test")]))
    # 07 trainval + 12 trainval for training; 07 test (ImageSets/Main/test.txt) for val and test
    assert "train: 12 images" in proc.stdout and "test: 4 images" in proc.stdout, proc.stdout[-3000:]  # before repetition
    assert "tfds" not in proc.stdout + proc.stderr
    assert {d["image_id"] for d in detections} <= {1, 2, 3, 4}
    assert "VOC07_mAP50" in metrics and "VOC_mAP50" in metrics


def test_ssd300_voc_under_jax_the_device_check_path(devkit, tmp_path):
    """The same run under Keras' JAX backend (the path a lent GPU checks first): metrics and final.keras."""
    pytest.importorskip("jax")
    folder, truth = devkit
    work = tmp_path / "work"
    proc = run_train(RECIPES / "ssd300_voc.py", work, [f"data.root={folder}", *SMALL], backend="jax")
    metrics, _ = check_run(proc, work, voc_ground_truth(truth[("2007", "test")]))
    assert metrics["saved_model"] is None


def test_ssd300_coco_trains_on_a_local_coco2017_folder_and_scores_as_pycocotools(coco_root, tmp_path):
    root, written = coco_root
    work = tmp_path / "work"
    proc = run_train(RECIPES / "ssd300_coco.py", work, [f"data.root={root}", *SMALL])
    category_of_class = sorted(c[0] for c in COCO_CATEGORIES)  # kdet's class k <-> the k-th category id
    metrics, detections = check_run(
        proc, work, written["val2017"],
        map_detection=lambda d: dict(d, category_id=category_of_class[d["category_id"] - 1]))
    assert "train: 10 images" in proc.stdout and "test: 5 images" in proc.stdout, proc.stdout[-3000:]
    assert {d["image_id"] for d in detections} <= {image["id"] for image in written["val2017"]["images"]}


# ------------------------------------------------------------------ what is on disk decides
def test_voc_devkit_or_the_folder_above_it_reads_07_12_trainval_and_07_test(devkit):
    folder, truth = devkit
    for root in (folder, folder.parent):  # the VOCdevkit, or the folder the tars were extracted in
        train = voc_or_tfds(str(root), "2007:trainval+2012:trainval")
        assert isinstance(train, ConcatSource) and train.class_names == list(VOC_CLASSES)
        records = train.records()
        expected = truth[("2007", "trainval")] + truth[("2012", "trainval")]
        assert [r.image_id for r in records] == [item[0] for item in expected]
        test = voc_or_tfds(str(root), "2007:test").records()
        assert [r.image_id for r in test] == [item[0] for item in truth[("2007", "test")]]
    for record, (image_id, size, objects) in zip(records, expected):
        assert (record.width, record.height) == size
        np.testing.assert_array_equal(record.boxes, [box for box, _, _ in objects])  # 1-based XML -> kdet pixels
        assert record.classes.tolist() == [VOC_CLASSES.index(name) for _, name, _ in objects]
        assert record.difficult.tolist() == [d for _, _, d in objects] and record.ignore.tolist() == record.difficult.tolist()
    assert any(record.difficult.any() for record in records)


def test_voc_data_root_that_is_not_a_devkit_is_a_tfds_data_dir(tmp_path):
    empty = tmp_path / "tfds"
    empty.mkdir()
    source = voc_or_tfds(str(empty), "2007:trainval+2012:trainval")
    assert [(s.tfds_name, s.split, s.data_dir) for s in source.sources] == [
        ("voc/2007", "train+validation", str(empty)), ("voc/2012", "train+validation", str(empty))]
    test = voc_or_tfds("~/tensorflow_datasets", "2007:test")  # TFDS's default: data_dir=None ($TFDS_DATA_DIR)
    assert (test.tfds_name, test.split, test.data_dir) == ("voc/2007", "test", None)
    assert "VOC2007/ImageSets/Main/test.txt" in test.hint


def test_data_root_none_keeps_the_tfds_path_and_other_factories_still_need_a_root():
    """``--set data.root=None``: the headline recipes' sources are TFDS's in its default data_dir."""
    from functools import partial

    from kdet.config import RecipeError, resolve_source
    from kdet.data.sources import auto

    voc = resolve_source(partial(voc_or_tfds, sets="2007:test"), None)
    assert (voc.tfds_name, voc.split, voc.data_dir) == ("voc/2007", "test", None)
    coco = resolve_source(partial(coco_or_tfds, split="val2017"), None)
    assert (coco.tfds_name, coco.split, coco.data_dir) == ("coco/2017", "validation", None)
    with pytest.raises(RecipeError, match="need data.root"):
        resolve_source(partial(auto, split="train"), None)


def test_voc_neither_layout_is_one_error_naming_both(tmp_path, devkit):
    with pytest.raises(DatasetError) as err:
        voc_or_tfds(str(tmp_path / "VOCdevkt"), "2007:test")  # a typo: not downloaded into
    message = str(err.value)
    assert "VOCdevkt: no such folder" in message and "VOC2007/ImageSets/Main/test.txt" in message
    assert "TFDS data_dir" in message and "tfds build voc/2007 voc/2012" in message and "\n" not in message
    only_2007 = tmp_path / "devkit" / "VOC2007"
    only_2007.mkdir(parents=True)
    with pytest.raises(DatasetError, match="VOC2012: not found .* a VOCdevkit without VOC2012/"):
        voc_or_tfds(str(only_2007.parent), "2007:trainval+2012:trainval")
    with pytest.raises(DatasetError, match="year:set"):
        voc_or_tfds(str(devkit[0]), "2007-test")
    with pytest.raises(DatasetError, match=r"is one year's folder \(VOC2007/\); set data.root to the folder holding it"):
        voc_or_tfds(str(devkit[0] / "VOC2007"), "2007:test")  # not a TFDS data_dir to download into


@pytest.mark.parametrize("recipe, needles", [
    ("ssd300_voc.py", ["VOC2007/ImageSets/Main/test.txt", "tfds build voc/2007 voc/2012"]),
    ("ssd300_coco.py", ["annotations/instances_val2017.json", "tfds build coco/2017"]),
])
def test_train_tool_on_neither_layout_ends_in_one_line_naming_both(tmp_path, recipe, needles):
    proc = run_train(RECIPES / recipe, tmp_path / "work", [f"data.root={tmp_path / 'nowhere'}"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith(f"error: data.root {tmp_path / 'nowhere'}: no such folder"), lines[-1]
    for needle in needles + ["TFDS data_dir"]:
        assert needle in lines[-1], (needle, lines[-1])


def test_coco_local_folder_crowds_categories_and_empty_images(coco_root):
    root, written = coco_root
    source = coco_or_tfds(str(root), "val2017")
    records = source.records()
    assert source.class_names == [name for _, name, _ in COCO_CATEGORIES]
    assert source.category_ids == [c[0] for c in COCO_CATEGORIES]
    data = written["val2017"]
    assert [r.image_id for r in records] == [image["id"] for image in data["images"]]
    assert len(records[-1]) == 0  # the image without objects stays (pycocotools counts its false positives)
    for record in records:
        anns = [a for a in data["annotations"] if a["image_id"] == record.image_id]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        np.testing.assert_allclose(record.boxes.reshape(-1, 4), np.reshape(boxes, (-1, 4)))
        assert record.iscrowd.tolist() == [bool(a["iscrowd"]) for a in anns]
        assert record.area.tolist() == [a["area"] for a in anns]
        assert [source.category_ids[c] for c in record.classes] == [a["category_id"] for a in anns]
    assert sum(r.iscrowd.sum() for r in records) == 1 and records[0].ignore.any()
    assert len(coco_or_tfds(str(root), "train2017").records()) == 10
    assert len(coco_or_tfds(str(root.parent), "train2017").records()) == 10  # the folder holding coco/


def test_coco_partial_folder_names_what_is_missing_and_tfds_otherwise(coco_root, tmp_path):
    partial = tmp_path / "partial"
    (partial / "annotations").mkdir(parents=True)
    (partial / "annotations" / "instances_val2017.json").write_text(json.dumps(coco_root[1]["val2017"]))
    with pytest.raises(DatasetError, match=r"val2017: folder not found .*train2017/ and val2017/"):
        coco_or_tfds(str(partial), "val2017")
    with pytest.raises(DatasetError, match=r"no such folder; the COCO recipes read a COCO 2017 folder.*TFDS data_dir"):
        coco_or_tfds(str(tmp_path / "nowhere"), "train2017")
    source = coco_or_tfds(str(tmp_path), "train2017")  # an existing folder without the layout: TFDS's data_dir
    assert (source.tfds_name, source.split, source.data_dir) == ("coco/2017", "train", str(tmp_path))
    assert "annotations/instances_train2017.json" in source.hint


def test_headline_recipes_settings_and_data_root():
    """The recipes as loaded: the paper's set-ups, and --set data.root re-roots all three splits."""
    from kdet.config import load_recipe

    voc = load_recipe(str(RECIPES / "ssd300_voc.py"))
    assert voc["data"]["train"].keywords == dict(sets="2007:trainval+2012:trainval")
    assert voc["data"]["test"].keywords == dict(sets="2007:test")
    assert (voc["train"]["epochs"], voc["train"]["lr_steps"], voc["data"]["batch_size"]) == (232, (155, 193), 32)
    fpn = load_recipe(str(RECIPES / "ssd300_fpn_voc.py"))
    assert fpn["data"]["train"].keywords == voc["data"]["train"].keywords and fpn["model"]["backbone"] == "resnet50_fpn"
    coco = load_recipe(str(RECIPES / "ssd300_coco.py"))
    assert coco["model"]["anchor_scales"] == [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
    assert (coco["model"]["backbone"], coco["model"]["image_size"]) == ("vgg16", 300)
    steps_per_epoch = 118287 // 32   # train2017
    assert coco["train"]["epochs"] * steps_per_epoch == pytest.approx(240_000, rel=0.01)
    assert [e * steps_per_epoch for e in coco["train"]["lr_steps"]] == pytest.approx([160_000, 200_000], rel=0.01)
    assert coco["data"]["test"].keywords == dict(split="val2017")


def test_fpn_voc_recipe_reads_the_local_devkit(devkit):
    """ssd300_fpn_voc.py inherits the data: its sources, resolved as the engine resolves them."""
    from kdet.config import load_recipe
    from kdet.engine import load_records, load_sources

    recipe = load_recipe(str(RECIPES / "ssd300_fpn_voc.py"), [f"data.root={devkit[0]}"])
    records = load_records(load_sources(recipe))
    assert (len(records["train"]), len(records["val"]), len(records["test"])) == (12, 4, 4)
