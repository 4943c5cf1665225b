"""Bad and unusual images: the load-time check, EXIF orientation in every decoder, decode failures
inside the input pipeline, augmentations that break uint8 RGB, and the train tool as a user runs it.

Damaged inputs are copies of real BCCD files (in tmp_path) or generated images.
"""

import json
import os
import shutil
import subprocess
import sys

import albumentations as A
import numpy as np
import pytest
from PIL import Image

from _helpers import BCCD, REPO
from kdet.config import RecipeError
from kdet.data.augment import Augmenter, hflip
from kdet.data.base import DatasetError
from kdet.data.image_check import apply_orientation, check_record_image
from kdet.data.records import Record, load_image
from kdet.data.sources import coco, voc

needs_bccd = pytest.mark.skipif(not (BCCD / "JPEGImages").is_dir(), reason="BCCD not found")
BCCD_IDS = ["BloodImage_00000", "BloodImage_00001", "BloodImage_00002", "BloodImage_00003",
            "BloodImage_00004", "BloodImage_00005"]


# ------------------------------------------------------------------ builders
def bccd_copy(root, ids=BCCD_IDS, split="train"):
    """A VOC folder at ``root`` with copies of BCCD images/XMLs ``ids``; returns ``root``."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        shutil.copy(BCCD / "Annotations" / f"{image_id}.xml", root / "Annotations")
        shutil.copy(BCCD / "JPEGImages" / f"{image_id}.jpg", root / "JPEGImages")
    (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def set_xml_size(xml_path, width, height):
    text = xml_path.read_text()
    start, end = text.index("<size>"), text.index("</size>")
    xml_path.write_text(text[:start] + f"<size><width>{width}</width><height>{height}</height><depth>3</depth>"
                        + text[end:])


def voc_xml(filename, width, height, boxes, name="thing"):
    """A minimal VOC XML (``boxes`` in kdet pixel xyxy, written 1-based inclusive)."""
    objects = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>" for x1, y1, x2, y2 in boxes)
    return (f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")


INVERSE_ORIENTATION = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def write_oriented(path, shown, orientation, **save):
    """Save ``shown`` (the image as a viewer shows it) as stored pixels plus an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = apply_orientation(shown, INVERSE_ORIENTATION[orientation])
    Image.fromarray(stored).save(path, exif=exif.tobytes(), **save)


def scene_with_rectangle(height=80, width=120, box=(70, 10, 110, 30)):
    """Grey noise with a white rectangle filling pixel ``box`` (xyxy) and a dark one elsewhere (asymmetric)."""
    image = np.random.default_rng(0).integers(60, 100, (height, width, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    image[50:70, 5:20] = 0
    return image


def bright_bounds(image, level=200):
    """Pixel xyxy bounds of the pixels brighter than ``level`` in every channel."""
    ys, xs = np.nonzero((np.asarray(image) > level).all(axis=-1))
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


# ------------------------------------------------------------------ load-time check
DAMAGES = {
    # name: (damage(root, image path, xml path), text the error must hold, skip reason)
    "truncated JPEG": (lambda root, img, xml: truncate(img), "truncated", "unreadable image"),
    "zero-byte file": (lambda root, img, xml: img.write_bytes(b""), "empty image file (0 bytes)", "unreadable image"),
    "text file named .jpg": (lambda root, img, xml: img.write_text("not an image\n" * 20),
                             "not an image file", "unreadable image"),
    "XML size 5000 wide": (lambda root, img, xml: set_xml_size(xml, 5000, 480),
                           "the image is 640x480 (width x height) but", "size mismatch"),
    "PNG bytes named .jpg, truncated": (
        lambda root, img, xml: (Image.open(BCCD / "JPEGImages" / img.name).save(img, format="PNG"), truncate(img, 0.6)),
        "truncated", "unreadable image"),
}


@needs_bccd
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_image_is_named_when_the_dataset_loads_or_skipped_and_counted(tmp_path, damage):
    root = bccd_copy(tmp_path / "voc")
    bad = BCCD_IDS[2]
    image, xml = root / "JPEGImages" / f"{bad}.jpg", root / "Annotations" / f"{bad}.xml"
    make_bad, expected, reason = DAMAGES[damage]
    make_bad(root, image, xml)
    with pytest.raises(DatasetError) as err:
        voc(root, "train").records()
    message = str(err.value)
    assert message.startswith(str(image)) and expected in message and "\n" not in message
    if reason == "size mismatch":
        assert f"{xml} says 5000x480" in message
    source = voc(root, "train", skip_invalid=True)
    with pytest.warns(UserWarning, match=f"skipped 1 image \\({reason}\\)"):
        records = source.records()
    assert [r.image_id for r in records] == [i for i in BCCD_IDS if i != bad]
    assert source.skipped["images"] == {reason: 1}


@needs_bccd
def test_the_same_check_runs_for_coco_sources(tmp_path):
    root = bccd_copy(tmp_path / "voc", BCCD_IDS[:3])
    images = [dict(id=i + 1, file_name=f"{name}.jpg", width=640, height=480) for i, name in enumerate(BCCD_IDS[:3])]
    images[1]["width"] = 480  # swapped, as some exporters write
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(dict(images=images, annotations=[], categories=[dict(id=1, name="RBC")])))
    truncate(root / "JPEGImages" / f"{BCCD_IDS[2]}.jpg")
    with pytest.raises(DatasetError, match=f"{BCCD_IDS[1]}.jpg: the image is 640x480 .* but {ann} \\(image id 2\\) says 480x480"):
        coco(ann, root / "JPEGImages").records()
    source = coco(ann, root / "JPEGImages", skip_invalid=True)
    with pytest.warns(UserWarning, match="skipped 2 images \\(1 size mismatch, 1 unreadable image\\)"):
        assert [r.image_id for r in source.records()] == [1]


@needs_bccd
def test_legal_but_odd_images_load(tmp_path):
    """Trailing bytes after a JPEG's end marker (phone motion photos), zero padding, a grey PNG, no <size>."""
    root = bccd_copy(tmp_path / "voc", BCCD_IDS[:4])
    jpegs = root / "JPEGImages"
    (jpegs / f"{BCCD_IDS[0]}.jpg").write_bytes((jpegs / f"{BCCD_IDS[0]}.jpg").read_bytes() + b"ftypmp42" * 500)
    (jpegs / f"{BCCD_IDS[1]}.jpg").write_bytes((jpegs / f"{BCCD_IDS[1]}.jpg").read_bytes() + b"\0" * 64)
    grey = np.asarray(Image.open(jpegs / f"{BCCD_IDS[2]}.jpg").convert("L"))
    (jpegs / f"{BCCD_IDS[2]}.jpg").unlink()
    Image.fromarray(grey).save(jpegs / f"{BCCD_IDS[2]}.png")
    xml = root / "Annotations" / f"{BCCD_IDS[2]}.xml"
    xml.write_text(xml.read_text().replace(".jpg</filename>", ".png</filename>"))
    xml = root / "Annotations" / f"{BCCD_IDS[3]}.xml"
    text = xml.read_text()
    xml.write_text(text[:text.index("<size>")] + text[text.index("</size>") + len("</size>"):])
    for mode in ("quick", "full"):
        records = voc(root, "train", check_images=mode).records()
        assert [(r.width, r.height, r.orientation) for r in records] == [(640, 480, 1)] * 4
    from kdet.data._workers import decode_file

    for record in records:
        assert decode_file(record).shape == (480, 640, 3)


def test_a_record_without_a_size_takes_the_image_size_after_exif(tmp_path):
    write_oriented(tmp_path / "a.jpg", scene_with_rectangle(), 6)
    record = check_record_image(Record("a", str(tmp_path / "a.jpg"), 0, 0))
    assert (record.width, record.height, record.orientation) == (120, 80, 6)


# ------------------------------------------------------------------ EXIF orientation
def test_apply_orientation_is_pils_exif_transpose(tmp_path):
    from PIL import ImageOps

    shown = scene_with_rectangle(7, 11)
    for orientation in range(1, 9):
        write_oriented(tmp_path / "x.png", shown, orientation)
        with Image.open(tmp_path / "x.png") as img:
            np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(img)), shown)


def _oriented_voc(root, orientation, file_format):
    box = (70, 10, 110, 30)
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets/Main").mkdir(parents=True)
    shown = scene_with_rectangle(box=box)
    name = f"o{orientation}.{file_format}"
    write_oriented(root / "JPEGImages" / name, shown, orientation, **({"quality": 98} if file_format == "jpg" else {}))
    (root / "Annotations" / f"o{orientation}.xml").write_text(voc_xml(name, 120, 80, [box]))
    (root / "ImageSets/Main/train.txt").write_text(f"o{orientation}\n")
    return shown, box


@pytest.mark.parametrize("orientation,file_format", [(6, "jpg"), (3, "jpg"), (8, "png"), (5, "png"), (2, "png")])
def test_every_decode_path_returns_the_exif_oriented_pixels_and_the_box_bounds_the_drawn_rectangle(
        tmp_path, orientation, file_format):
    from kdet.data._workers import decode_file
    from kdet.data.pipeline import make_dataset

    shown, box = _oriented_voc(tmp_path / "voc", orientation, file_format)
    source = voc(tmp_path / "voc", "train")
    (record,) = source.records()
    assert (record.width, record.height, record.orientation) == (120, 80, orientation)
    decoded = {"PIL load_image": load_image(record), "OpenCV": decode_file(record),
               "PIL, orientation read from the file": load_image(Record("x", record.image_path, 0, 0))}
    for decode, workers in (("python", 0), ("graph", 0), ("python", 1)):
        images, targets, _ = next(iter(make_dataset([record], (80, 120), 1, training=False, with_meta=True,
                                                    decode=decode, workers=workers)))
        decoded[f"pipeline decode={decode} workers={workers}"] = images[0].numpy()
        np.testing.assert_allclose(targets[0, 0, :4].numpy() * [120, 80, 120, 80], box, atol=1e-4)
    # PNG: exactly the drawn pixels; JPEG (lossy): every decoder close to PIL's (tf.io's chroma
    # upsampling differs by up to ~15 levels at edges; a wrong turn would differ by ~200 on the rectangle)
    reference, tolerance = (shown, (0, 0)) if file_format == "png" else (decoded["PIL load_image"], (32, 2.0))
    for name, image in decoded.items():
        assert image.shape == shown.shape, name
        difference = np.abs(image.astype(int) - reference)
        assert difference.max() <= tolerance[0] and difference.mean() <= tolerance[1], (name, difference.max())
        assert bright_bounds(image) == list(box), name  # the record's box bounds the drawn rectangle


def test_an_annotation_in_the_stored_frame_of_a_turned_jpeg_is_a_size_mismatch(tmp_path):
    _oriented_voc(tmp_path / "voc", 6, "jpg")
    xml = tmp_path / "voc/Annotations/o6.xml"
    xml.write_text(voc_xml("o6.jpg", 80, 120, [(10, 10, 30, 70)]))  # as an EXIF-blind tool saw it
    with pytest.raises(DatasetError, match="o6.jpg: the image is 120x80 .* after EXIF orientation 6 "
                                           "\\(stored 80x120\\) but .*o6.xml says 80x120; kdet reads images EXIF-oriented"):
        voc(tmp_path / "voc", "train").records()


# ------------------------------------------------------------------ failures inside the pipeline
def _png_records(tmp_path, count=4):
    records = []
    for i in range(count):
        path = tmp_path / f"{i}.png"
        Image.fromarray(scene_with_rectangle(30, 40, (5, 5, 20, 20))).save(path)
        records.append(check_record_image(Record(i, str(path), 40, 30, boxes=[[5, 5, 20, 20]], classes=[0])))
    return records


@pytest.mark.parametrize("change", ["truncated", "removed", "replaced by a bigger image", "replaced by text"])
@pytest.mark.parametrize("decode,workers", [("python", 0), ("graph", 0), ("python", 1)])
def test_an_image_that_changes_after_loading_ends_in_one_line_naming_it(tmp_path, change, decode, workers):
    import tensorflow as tf
    from kdet.data.pipeline import input_error, make_dataset

    records = _png_records(tmp_path)
    bad = tmp_path / "2.png"
    if change == "truncated":
        truncate(bad)
    elif change == "removed":
        bad.unlink()
    elif change == "replaced by text":
        bad.write_text("oops")
    else:
        Image.fromarray(scene_with_rectangle(31, 40)).save(bad)
    dataset = make_dataset(records, 16, 2, augment=[hflip()], seed=0, decode=decode, workers=workers)
    with pytest.raises(tf.errors.OpError) as err:
        list(dataset)
    found = input_error(err.value)
    assert isinstance(found, DatasetError)
    message = str(found)
    assert message.startswith(f"{bad}: ") and "\n" not in message and "Traceback" not in message
    assert {"truncated": "truncated PNG", "removed": "", "replaced by text": "",
            "replaced by a bigger image": "40x31"}[change] in message


# ------------------------------------------------------------------ augmentations must keep uint8 RGB
@pytest.mark.parametrize("transform,name", [(A.Normalize(), "Normalize"), (A.ToFloat(), "ToFloat"),
                                            (A.OneOf([A.HorizontalFlip(), A.Normalize()]), "Normalize"),
                                            (A.ToGray(num_output_channels=1, p=1.0), "ToGray")])
def test_an_augmentation_that_changes_dtype_or_channels_is_named(transform, name):
    from kdet.data.pipeline import make_dataset

    with pytest.raises(RecipeError, match=f"data.augment: (A\\.)?{name} .*must return uint8 HxWx3"):
        Augmenter([hflip(), transform])
    records = [Record(0, None, 32, 32, [[2, 2, 20, 20]], [0], image=np.zeros((32, 32, 3), np.uint8))]
    with pytest.raises(RecipeError, match=name):
        make_dataset(records, 16, 1, augment=[transform], workers=0)
    Augmenter([hflip(), A.RandomBrightnessContrast(), A.ToGray(p=1.0)])  # uint8 RGB out: accepted


# ------------------------------------------------------------------ the train tool, as a user runs it
TOOL_RECIPE = """
import sys
sys.path.insert(0, {recipes!r})
from _base_ssd import recipe as base
from kdet.config import merge
from kdet.data.augment import hflip, resize
from kdet.data.sources import voc

recipe = merge(base, dict(
    name="bad_images",
    model=dict(backbone="vgg16_bn", image_size=64, width_multiplier=0.125, backbone_weights=None),
    data=dict(class_names=["Platelets", "RBC", "WBC"], train=voc({root!r}, "train", skip_invalid={skip}),
              augment=[hflip(), resize()], batch_size=2, max_boxes=60, workers=0),
    train=dict(epochs=1, optimizer="adamw", learning_rate=1e-3, warmup_epochs=0, lr_schedule="constant"),
    eval=dict(every_n_epochs=100),
    verbose=0,
))
"""


# a source whose second image is truncated right after the load-time check passed it
DAMAGED_AFTER_LOADING = """
from kdet.data.voc import VOCSource

class DamagedAfterLoading(VOCSource):
    def _checked_images(self, records):
        records = super()._checked_images(records)
        with open(records[1].image_path, "rb") as f:
            data = f.read()
        with open(records[1].image_path, "wb") as f:
            f.write(data[:len(data) // 2])
        return records

recipe["data"]["train"] = DamagedAfterLoading({root!r}, "train")
"""


def _run_train_tool(tmp_path, skip, extra=""):
    recipe = tmp_path / "recipe.py"
    root = str(tmp_path / "voc")
    recipe.write_text(TOOL_RECIPE.format(recipes=str(REPO / "recipes"), root=root, skip=skip) + extra.format(root=root))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), str(recipe),
                           "--work-dir", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600)


@needs_bccd
def test_train_tool_names_a_truncated_jpeg_in_one_line(tmp_path):
    bccd_copy(tmp_path / "voc", BCCD_IDS[:5])
    bad = tmp_path / "voc/JPEGImages" / f"{BCCD_IDS[3]}.jpg"
    truncate(bad)
    run = _run_train_tool(tmp_path, skip=False)
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last == f"error: {bad}: truncated JPEG (no end-of-image marker); the decoder stops early", last
    assert "Traceback" not in run.stderr


@needs_bccd
def test_train_tool_with_skip_invalid_trains_and_reports_the_skip(tmp_path):
    bccd_copy(tmp_path / "voc", BCCD_IDS[:5])
    truncate(tmp_path / "voc/JPEGImages" / f"{BCCD_IDS[3]}.jpg")
    run = _run_train_tool(tmp_path, skip=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped 1 image (unreadable image)" in run.stderr
    assert "train: 4 images" in run.stdout
    assert (tmp_path / "work" / "last.keras").is_file()


@needs_bccd
def test_train_tool_names_an_image_damaged_after_loading_in_one_line(tmp_path):
    bccd_copy(tmp_path / "voc", BCCD_IDS[:4])  # 4 images, batch 2: the epoch uses every one
    run = _run_train_tool(tmp_path, skip=False, extra=DAMAGED_AFTER_LOADING)
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    bad = tmp_path / "voc/JPEGImages" / f"{BCCD_IDS[1]}.jpg"
    assert last == (f"error: {bad}: truncated JPEG (no end-of-image marker) (it was readable when the dataset "
                    "loaded: was it changed or removed since?)"), last
    assert "Traceback" not in run.stderr
