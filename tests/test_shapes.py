"""Synthetic shapes: determinism, boxes against the drawn pixels, VOC output, cache."""

from pathlib import Path

import numpy as np
import pytest

from kdet.data.records import load_image
from kdet.data.shapes import SHAPES_CLASSES, generate_shapes, render_scene, shape_mask, _apply_occlusion
from kdet.data.sources import DatasetError, shapes, voc

SMALL = dict(num_train=6, num_test=3, image_size=64)


def read_tree(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = read_tree(generate_shapes(tmp_path / "a", **SMALL))
    b = read_tree(generate_shapes(tmp_path / "b", **SMALL))
    assert len(a) == 2 * 9 + 5  # jpg + xml per image, 4 split files (val empty), the parameter file
    assert a == b
    c = read_tree(generate_shapes(tmp_path / "c", seed=1, **SMALL))
    assert c[Path("JPEGImages/train_00000.jpg")] != a[Path("JPEGImages/train_00000.jpg")]


def test_boxes_bound_the_drawn_pixels():
    """On a flat background with exact colours, each shape's pixels (found by colour) fit its box,
    and touch all four sides of it when nothing covers the shape."""
    checked_exact = 0
    for index in range(30):
        rng = np.random.default_rng([7, index])
        image, objects = render_scene(rng, image_size=64, max_objects=5, textured=False, noise_std=0)
        assert (image == 128).all(axis=-1).any()  # some background left
        for k, obj in enumerate(objects):
            ys, xs = np.nonzero((image == obj["color"].astype(np.uint8)).all(axis=-1))
            assert len(xs) > 0
            x1, y1, x2, y2 = obj["box"]
            assert x1 <= xs.min() and xs.max() + 1 <= x2 and y1 <= ys.min() and ys.max() + 1 <= y2
            covered = any((obj["mask"] & later["mask"]).any() for later in objects[k + 1:])
            if not covered:
                np.testing.assert_array_equal([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], obj["box"])
                checked_exact += 1
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
    assert checked_exact > 40


def test_shape_sizes_and_classes_look_right():
    rng = np.random.default_rng(0)
    square = shape_mask("square", 20, (32, 32), 64, rng)
    circle = shape_mask("circle", 20, (32, 32), 64, rng)
    ring = shape_mask("ring", 20, (32, 32), 64, rng)
    assert 0.45 < circle.sum() / 400 < 0.9  # pi/4 of the 20x20 square
    assert ring.sum() < 0.8 * circle.sum() and not ring[32, 32] and circle[32, 32]
    ys, xs = np.nonzero(square)
    assert xs.max() + 1 - xs.min() <= 21 and ys.max() + 1 - ys.min() <= 21  # fits its 20 px square when rotated
    counts = np.zeros(len(SHAPES_CLASSES))
    for index in range(150):
        _, objects = render_scene(np.random.default_rng([3, index]), image_size=64)
        for obj in objects:
            counts[obj["class_id"]] += 1
    share = counts / counts.sum()
    assert share[0] > 0.3 and share[0] > share[1] > share[2] and share[4] < 0.14  # imbalanced, circles most


def test_occlusion_marks_difficult_and_drops_hidden():
    def obj(x1, x2):
        mask = np.zeros((10, 10), bool)
        mask[0:1, x1:x2] = True
        return dict(class_id=0, mask=mask, difficult=False, box=None, color=None)

    hidden, three_fifths, right, top = obj(0, 2), obj(2, 7), obj(7, 10), obj(0, 5)
    # top hides all of `hidden` and 3 of 5 pixels (60%, not more) of `three_fifths`
    kept = _apply_occlusion([hidden, three_fifths, right, top])
    assert [id(o) for o in kept] == [id(three_fifths), id(right), id(top)]
    assert [o["difficult"] for o in kept] == [False, False, False]
    over = obj(1, 9)  # hides all of `three_fifths` and 2 of 3 pixels (67%) of `right`
    kept = _apply_occlusion([three_fifths, right, over])
    assert [id(o) for o in kept] == [id(right), id(over)] and right["difficult"] and not over["difficult"]


def test_written_dataset_reads_back_with_voc(tmp_path):
    root = generate_shapes(tmp_path / "s", **SMALL)
    train = voc(root, "train", class_names=list(SHAPES_CLASSES))
    assert len(train) == 6 and len(voc(root, "test")) == 3 and len(voc(root, "trainval")) == 6
    record = train.records()[2]
    _, objects = render_scene(np.random.default_rng([0, 0, 2]), image_size=64)  # what the generator drew
    np.testing.assert_array_equal(record.boxes, [o["box"] for o in objects])
    assert record.classes.tolist() == [o["class_id"] for o in objects]
    assert record.difficult.tolist() == [o["difficult"] for o in objects]
    image = load_image(record)
    assert image.shape == (64, 64, 3)
    # JPEG at quality 95: an unoccluded shape's box still holds its colour
    obj = objects[-1]
    x1, y1, x2, y2 = obj["box"].astype(int)
    inside = image[y1:y2, x1:x2][obj["mask"][y1:y2, x1:x2]].astype(float)
    assert np.abs(np.median(inside, axis=0) - obj["color"]).max() < 25


def test_shapes_factory_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("KDET_CACHE", str(tmp_path / "cache"))
    source = shapes(split="test", **SMALL)
    assert not (tmp_path / "cache").exists()  # generated on first use, not when the recipe is read
    assert len(source) == 3 and source.class_names == list(SHAPES_CLASSES)
    (root,) = (tmp_path / "cache").glob("shapes-*")
    stamp = (root / "JPEGImages" / "test_00000.jpg").stat().st_mtime_ns
    assert len(shapes(split="train", **SMALL)) == 6
    assert (root / "JPEGImages" / "test_00000.jpg").stat().st_mtime_ns == stamp  # reused, not regenerated
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no staging folders left
    shapes(split="test", **dict(SMALL, seed=3)).records()
    assert len(list((tmp_path / "cache").glob("shapes-*"))) == 2


def test_generate_refuses_foreign_or_changed_folders(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a kdet shapes dataset"):
        generate_shapes(tmp_path / "mine", **SMALL)
    root = generate_shapes(tmp_path / "s", **SMALL)
    with pytest.raises(DatasetError, match="other parameters; pass overwrite=True"):
        generate_shapes(root, **dict(SMALL, num_test=2))
    generate_shapes(root, overwrite=True, **dict(SMALL, num_test=2))
    assert len(voc(root, "test")) == 2


def test_validation_split_is_drawn_apart_from_the_reported_test_split(tmp_path):
    root = generate_shapes(tmp_path / "s", **dict(SMALL, num_val=2))
    val, test = voc(root, "val").records(), voc(root, "test").records()
    assert len(val) == 2 and len(test) == 3 and len(voc(root, "train")) == 6
    _, objects = render_scene(np.random.default_rng([0, 2, 1]), image_size=64)  # split code 2, index 1
    np.testing.assert_array_equal(val[1].boxes, [o["box"] for o in objects])
    assert not np.array_equal(load_image(val[0]), load_image(test[0]))
