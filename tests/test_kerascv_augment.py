"""keras-cv augmentation in the tf.data graph: boxes stay on their objects, flags travel, seeds repeat.

Truth comes from the pixels, as in test_augment.py: rectangles of distinct colours are drawn into an
image; after each keras-cv layer, every surviving box must hold its rectangle's visible pixels (and,
for axis-aligned layers, bound them tightly), and a box whose rectangle left the image must be gone
with its class and ignore flag.
"""

import numpy as np
import pytest
import tensorflow as tf

keras_cv = pytest.importorskip("keras_cv")

from kdet.config import RecipeError  # noqa: E402
from kdet.data.augment import hflip, ssd_augmentation  # noqa: E402
from kdet.data.kerascv_augment import KerasCVAugmenter, recipe_augment, ssd_augmentation_kerascv  # noqa: E402
from kdet.data.pipeline import make_dataset  # noqa: E402
from kdet.data.records import Record  # noqa: E402
from test_augment import AREAS, COLOURS, RECTS, colour_hits, pixel_bounds, scene  # noqa: E402
from test_pipeline import check_boxes_bound_their_rectangles, rectangle_records  # noqa: E402

FMT = "xyxy"
SEEDS = range(4)

# (layer, tight): tight layers keep boxes axis-aligned, so the box must bound the pixels closely;
# rotation and shear enlarge boxes to the turned corners, so those must only contain the pixels.
LAYERS = {
    "flip": (lambda: keras_cv.layers.RandomFlip(mode="horizontal_and_vertical", bounding_box_format=FMT), True),
    "jittered_resize": (lambda: keras_cv.layers.JitteredResize(target_size=(160, 200), scale_factor=(0.4, 1.6),
                                                               bounding_box_format=FMT), True),
    "crop_and_resize": (lambda: keras_cv.layers.RandomCropAndResize(
        target_size=(160, 200), crop_area_factor=(0.1, 0.6), aspect_ratio_factor=(0.5, 2.0),
        bounding_box_format="rel_xyxy"), True),
    "translation": (lambda: keras_cv.layers.RandomTranslation(0.3, 0.3, fill_mode="constant",
                                                                          bounding_box_format=FMT), True),
    "rotation": (lambda: keras_cv.layers.RandomRotation(factor=0.04, fill_mode="constant",
                                                                 bounding_box_format=FMT), False),
    # keras-cv 0.9's sheared boxes miss the sheared pixels by up to ~9 px on this 320x240 scene (factor 0.2):
    # expected to fail (strict xfail below: it will say when keras-cv fixes it); the README advises against it
    "shear_x": (lambda: keras_cv.layers.RandomShear(x_factor=0.2, fill_mode="constant", bounding_box_format=FMT),
                False),
    "shear_y": (lambda: keras_cv.layers.RandomShear(y_factor=0.2, fill_mode="constant", bounding_box_format=FMT),
                False),
}


def augment_once(layers, seed, image=None, boxes=None, classes=None, ignore=None):
    base_image, base_boxes, base_classes, base_ignore, _ = scene()
    image = base_image if image is None else image
    boxes = base_boxes if boxes is None else boxes
    classes = base_classes if classes is None else classes
    ignore = base_ignore if ignore is None else ignore
    out = KerasCVAugmenter(layers)(tf.constant(image), tf.constant(boxes, tf.float32), tf.constant(classes),
                                   tf.constant(ignore, tf.float32), tf.constant([seed, 7], tf.int64))
    return [t.numpy() for t in out]


SHEAR_XFAIL = pytest.mark.xfail(strict=True, reason="keras-cv 0.9 shear boxes")


@pytest.mark.parametrize("name", [pytest.param(n, marks=SHEAR_XFAIL) if n.startswith("shear") else n for n in LAYERS])
def test_each_layer_keeps_boxes_on_their_objects_and_flags_with_classes(name):
    make, tight = LAYERS[name]
    layer = make()
    dropped = 0
    for seed in SEEDS:
        image, boxes, classes, ignore = augment_once([layer], seed)
        assert image.dtype == np.uint8 and image.shape[2] == 3
        np.testing.assert_array_equal(ignore, classes % 2 == 1)  # scene(): odd classes are ignored
        assert len(set(classes.tolist())) == len(classes)
        for box, k in zip(boxes, classes):
            if min(box[2] - box[0], box[3] - box[1]) < 3:
                continue  # a sliver at the border: too thin to hold pixels clear of interpolated edges
            truth = pixel_bounds(colour_hits(image, COLOURS[k], tolerance=8))
            assert truth is not None, f"{name}: box of object {k} kept with none of its pixels visible"
            assert (box[:2] <= truth[:2] + 1.5).all() and (box[2:] >= truth[2:] - 1.5).all(), (name, k, box, truth)
            if tight:
                np.testing.assert_allclose(box, truth, atol=2.5, err_msg=f"{name}: object {k}")
            else:  # the turned rectangle's bounding box: larger, but not by much
                area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
                assert area(box) <= 1.8 * area(truth), (name, k, box, truth)
        for k in set(range(len(RECTS))) - set(classes.tolist()):
            dropped += 1
            assert colour_hits(image, COLOURS[k], tolerance=8).sum() < 0.02 * AREAS[k], f"{name}: {k} dropped"
    if name == "crop_and_resize":
        assert dropped > 0  # the check of dropped boxes ran


def test_crop_and_resize_in_pixels_is_refused():  # keras-cv 0.9 scales its pixel boxes to the input image
    layer = keras_cv.layers.RandomCropAndResize(target_size=(160, 200), crop_area_factor=(0.3, 1.0),
                                                aspect_ratio_factor=(0.5, 2.0), bounding_box_format="xyxy")
    with pytest.raises(RecipeError, match="RandomCropAndResize.*rel_xyxy"):
        KerasCVAugmenter([layer])


def test_boxes_left_outside_are_clipped_or_dropped_with_their_flags():
    # a brightness change keeps every box: kdet's own clip after the layers must cut the box across the right
    # border and drop the one wholly outside, with its class and flag
    layer = keras_cv.layers.RandomBrightness(factor=0.1, value_range=(0, 255))
    image, _, _, _, _ = scene()
    boxes = np.array([[300, 10, 340, 50], [330, 60, 350, 90], [10, 10, 20, 20]], np.float32)
    _, out_boxes, out_classes, out_ignore = augment_once([layer], 0, image, boxes, np.array([4, 1, 2]),
                                                         np.array([1, 0, 0], np.float32))
    np.testing.assert_array_equal(out_classes, [4, 2])
    np.testing.assert_array_equal(out_ignore, [1, 0])
    np.testing.assert_allclose(out_boxes, [[300, 10, 320, 50], [10, 10, 20, 20]])


def test_colour_jitter_changes_pixels_not_boxes():
    layer = keras_cv.layers.RandomColorJitter(value_range=(0, 255), brightness_factor=0.2, contrast_factor=0.5,
                                              saturation_factor=0.5, hue_factor=0.1)
    base, boxes, classes, ignore, _ = scene()
    image, out_boxes, out_classes, out_ignore = augment_once([layer], 3)
    assert not np.array_equal(image, base)
    np.testing.assert_allclose(out_boxes, boxes)
    np.testing.assert_array_equal(out_classes, classes)
    np.testing.assert_array_equal(out_ignore, ignore)


def test_box_cropped_away_disappears_with_its_class_and_flag():
    # a shift left by 160 px: object 0 (x 0..60) leaves, 1 (x 100..200) is cut at x 0, 2 (x 200..300) moves
    # whole; the flags are chosen so that a shift of flags onto other boxes shows
    image, _, _, _, _ = scene()
    boxes = np.array([[0, 20, 60, 80], [100, 30, 200, 90], [200, 120, 300, 200]], np.float32)
    classes = np.array([5, 0, 2], np.int32)
    ignore = np.array([1, 0, 1], np.float32)
    layer = keras_cv.layers.RandomTranslation(0.0, (-0.5, -0.5), fill_mode="constant", bounding_box_format=FMT)
    _, out_boxes, out_classes, out_ignore = augment_once([layer], 0, image, boxes, classes, ignore)
    np.testing.assert_array_equal(out_classes, [0, 2])
    np.testing.assert_array_equal(out_ignore, [0, 1])
    np.testing.assert_allclose(out_boxes, [[0, 30, 40, 90], [40, 120, 140, 200]], atol=1e-3)


def test_seeded_draws_repeat_and_seeds_differ():
    layers = [make() for make, _ in LAYERS.values()]
    first = augment_once(layers, 11)
    tf.random.set_seed(123)  # the global generator must play no part
    again = augment_once(layers, 11)
    other = augment_once(layers, 12)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def kerascv_chain(size=96):
    return [keras_cv.layers.RandomColorJitter(value_range=(0, 255), brightness_factor=0.1, contrast_factor=0.2,
                                              saturation_factor=0.2, hue_factor=0.02),
            keras_cv.layers.RandomFlip(mode="horizontal", bounding_box_format=FMT),
            keras_cv.layers.JitteredResize(target_size=(size, size), scale_factor=(0.5, 1.5),
                                           bounding_box_format=FMT)]


def test_make_dataset_boxes_bound_their_rectangles_and_flags_survive():
    records = rectangle_records()
    for r in records:
        r.difficult = np.array([False, True])
    dataset = make_dataset(records, 96, 2, augment=kerascv_chain(), seed=1, max_boxes=8)
    checked = 0
    for _ in range(3):
        for images, targets in dataset:
            t = targets.numpy()
            assert images.dtype == tf.uint8 and images.shape == (2, 96, 96, 3) and t.shape == (2, 8, 6)
            real = t[..., 4] >= 0
            assert (t[~real] == [0, 0, 0, 0, -1, 0]).all()
            assert (t[real][:, :4] >= 0).all() and (t[real][:, :4] <= 1).all()
            np.testing.assert_array_equal(t[real][:, 5], t[real][:, 4] % 2)  # class 2i+1 is the difficult one
            checked += check_boxes_bound_their_rectangles(images, targets)
    assert checked >= 12


def batches(dataset):
    return [t.numpy() for batch in dataset for t in batch[:2]]


def test_seeded_runs_repeat_passes_differ_and_the_epoch_variable_holds():
    records = rectangle_records(4)
    plain = lambda **kw: make_dataset(records, 64, 2, augment=kerascv_chain(64), seed=3, max_boxes=4,  # noqa
                                      shuffle=False, **kw)  # same order each pass: only the augmentation differs
    dataset = plain()
    first, second = batches(dataset), batches(dataset)
    fresh = batches(plain())
    assert all(np.array_equal(a, b) for a, b in zip(first, fresh))
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))
    epoch = tf.Variable(0, dtype=tf.int64)
    by_epoch = plain(epoch=epoch)
    e0 = batches(by_epoch)
    epoch.assign(1)
    e1 = batches(by_epoch)
    epoch.assign(0)
    assert all(np.array_equal(a, b) for a, b in zip(e0, batches(by_epoch)))
    assert not all(np.array_equal(a, b) for a, b in zip(e0, e1))
    assert all(np.array_equal(a, b) for a, b in zip(e1, batches(plain(epoch=tf.Variable(1, dtype=tf.int64)))))


def test_mixed_lists_workers_and_backend_errors():
    records = rectangle_records(2)
    flip = keras_cv.layers.RandomFlip(mode="horizontal", bounding_box_format=FMT)
    with pytest.raises(RecipeError, match="mixes keras-cv layers .RandomFlip. with other entries .HorizontalFlip"):
        make_dataset(records, 32, 2, augment=[flip, hflip()])
    with pytest.raises(ValueError, match="keras-cv augmentation .* workers=0"):
        make_dataset(records, 32, 2, augment=[flip], workers=2)
    assert recipe_augment(dict(augment=[flip], augment_backend="keras_cv"), (32, 32)) == [flip]
    preset = recipe_augment(dict(augment=ssd_augmentation(), augment_backend="keras_cv"), (32, 48))
    assert isinstance(preset, KerasCVAugmenter) and preset.resize_first == (32, 48)
    assert [type(t).__name__ for t in preset.layers] == ["RandomColorJitter", "JitteredResize", "RandomFlip"]
    with pytest.raises(RecipeError, match="lists albumentations entries of its own"):
        recipe_augment(dict(augment=[hflip()], augment_backend="keras_cv"), (32, 32))
    with pytest.raises(RecipeError, match="augment_backend must be"):
        recipe_augment(dict(augment=[hflip()], augment_backend="kerascv"), (32, 32))


def test_ssd_preset_keeps_boxes_on_objects_in_batches():
    records = rectangle_records()
    dataset = make_dataset(records, 80, 5, augment=ssd_augmentation_kerascv(80), seed=0, max_boxes=4)
    checked = sum(check_boxes_bound_their_rectangles(images, targets) for _ in range(3) for images, targets in dataset)
    assert checked >= 10


def test_empty_images_pass():
    record = Record(0, None, 40, 30, boxes=np.zeros((0, 4)), classes=[], image=np.full((30, 40, 3), 9, np.uint8))
    (images, targets), = list(make_dataset([record], 32, 1, augment=kerascv_chain(32), seed=0, max_boxes=3))
    assert images.shape == (1, 32, 32, 3) and (targets.numpy()[..., 4] == -1).all()


def test_recipe_backend_reaches_the_training_dataset():
    from kdet.config import load_recipe  # noqa: F401  (the schema holds the key)
    from kdet.defaults import default_recipe
    from kdet.engine import build_train_dataset

    recipe = default_recipe()
    recipe["model"]["image_size"] = 48
    recipe["data"].update(batch_size=2, max_boxes=4, augment_backend="keras_cv")
    records = rectangle_records(4)
    first = [t.numpy() for batch in build_train_dataset(recipe, records, seed=5) for t in batch]
    again = [t.numpy() for batch in build_train_dataset(recipe, records, seed=5) for t in batch]
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and first[0].shape == (2, 48, 48, 3)
    plain = [t.numpy() for batch in make_dataset(records, 48, 2, augment=None, seed=5, max_boxes=4) for t in batch]
    assert not np.array_equal(first[0], plain[0])  # augmented
