import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdet.data.audit import audit_records, audit_voc_dir
from kdet.data.records import Record

REPO = Path(__file__).resolve().parents[1]


from _helpers import load_tool as _load_tool  # noqa: E402
CLASSES = ["cat", "dog"]
W, H = 100, 80


def _xml(name, objects, width=W, height=H):
    objs = "".join(
        f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for c, b in objects)
    return (f"<annotation><filename>{name}.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{objs}</annotation>")


# image id -> VOC objects (1-based inclusive corners); one planted defect per image except img1
PLANTED = {
    "img1": [("cat", (5, 5, 40, 40)), ("dog", (50, 20, 90, 70))],              # clean
    "img2": [("cat", (30, 10, 30, 50)), ("dog", (50, 20, 90, 70))],            # degenerate cat (xmax == xmin)
    "img3": [("dog", (60, 10, 120, 50))],                                       # out of image (xmax 120 > 100)
    "img4": [("cat", (10, 10, 50, 50)), ("cat", (11, 11, 50, 50)),              # duplicate pair, IoU 1600/1681
             ("dog", (10, 10, 50, 50))],                                        # same box, other class: fine
    "img5": [],                                                                 # no objects
    "img6": [("cat", (5, 5, 40, 40))],                                          # unreadable image file
    "img7": [("bird", (5, 5, 40, 40))],                                         # unknown class
}


@pytest.fixture(scope="module")
def planted_voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, objects in PLANTED.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, objects))
        if image_id == "img6":
            (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"this is not a jpeg")
        else:
            pixels = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg")
    (root / "ImageSets/Main/train.txt").write_text("img1\nimg2\nimg3\nimg4\n")
    (root / "ImageSets/Main/val.txt").write_text("img5\nimg6\nimg7\n")
    return root


def _ids(items):
    return sorted((f["image_id"], f.get("index")) for f in items)


def test_every_planted_defect_and_nothing_else(planted_voc):
    report = audit_voc_dir(planted_voc, class_names=CLASSES)
    f = report.findings
    assert _ids(f["degenerate_boxes"]) == [("img2", 0)]
    assert f["degenerate_boxes"][0]["width"] == 1.0   # VOC 30..30 is kdet [29, 30]: width 1
    assert _ids(f["out_of_image_boxes"]) == [("img3", 0)]
    assert f["out_of_image_boxes"][0]["beyond_px"] == 20.0
    assert [(d["image_id"], d["pair"]) for d in f["duplicate_boxes"]] == [("img4", [0, 1])]
    assert f["duplicate_boxes"][0]["iou"] == pytest.approx(1600 / 1681, abs=1e-4)
    assert _ids(f["images_without_objects"]) == [("img5", None)]
    assert _ids(f["unreadable_images"]) == [("img6", None)]
    assert [(u["image_id"], u["class"]) for u in f["unknown_classes"]] == [("img7", "bird")]
    assert f["size_mismatches"] == [] and f["bad_annotations"] == []
    assert report.num_findings == 6


def test_counts_and_imbalance(planted_voc):
    s = audit_voc_dir(planted_voc, class_names=CLASSES).summary
    assert s["splits"]["train"]["objects"] == {"cat": 4, "dog": 4}
    assert s["splits"]["train"]["images_with_class"] == {"cat": 3, "dog": 4}
    assert s["splits"]["val"]["objects"] == {"cat": 1, "dog": 0}
    assert s["splits"]["all"]["images"] == 7 and s["splits"]["all"]["images_without_objects"] == 1
    assert s["imbalance"]["ratio"] == pytest.approx(5 / 4)
    # sizes: cats (36x36 twice, 41x41, 40x40) and dogs (41x51 twice, 41x41, 61x41) are all medium
    # except the 36x36 ones (area 1296 >= 1024: medium too); the degenerate cat is left out
    cat = s["box_sizes"]["cat"]
    assert (cat["count"], cat["small"], cat["medium"], cat["large"]) == (4, 0, 4, 0)
    assert cat["width"]["p0"] == 36 and cat["width"]["p100"] == 41


def test_report_files(planted_voc, tmp_path):
    report = audit_voc_dir(planted_voc, splits=["train", "val"], class_names=CLASSES)
    paths = report.save(tmp_path / "out", crops_per_class=3)
    text = paths["text"].read_text()
    for needle in ("degenerate boxes: 1", "out of image boxes: 1", "duplicate boxes: 1",
                   "images without objects: 1", "unreadable images: 1", "unknown classes: 1",
                   "img3.xml: object 0 dog"):
        assert needle in text
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["finding_counts"]["duplicate_boxes"] == 1
    for key in ("histograms", "contact_sheet"):
        with Image.open(paths[key]) as png:
            assert png.format == "PNG" and png.size[0] > 100


def test_class_list_collected_when_not_given(planted_voc):
    report = audit_voc_dir(planted_voc)
    assert report.class_names == ["bird", "cat", "dog"]
    assert report.findings["unknown_classes"] == []


def test_audit_records_in_memory():
    pixels = np.zeros((20, 30, 3), np.uint8)
    records = [Record("a", None, 30, 20, [[0, 0, 10, 10], [0, 0, 10, 10]], [0, 0], image=pixels),
               Record("b", None, 30, 20, [[5, 5, 5, 9]], [1], image=pixels[:10])]
    report = audit_records({"train": records}, CLASSES)
    f = report.findings
    assert [d["pair"] for d in f["duplicate_boxes"]] == [[0, 1]]
    assert _ids(f["degenerate_boxes"]) == [("b", 0)]
    assert [(d["image_id"], d["actual"]) for d in f["size_mismatches"]] == [("b", [30, 10])]
    assert report.summary["splits"]["train"]["objects"] == {"cat": 2, "dog": 1}


def test_tool_on_recipe(planted_voc, tmp_path):
    audit_dataset = _load_tool("audit_dataset")

    recipe = tmp_path / "recipe.py"
    recipe.write_text("from kdet.data.sources import voc\n"
                      f"recipe = dict(data=dict(train=voc({str(planted_voc)!r}, 'train', "
                      f"class_names={CLASSES!r})))\n")
    out = tmp_path / "audit"
    assert audit_dataset.main([str(recipe), "--out", str(out), "--no-plots", "--strict"]) == 1
    data = json.loads((out / "audit.json").read_text())
    # the train split holds the degenerate, out-of-image and duplicate defects (raw XML is read)
    counts = data["summary"]["finding_counts"]
    assert (counts["degenerate_boxes"], counts["out_of_image_boxes"], counts["duplicate_boxes"]) == (1, 1, 1)
    assert counts["unreadable_images"] == 0 and counts["unknown_classes"] == 0
    assert list(data["summary"]["splits"]) == ["train", "all"]


def test_bccd_degenerate_boxes_and_imbalance(bccd):
    report = audit_voc_dir(bccd, class_names=["RBC", "WBC", "Platelets"], check_images=False)
    degenerate = sorted(Path(d["file"]).name for d in report.findings["degenerate_boxes"])
    assert degenerate == ["BloodImage_00338.xml", "BloodImage_00343.xml"]
    objects = report.summary["splits"]["all"]["objects"]
    assert objects == {"RBC": 4155, "WBC": 372, "Platelets": 361}
    assert objects["RBC"] / max(objects["WBC"], objects["Platelets"]) > 5
    assert report.summary["imbalance"]["ratio"] == pytest.approx(4155 / 361, abs=1e-3)


def test_audit_sources_reads_raw_voc_inside_concat(planted_voc):
    from kdet.data.audit import audit_sources
    from kdet.data.sources import concat, voc

    # the VOC loader itself refuses this data (degenerate box): the audit reads the raw XML
    train = concat(voc(planted_voc, "train"), voc(planted_voc, "val"))
    report = audit_sources({"train": train}, CLASSES, check_images=False)
    assert report.summary["splits"]["train"]["images"] == 7
    assert report.num_findings == 5          # all planted defects but the unreadable image
    # without a class list the names found in the XML are used, never the validating loader
    report = audit_sources({"train": voc(planted_voc, "train+val")}, check_images=False)
    assert report.class_names == ["bird", "cat", "dog"]


def test_recipe_sources_calls_partial_with_root(planted_voc):
    from functools import partial

    from kdet.data.audit import recipe_sources
    from kdet.data.sources import voc

    recipe = dict(data=dict(root=str(planted_voc), train=partial(voc, split="train"), val=None))
    sources = recipe_sources(recipe)
    assert list(sources) == ["train"]
    assert Path(sources["train"].root) == planted_voc and sources["train"].split == "train"
