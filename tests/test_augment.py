"""Augmentation keeps every surviving box on its object.

Truth comes from the pixels: filled rectangles in distinct colours are drawn
into an image (and into a label mask, which albumentations warps with nearest
interpolation and photometric changes leave alone); after augmenting, each
surviving box must bound its rectangle's visible pixels.
"""

import numpy as np
import pytest

from kdet.boxes import iou_matrix_np
from kdet.data.augment import (IMAGENET_MEAN_RGB, Augmenter, MinIoURandomCrop, _ResizeToModel, bbox_safe_crop,
                               dataset_mean, expand, hflip, min_iou_crop, mosaic, photometric, resize, rotate,
                               ssd_augmentation, vflip)

HEIGHT, WIDTH = 240, 320
BACKGROUND = (90, 90, 90)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (255, 128, 0), (128, 0, 255), (0, 128, 64), (255, 255, 255), (0, 0, 0), (128, 255, 128)]
# pixel xyxy, well apart and away from the border (rotations keep their corners inside)
RECTS = np.array([[30, 30, 100, 80], [180, 40, 260, 120], [60, 140, 150, 200], [220, 160, 280, 210]], np.float32)


def scene(rects=RECTS, colours=COLOURS):
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[:] = BACKGROUND
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(rects.astype(int)):
        image[y0:y1, x0:x1] = colours[k]
        mask[y0:y1, x0:x1] = k + 1
    classes = np.arange(len(rects), dtype=np.int32)
    ignore = classes % 2 == 1
    return image, rects.copy(), classes, ignore, mask


def pixel_bounds(hits):
    """xyxy (continuous) bounding the True pixels, or None."""
    ys, xs = np.nonzero(hits)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def colour_hits(image, colour, tolerance=0):
    if tolerance == 0:
        return (image == np.array(colour, np.uint8)).all(axis=-1)
    return np.abs(image.astype(np.int16) - np.array(colour, np.int16)).max(axis=-1) <= tolerance


def check_survivors(boxes, classes, ignore, hits_of, tolerance):
    """Every surviving box bounds its object's visible pixels; flags travel with classes."""
    assert len(boxes) == len(classes) == len(ignore)
    assert np.array_equal(ignore, classes % 2 == 1)
    assert len(set(classes.tolist())) == len(classes)  # no box duplicated
    for box, k in zip(boxes, classes):
        truth = pixel_bounds(hits_of(k))
        assert truth is not None, f"box of object {k} survived but none of its pixels are visible"
        np.testing.assert_allclose(box, truth, atol=tolerance, err_msg=f"object {k}")


def check_dropped_mostly_gone(classes, hits_of, areas, max_fraction=0.5):
    for k in set(range(len(areas))) - set(classes.tolist()):
        visible = hits_of(k).sum() / areas[k]
        assert visible < max_fraction, f"object {k} dropped with {visible:.0%} still visible"


AREAS = (RECTS[:, 2] - RECTS[:, 0]) * (RECTS[:, 3] - RECTS[:, 1])
SEEDS = range(6)


# Geometric transforms without interpolation: checked on the image's own colours.
@pytest.mark.parametrize("make", [lambda: expand(max_ratio=3.0, p=1.0), min_iou_crop, lambda: bbox_safe_crop(p=1.0),
                                  lambda: bbox_safe_crop(erosion_rate=0.5, p=1.0), lambda: hflip(p=1.0),
                                  lambda: vflip(p=1.0)],
                         ids=["expand", "min_iou_crop", "bbox_safe_crop", "bbox_safe_crop_eroded", "hflip", "vflip"])
def test_pixel_exact_transforms_keep_boxes_on_objects(make):
    image, boxes, classes, ignore, _ = scene()
    augmenter = Augmenter([make()])
    for seed in SEEDS:
        out, out_boxes, out_classes, out_ignore = augmenter(image, boxes, classes, ignore, seed=seed)
        hits_of = lambda k: colour_hits(out, COLOURS[k])  # noqa: E731
        check_survivors(out_boxes, out_classes, out_ignore, hits_of, tolerance=0.5)
        check_dropped_mostly_gone(out_classes, hits_of, AREAS)
        for box, k in zip(out_boxes, out_classes):  # kept boxes are at least min_visibility visible
            assert hits_of(k).sum() >= 0.3 * AREAS[k] - 1


def test_min_iou_crop_keeps_only_boxes_with_centre_inside():
    image, boxes, classes, ignore, _ = scene()
    dot = (7, 77, 177)
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2).astype(int)
    for cx, cy in centres:  # a 2x2 marker on each centre pixel corner
        image[cy - 1:cy + 1, cx - 1:cx + 1] = dot
    augmenter = Augmenter([min_iou_crop(min_ious=(0.1, 0.3, 0.0))])
    dropped = 0
    for seed in range(12):
        out, out_boxes, out_classes, _ = augmenter(image, boxes, classes, ignore, seed=seed)
        dropped += 4 - len(out_boxes)
        for box in out_boxes:
            x0, y0, x1, y1 = box.astype(int)
            assert colour_hits(out[y0:y1 + 1, x0:x1 + 1], dot).any(), "kept a box whose centre left the crop"
    assert dropped > 0


def test_flip_moves_boxes_to_hand_computed_place():
    image, boxes, classes, ignore, _ = scene()
    _, flipped, _, _ = Augmenter([hflip(p=1.0)])(image, boxes, classes, ignore, seed=0)
    np.testing.assert_allclose(flipped[0], [WIDTH - 100, 30, WIDTH - 30, 80])


def test_expand_fills_canvas_with_mean_and_keeps_box_sizes():
    image, boxes, classes, ignore, _ = scene()
    out, out_boxes, out_classes, _ = Augmenter([expand(max_ratio=4.0, p=1.0)])(image, boxes, classes, ignore, seed=3)
    assert out.shape[0] >= HEIGHT and out.shape[1] >= WIDTH and len(out_boxes) == 4
    np.testing.assert_allclose(out_boxes[:, 2:] - out_boxes[:, :2], boxes[:, 2:] - boxes[:, :2])
    placed = pixel_bounds(~colour_hits(out, np.round(IMAGENET_MEAN_RGB)))
    np.testing.assert_allclose(placed[2:] - placed[:2], [WIDTH, HEIGHT])  # only the original is not mean-filled
    np.testing.assert_allclose(out_boxes[0], boxes[0] + np.tile(placed[:2], 2))


# Interpolating transforms: checked on the warped label mask.
@pytest.mark.parametrize("make,tolerance", [(lambda: resize((150, 200)), 2.0), (lambda: resize(300), 2.0),
                                            (lambda: rotate(limit=10, p=1.0), 2.0)], ids=["resize", "resize_square", "rotate"])
def test_interpolating_transforms_keep_boxes_on_objects(make, tolerance):
    image, boxes, classes, ignore, mask = scene()
    augmenter = Augmenter([make()])
    for seed in SEEDS:
        out, out_boxes, out_classes, out_ignore, out_mask = augmenter(image, boxes, classes, ignore, seed=seed,
                                                                      mask=mask)
        assert len(out_boxes) == 4  # nothing leaves the image
        check_survivors(out_boxes, out_classes, out_ignore, lambda k: out_mask == k + 1, tolerance)
        for box, k in zip(out_boxes, out_classes):  # the image moved with the mask
            cx, cy = ((box[:2] + box[2:]) / 2).astype(int)
            assert np.abs(out[cy, cx].astype(int) - COLOURS[k]).max() <= 2


def test_photometric_changes_colours_only():
    image, boxes, classes, ignore, _ = scene()
    augmenter = Augmenter([photometric()])
    changed = 0
    for seed in SEEDS:
        out, out_boxes, out_classes, out_ignore = augmenter(image, boxes, classes, ignore, seed=seed)
        assert out.shape == image.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out_boxes, boxes)
        np.testing.assert_array_equal(out_classes, classes)
        changed += not np.array_equal(out, image)
        # a per-pixel colour map: pixels of one colour stay one colour
        for k in range(4):
            x0, y0, x1, y1 = boxes[k].astype(int)
            patch = out[y0:y1, x0:x1].reshape(-1, 3)
            assert (patch == patch[0]).all()
    assert changed >= 4


def test_photometric_identity_and_channel_swap():
    image, boxes, classes, ignore, _ = scene()
    identity = photometric(brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=0,
                           channel_swap=False)
    out = Augmenter([identity])(image, boxes, classes, ignore, seed=0)[0]
    np.testing.assert_array_equal(out, image)
    swap = photometric(brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=0)
    seen = set()
    for seed in range(20):
        out = Augmenter([swap])(image, boxes, classes, ignore, seed=seed)[0]
        perm = [[c for c in range(3) if np.array_equal(out[..., d], image[..., c])][0] for d in range(3)]
        seen.add(tuple(perm))
    assert (0, 1, 2) in seen and len(seen) >= 3


def test_full_ssd_chain_keeps_boxes_on_objects():
    image, boxes, classes, ignore, mask = scene()
    augmenter = Augmenter(ssd_augmentation(), image_size=(120, 160))
    survivors = 0
    for seed in range(10):
        out, out_boxes, out_classes, out_ignore, out_mask = augmenter(image, boxes, classes, ignore, seed=seed,
                                                                      mask=mask)
        assert out.shape == (120, 160, 3) and out_mask.shape == (120, 160)
        check_survivors(out_boxes, out_classes, out_ignore, lambda k: out_mask == k + 1, tolerance=2.0)
        survivors += len(out_boxes)
    assert survivors > 0


def test_full_chain_without_resize_drops_only_mostly_hidden_boxes():
    image, boxes, classes, ignore, mask = scene()
    chain = [t for t in ssd_augmentation() if not isinstance(t, _ResizeToModel)]  # scale 1: areas comparable
    augmenter = Augmenter(chain)
    for seed in range(10):
        _, out_boxes, out_classes, out_ignore, out_mask = augmenter(image, boxes, classes, ignore, seed=seed,
                                                                    mask=mask)
        hits_of = lambda k: out_mask == k + 1  # noqa: E731
        check_survivors(out_boxes, out_classes, out_ignore, hits_of, tolerance=0.5)
        check_dropped_mostly_gone(out_classes, hits_of, AREAS)


def test_deterministic_under_seed():
    image, boxes, classes, ignore, _ = scene()
    first = Augmenter(ssd_augmentation(), seed=7, image_size=100)
    second = Augmenter(ssd_augmentation(), seed=7, image_size=100)
    outputs = []
    for _ in range(4):
        a, b = first(image, boxes, classes, ignore), second(image, boxes, classes, ignore)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        outputs.append(a[0])
    assert any(not np.array_equal(outputs[0], o) for o in outputs[1:])  # the stream moves on
    again = first(image, boxes, classes, ignore, seed=123), first(image, boxes, classes, ignore, seed=123)
    for x, y in zip(*again):
        np.testing.assert_array_equal(x, y)


def test_min_iou_crop_accepts_only_patches_meeting_the_minimum():
    boxes_px = np.array([[20, 20, 60, 60], [150, 100, 300, 220]], np.float64)
    normalised = boxes_px / [WIDTH, HEIGHT, WIDTH, HEIGHT]
    crop = MinIoURandomCrop(min_ious=(0.7,))
    whole = MinIoURandomCrop(min_ious=(None,))
    for seed in range(10):
        crop.set_random_seed(seed)
        params = crop.get_params_dependent_on_data({"shape": (HEIGHT, WIDTH, 3)}, {"bboxes": normalised})
        x0, y0, x1, y1 = params["crop_coords"]
        centres = (boxes_px[:, :2] + boxes_px[:, 2:]) / 2
        inside = (centres[:, 0] > x0) & (centres[:, 0] < x1) & (centres[:, 1] > y0) & (centres[:, 1] < y1)
        np.testing.assert_array_equal(params["keep"], inside)
        ious = iou_matrix_np(boxes_px, [[x0, y0, x1, y1]])[:, 0]
        assert (ious[inside] >= 0.7).any()
        assert 0.3 * WIDTH - 1 <= x1 - x0 and 0.3 * HEIGHT - 1 <= y1 - y0
        whole.set_random_seed(seed)
        params = whole.get_params_dependent_on_data({"shape": (HEIGHT, WIDTH, 3)}, {"bboxes": normalised})
        assert params["crop_coords"] == (0, 0, WIDTH, HEIGHT)


def test_empty_boxes_and_invalid_input():
    image, *_ = scene()
    out, boxes, classes, ignore = Augmenter(ssd_augmentation(), image_size=64)(image, np.zeros((0, 4)), [], [],
                                                                                 seed=1)
    assert out.shape == (64, 64, 3) and boxes.shape == (0, 4) and len(classes) == len(ignore) == 0
    with pytest.raises(ValueError, match="uint8"):
        Augmenter([hflip()])(image.astype(np.float32), RECTS, [0, 1, 2, 3], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="length"):
        Augmenter([hflip()])(image, RECTS, [0, 1], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="image_size"):
        Augmenter([resize()])
    with pytest.raises(ValueError, match="first"):
        Augmenter([hflip(), mosaic()])


def test_mosaic_keeps_boxes_on_objects():
    samples = []
    for j in range(4):
        image, boxes, classes, ignore, _ = scene(RECTS[:3], COLOURS[3 * j:3 * j + 3])
        samples.append((image, boxes[:3], classes[:3] + 3 * j, (classes[:3] + 3 * j) % 2 == 1))
    spec = mosaic(p=1.0)
    total = 0
    for seed in SEEDS:
        out, boxes, classes, ignore = spec.combine(samples, np.random.default_rng(seed))
        assert out.shape == (HEIGHT, WIDTH, 3)
        check_survivors(boxes, classes, ignore, lambda k: colour_hits(out, COLOURS[k], tolerance=8), tolerance=2.0)
        total += len(boxes)
    assert total > 0


def test_dataset_mean_by_hand():
    from kdet.data.records import Record

    a = np.zeros((2, 2, 3), np.uint8)
    b = np.full((2, 2, 3), [10, 20, 30], np.uint8)
    records = [Record(i, None, 2, 2, image=img) for i, img in enumerate([a, b])]
    np.testing.assert_allclose(dataset_mean(records), [5, 10, 15])


def test_fused_expand_crop_resize_matches_the_separate_transforms():
    image, boxes, classes, ignore, mask = scene()
    fused = Augmenter(ssd_augmentation(), image_size=(90, 120))
    separate = Augmenter(ssd_augmentation(), image_size=(90, 120), fuse=False)
    assert any(type(t).__name__ == "ExpandCropResize" for t in fused._new_compose().transforms)
    for seed in range(8):
        a = fused(image, boxes, classes, ignore, seed=seed, mask=mask)
        b = separate(image, boxes, classes, ignore, seed=seed, mask=mask)
        np.testing.assert_allclose(a[1], b[1], atol=1e-3)
        np.testing.assert_array_equal(a[2], b[2])
        np.testing.assert_array_equal(a[3], b[3])
        for k in a[2]:  # objects land on the same pixels, give or take one (nearest-neighbour rounding)
            np.testing.assert_allclose(pixel_bounds(a[4] == k + 1), pixel_bounds(b[4] == k + 1), atol=1.0)
        assert np.abs(a[0].astype(int) - b[0].astype(int)).mean() < 3


def test_copy_paste_pastes_donor_objects_on_free_spots_with_their_boxes():
    from kdet.data.augment import copy_paste

    # Target: two rectangles of COLOURS 0-1. Donor (half the size, so pastes are scaled x2): rectangles of colours
    # 2-4 (the one of colour 3 flagged ignore: never pasted) on another grey.
    target, boxes, classes, ignore, _ = scene(RECTS[:2], COLOURS)
    donor_rects = np.array([[10, 10, 30, 25], [60, 20, 80, 50], [100, 60, 130, 90]], np.float32)
    donor = np.full((HEIGHT // 2, WIDTH // 2, 3), 40, np.uint8)
    for (x0, y0, x1, y1), colour in zip(donor_rects.astype(int), COLOURS[2:5]):
        donor[y0:y1, x0:x1] = colour
    donor_sample = (donor, donor_rects, np.array([2, 3, 4], np.int32), np.array([False, True, False]))
    spec = copy_paste(p=1.0, max_objects=3, donors=1)
    pasted = 0
    for seed in range(8):
        out, out_boxes, out_classes, out_ignore = spec.paste((target, boxes, classes, ignore), [donor_sample],
                                                             np.random.default_rng(seed))
        np.testing.assert_array_equal(out_boxes[:2], boxes)                     # the image's own boxes first,
        np.testing.assert_array_equal(out_classes[:2], classes)
        for x0, y0, x1, y1 in boxes.astype(int):                                # and their pixels untouched
            np.testing.assert_array_equal(out[y0:y1, x0:x1], target[y0:y1, x0:x1])
        assert 3 not in out_classes.tolist() and not out_ignore[2:].any()
        for box, k in zip(out_boxes[2:], out_classes[2:]):
            w, h = donor_rects[k - 2, 2:] - donor_rects[k - 2, :2]
            np.testing.assert_allclose(box[2:] - box[:2], [2 * w, 2 * h], atol=0.01)  # scaled with the image
            truth = pixel_bounds(colour_hits(out, COLOURS[k], tolerance=2))
            np.testing.assert_allclose(box, truth, atol=1.0)                   # the box bounds the pasted object
            assert (iou_matrix_np(box[None], out_boxes[:2]) == 0).all()
        pasted += len(out_boxes) - 2
    assert pasted >= 8
    untouched = spec.paste((target, boxes, classes, ignore), [(donor, donor_rects[1:2], [3], [True])],
                           np.random.default_rng(0))
    assert len(untouched[1]) == 2 and np.array_equal(untouched[0], target)


def test_copy_paste_scale_range_resizes_each_paste_within_the_range():
    from kdet.data.augment import copy_paste

    target, boxes, classes, ignore, _ = scene(RECTS[:2], COLOURS)
    donor_rects = np.array([[10, 10, 30, 25], [100, 60, 130, 90]], np.float32)
    donor = np.full((HEIGHT // 2, WIDTH // 2, 3), 40, np.uint8)
    for (x0, y0, x1, y1), colour in zip(donor_rects.astype(int), COLOURS[2:4]):
        donor[y0:y1, x0:x1] = colour
    donor_sample = (donor, donor_rects, np.array([2, 3], np.int32), np.array([False, False]))
    spec = copy_paste(p=1.0, max_objects=2, donors=1, scale_range=(0.25, 1.0))
    factors = []
    for seed in range(12):
        out, out_boxes, out_classes, _ = spec.paste((target, boxes, classes, ignore), [donor_sample],
                                                    np.random.default_rng(seed))
        for box, k in zip(out_boxes[2:], out_classes[2:]):
            w, h = donor_rects[k - 2, 2:] - donor_rects[k - 2, :2]
            factor = (box[2] - box[0]) / (2 * w)            # x2: the image-size ratio, then the drawn factor
            assert factor == pytest.approx((box[3] - box[1]) / (2 * h), abs=0.05)  # aspect kept
            assert 0.25 - 0.03 <= factor <= 1.0 + 0.03
            truth = pixel_bounds(colour_hits(out, COLOURS[k], tolerance=2))
            np.testing.assert_allclose(box, truth, atol=1.5)  # bounds the paste (1.5: blended edge pixels)
            factors.append(factor)
    assert len(factors) >= 10 and min(factors) < 0.5 and max(factors) > 0.7    # drawn, not fixed
    with pytest.raises(ValueError, match="scale_range"):
        copy_paste(scale_range=(1.0, 0.5))


def test_copy_paste_runs_in_the_input_pipeline_before_the_other_entries():
    from kdet.data._workers import _Sampler
    from kdet.data.augment import copy_paste
    from kdet.data.records import Record

    image, boxes, classes, _, _ = scene(RECTS[:1])
    records = [Record(0, None, WIDTH, HEIGHT, boxes=boxes, classes=classes, image=image)]
    sampler = _Sampler(records, Augmenter([copy_paste(p=1.0, max_objects=1, donors=1), resize()], image_size=(60, 80)),
                       (60, 80), 8, 0, False)
    out, targets, _ = sampler(np.zeros((0, 0, 3), np.uint8), 1, 0)
    kept = targets[targets[:, 4] >= 0]
    assert out.shape == (60, 80, 3) and len(kept) == 2   # the object and its pasted copy, both class 0
    np.testing.assert_allclose(kept[0, :4], RECTS[0] / [WIDTH, HEIGHT, WIDTH, HEIGHT], atol=1e-6)
    np.testing.assert_allclose(kept[1, 2:4] - kept[1, :2], kept[0, 2:4] - kept[0, :2], atol=1e-6)
    with pytest.raises(ValueError, match="first"):
        Augmenter([hflip(), copy_paste()])
    assert Augmenter([mosaic(), copy_paste(), hflip()]).copy_paste is not None
