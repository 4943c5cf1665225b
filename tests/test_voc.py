"""VOC loader: BCCD counts and quirks, conversions, and bad-input errors."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdet.data.sources import DatasetError, voc

# ------------------------------------------------------------------ fixtures
def write_voc(root, images, split="train", size_in_xml=True, image_size=(40, 30)):
    """Write a tiny VOC dataset. ``images``: {id: [(name, (xmin, ymin, xmax, ymax) 1-based, difficult), ...]}."""
    root = Path(root)
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    width, height = image_size
    for image_id, objects in images.items():
        Image.new("RGB", (width, height), (90, 120, 150)).save(root / "JPEGImages" / f"{image_id}.jpg")
        size = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>" if size_in_xml else ""
        objs = "".join(
            f"<object><name>{name}</name><difficult>{int(diff)}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for name, b, diff in objects
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename>{size}{objs}</annotation>"
        )
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in images))
    return root


GOOD = {"a": [("cat", (1, 1, 10, 10), False), ("dog", (5, 6, 40, 30), True)], "b": [("dog", (2, 3, 4, 5), False)]}


# ------------------------------------------------------------------ BCCD
def test_bccd_counts_and_degenerate_boxes(bccd):
    # two zero-size boxes in 4,888 are stray clicks: dropped by default, counted and named in one warning
    with pytest.warns(UserWarning, match=r"dropped 2 zero-size boxes of 4888 in .*BCCD.*\(first: .*BloodImage_003\d\d"
                                         r"\.xml: object \d+ .*degenerate.*--set data\.skip_invalid=True"):
        dropped = voc(bccd, "trainval+test")
        assert sum(len(r.boxes) for r in dropped.records()) == 4886

    with pytest.warns(UserWarning, match=r"skipped 2 boxes \(degenerate\) in .*BCCD"):
        source = voc(bccd, "trainval+test", skip_invalid=True)
        records = source.records()
    assert len(source) == 364
    assert source.class_names == ["Platelets", "RBC", "WBC"]  # collected from the XML, sorted
    counts = np.bincount(np.concatenate([r.classes for r in records]), minlength=3)
    # 4155 RBC before cleaning: the two single-point RBC boxes are the degenerate ones
    assert counts.tolist() == [361, 4155 - 2, 372]
    assert source.skipped == {"boxes": {"degenerate": 2}, "images": {}}
    assert all((r.width, r.height) == (640, 480) for r in records)


def test_bccd_conversion_and_class_order(bccd):
    source = voc(bccd, "train+val", class_names=["RBC", "WBC", "Platelets"], skip_invalid=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = {r.image_id: r for r in source.records()}
    assert len(records) == 292  # train + val = trainval
    first = records["BloodImage_00000"]
    assert first.image_path.endswith("JPEGImages/BloodImage_00000.jpg")
    # XML: WBC <260, 177, 491, 376> (1-based inclusive) -> (259, 176, 491, 376); then RBC <78, 336, 184, 435>
    np.testing.assert_array_equal(first.boxes[0], [259, 176, 491, 376])
    np.testing.assert_array_equal(first.boxes[1], [77, 335, 184, 435])
    assert first.classes[:2].tolist() == [1, 0]
    assert len(first) == 20 and not first.difficult.any() and not first.iscrowd.any()


# ------------------------------------------------------------------ tiny datasets
def test_conversion_difficult_and_collected_classes(tmp_path):
    source = voc(write_voc(tmp_path, GOOD), "train")
    records = source.records()
    assert source.class_names == ["cat", "dog"]
    assert [r.image_id for r in records] == ["a", "b"]
    np.testing.assert_array_equal(records[0].boxes, [[0, 0, 10, 10], [4, 5, 40, 30]])
    assert records[0].classes.tolist() == [0, 1]
    assert records[0].difficult.tolist() == [False, True]
    assert records[0].ignore.tolist() == [False, True]
    np.testing.assert_array_equal(records[1].boxes, [[1, 2, 4, 5]])
    assert (records[0].width, records[0].height) == (40, 30)


def test_size_from_image_header_and_filename_without_extension(tmp_path):
    root = write_voc(tmp_path, GOOD, size_in_xml=False, image_size=(52, 44))
    xml = root / "Annotations" / "b.xml"
    xml.write_text(xml.read_text().replace("<filename>b.jpg</filename>", "<filename>b</filename>"))
    records = voc(root, "train").records()
    assert [(r.width, r.height) for r in records] == [(52, 44), (52, 44)]
    assert records[1].image_path.endswith("JPEGImages/b.jpg")


def _break(root, problem):
    if problem == "missing file":
        (root / "JPEGImages" / "b.jpg").unlink()
    elif problem == "unparsable XML":
        (root / "Annotations" / "b.xml").write_text("<annotation><object>")
    elif problem == "unknown class":
        xml = root / "Annotations" / "b.xml"
        xml.write_text(xml.read_text().replace("<name>dog</name>", "<name>cow</name>"))
    elif problem == "degenerate":
        xml = root / "Annotations" / "b.xml"
        xml.write_text(xml.read_text().replace("<xmax>4</xmax>", "<xmax>1</xmax>"))
    elif problem == "out of image":
        xml = root / "Annotations" / "b.xml"
        xml.write_text(xml.read_text().replace("<ymax>5</ymax>", "<ymax>31</ymax>"))


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing file", r"b\.xml: image file not found .*JPEGImages/b\.jpg"),
        ("unparsable XML", r"b\.xml: cannot parse XML"),
        ("unknown class", r"b\.xml: object 0 \('cow'.*unknown class"),
        ("degenerate", r"b\.xml: object 0 \('dog', VOC box \[2, 3, 1, 5\]\): degenerate"),
        ("out of image", r"b\.xml: object 0 \('dog', VOC box \[2, 3, 4, 31\]\): box outside the 40x30 image"),
    ],
)
def test_bad_input_names_file_and_problem(tmp_path, problem, message):
    root = write_voc(tmp_path, GOOD)
    _break(root, problem)
    with pytest.raises(DatasetError, match=message) as err:
        voc(root, "train", class_names=["cat", "dog"]).records()
    assert err.value.reason == problem
    assert isinstance(err.value, ValueError)


def test_skip_invalid_counts_and_warns_once(tmp_path):
    images = {
        "a": [("cat", (1, 1, 10, 10), False), ("cat", (5, 5, 5, 9), False), ("dog", (3, 3, 41, 9), False)],
        "b": [("dog", (2, 3, 4, 5), False), ("dog", (8, 9, 8, 2), False)],
        "c": [("cat", (1, 1, 2, 2), False)],
    }
    root = write_voc(tmp_path, images)
    (root / "JPEGImages" / "c.jpg").unlink()
    source = voc(root, "train", skip_invalid=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = source.records()
        source.records()  # cached: no second warning
    messages = [str(w.message) for w in caught]
    assert messages == [f"skipped 3 boxes (2 degenerate, 1 out of image) and 1 image (missing file) in {root} [train]"]
    assert source.skipped == {"boxes": {"degenerate": 2, "out of image": 1}, "images": {"missing file": 1}}
    assert [r.image_id for r in records] == ["a", "b"]
    assert [len(r) for r in records] == [1, 1]


def test_missing_split_lists_available(tmp_path):
    root = write_voc(tmp_path, GOOD)
    with pytest.raises(DatasetError, match=r"val\.txt: split file not found .*\['train'\]"):
        voc(root, "val").records()
