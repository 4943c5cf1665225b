"""Bounding-box-aware augmentation on albumentations.

A recipe lists augmentations as Python calls, for example::

    augment=[photometric(), expand(max_ratio=4.0), min_iou_crop(), hflip(), resize()]

or ``augment=ssd_augmentation()``. Each call returns an albumentations transform
(or, for :func:`mosaic`, a spec the input pipeline applies to 4 records), and
:class:`Augmenter` runs the list on ``(image, boxes, classes, ignore)``.

Boxes are pixel ``xyxy`` (albumentations' ``pascal_voc`` format, the record
convention of docs/CONVENTIONS.md). Boxes are filtered once, after the whole
list: a box is dropped when less than ``min_visibility`` (default 0.3) of its
transformed area lies inside the final image, and its class and ignore flag
(difficult | iscrowd) are dropped with it. The min-IoU crop also drops boxes
whose centres fall outside its patch, as in SSD.
"""

import copy
import math
import random
import threading
import warnings

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.augmentations.crops import functional as fcrops

# Fill value for padded canvas areas: the ImageNet mean in RGB 0..255, which is
# what SSD fills with (its backbones are ImageNet-trained).
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
DEFAULT_MIN_VISIBILITY = 0.3


# ------------------------------------------------------------ custom transforms
class PhotometricDistortion(A.ImageOnlyTransform):
    """The SSD paper's photometric distortions, each applied with probability 0.5.

    Brightness (add ``+-brightness_delta``), contrast (multiply), saturation
    (multiply S), hue (shift H by ``+-hue_delta`` degrees) and a random channel
    permutation; contrast goes either first or after saturation/hue (as in the
    Caffe SSD / mmdet ``PhotoMetricDistortion``). uint8 images only: the value
    maps run as lookup tables in OpenCV, which is fast and releases the GIL.
    """

    def __init__(self, brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                 hue_delta=18, channel_swap=True, p=1.0):
        super().__init__(p=p)
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta
        self.channel_swap = channel_swap

    def get_params(self):
        r = self.py_random
        coin = lambda: r.random() < 0.5  # noqa: E731
        params = dict(
            brightness=r.uniform(-self.brightness_delta, self.brightness_delta) if coin() else 0.0,
            contrast_first=coin(),
            contrast=r.uniform(*self.contrast_range) if coin() else 1.0,
            saturation=r.uniform(*self.saturation_range) if coin() else 1.0,
            hue=r.uniform(-self.hue_delta, self.hue_delta) if coin() else 0.0,
            permutation=None,
        )
        if self.channel_swap and coin():
            order = [0, 1, 2]
            r.shuffle(order)
            params["permutation"] = tuple(order)
        return params

    def apply(self, img, brightness=0.0, contrast_first=True, contrast=1.0, saturation=1.0, hue=0.0,
              permutation=None, **params):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"PhotometricDistortion needs a uint8 HxWx3 image, got {img.dtype} {img.shape}")
        values = np.arange(256, dtype=np.float32)
        first = values + brightness
        if contrast_first:
            first = first * contrast
        img = _apply_lut(img, first)
        if saturation != 1.0 or hue != 0.0:
            h, s, v = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL))  # H in 0..255 for the full circle
            h = cv2.LUT(h, ((values + hue * 256.0 / 360.0).round() % 256).astype(np.uint8))
            img = cv2.cvtColor(cv2.merge([h, _apply_lut(s, values * saturation), v]), cv2.COLOR_HSV2RGB_FULL)
        if not contrast_first and contrast != 1.0:
            img = _apply_lut(img, values * contrast)
        if permutation is not None:
            channels = cv2.split(img)
            img = cv2.merge([channels[c] for c in permutation])
        return img


def _apply_lut(img, table):
    """Map uint8 values through ``table`` (clipped to 0..255, rounded)."""
    return cv2.LUT(img, np.clip(np.round(table), 0, 255).astype(np.uint8))


class Expand(A.DualTransform):
    """Zoom out: place the image at a random spot of a canvas up to ``max_ratio`` times larger.

    The canvas is filled with ``fill`` (the dataset mean); masks get 0. Boxes are
    shifted with the image. SSD's "expand" for small-object training.
    """

    def __init__(self, max_ratio=4.0, fill=IMAGENET_MEAN_RGB, p=0.5):
        super().__init__(p=p)
        if max_ratio < 1:
            raise ValueError(f"Expand: max_ratio must be >= 1, got {max_ratio}")
        self.max_ratio = max_ratio
        self.fill = tuple(float(v) for v in np.broadcast_to(fill, (3,)))

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_ratio)
        canvas_h, canvas_w = int(height * ratio), int(width * ratio)
        left = self.py_random.randint(0, canvas_w - width)
        top = self.py_random.randint(0, canvas_h - height)
        return {"pad": (top, canvas_h - height - top, left, canvas_w - width - left)}

    def apply(self, img, pad, **params):
        fill = [int(round(v)) for v in self.fill] if img.dtype == np.uint8 else list(self.fill)
        return _pad(img, pad, fill[: img.shape[2]] if img.ndim == 3 else fill[0])

    def apply_to_mask(self, mask, pad, **params):
        return _pad(mask, pad, 0)

    def apply_to_bboxes(self, bboxes, pad, shape, **params):
        top, bottom, left, right = pad
        height, width = shape[:2]
        canvas_w, canvas_h = width + left + right, height + top + bottom
        out = bboxes.copy()
        out[:, [0, 2]] = (bboxes[:, [0, 2]] * width + left) / canvas_w
        out[:, [1, 3]] = (bboxes[:, [1, 3]] * height + top) / canvas_h
        return out


def _pad(img, pad, value):
    top, bottom, left, right = pad
    out = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)
    return out.reshape(out.shape[:2] + img.shape[2:])  # cv2 drops a trailing channel axis of 1


class MinIoURandomCrop(BaseCrop):
    """SSD's random crop: a patch whose IoU with some box is at least a drawn minimum.

    Each call draws a minimum IoU from ``min_ious``; ``None`` keeps the whole
    image, ``0.0`` allows any patch. A patch has sides in ``[min_scale, 1]`` of
    the image's and aspect ratio (h/w) in ``aspect_ratio_range``; it is accepted
    when some box has its centre inside the patch and IoU >= the minimum with it.
    Boxes whose centres fall outside the accepted patch are dropped. After
    ``max_trials`` failed patches a new minimum is drawn.
    """

    def __init__(self, min_ious=(None, 0.1, 0.3, 0.5, 0.7, 0.9), min_scale=0.3,
                 aspect_ratio_range=(0.5, 2.0), max_trials=50, p=1.0):
        super().__init__(p=p)
        self.min_ious = tuple(min_ious)
        self.min_scale = min_scale
        self.aspect_ratio_range = tuple(aspect_ratio_range)
        self.max_trials = max_trials

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        boxes = np.asarray(data["bboxes"], np.float64)
        whole = {"crop_coords": (0, 0, width, height), "keep": np.ones(len(boxes), bool)}
        if boxes.size == 0:
            return whole
        boxes = boxes.reshape(len(boxes), -1)[:, :4]
        boxes = boxes * [width, height, width, height]
        blocks = []  # patches are scored a few rounds at a time: fewer numpy calls under the GIL
        for _ in range(100):  # rounds of drawing a minimum; None / low minima end them quickly
            min_iou = self.min_ious[self.py_random.randrange(len(self.min_ious))]
            if min_iou is None:
                return whole
            if not blocks:
                blocks = self._score_patches(boxes, width, height, rounds=4)
            crops, inside, score = blocks.pop(0)
            good = score >= min_iou
            if good.any():
                first = int(np.argmax(good))
                return {"crop_coords": tuple(int(v) for v in crops[first]), "keep": inside[first]}
        return whole

    def _score_patches(self, boxes, width, height, rounds):
        """``rounds`` fresh sets of ``max_trials`` patches, each ``(crops, inside, score)``.

        ``score`` is a patch's best IoU among the boxes whose centres it contains
        (-1 without any, or when its aspect ratio is out of range).
        """
        crops = self._sample_patches(width, height, rounds * self.max_trials)
        c, b = crops[:, None, :], boxes[None, :, :]
        centres = (b[..., :2] + b[..., 2:]) / 2
        above, below = centres > c[..., :2], centres < c[..., 2:]
        inside = above[..., 0] & above[..., 1] & below[..., 0] & below[..., 1]
        overlap = np.clip(np.minimum(c[..., 2:], b[..., 2:]) - np.maximum(c[..., :2], b[..., :2]), 0, None)
        inter = overlap[..., 0] * overlap[..., 1]
        sides, box_sides = crops[:, 2:] - crops[:, :2], boxes[:, 2:] - boxes[:, :2]
        areas = (sides[:, 0] * sides[:, 1])[:, None] + (box_sides[:, 0] * box_sides[:, 1])[None]
        score = np.where(inside, inter / np.maximum(areas - inter, 1e-9), -1.0).max(axis=1)
        low, high = self.aspect_ratio_range
        score[(sides[:, 1] < low * sides[:, 0]) | (sides[:, 1] > high * sides[:, 0])] = -1.0
        n = self.max_trials
        return [(crops[i:i + n], inside[i:i + n], score[i:i + n]) for i in range(0, len(crops), n)]

    def _sample_patches(self, width, height, count):
        """``count`` integer patches ``[count, 4]`` with sides in ``[min_scale, 1]`` of the image's."""
        size = np.array([width, height], np.float64)
        u = self.random_generator.random((count, 4))
        sides = (self.min_scale + (1 - self.min_scale) * u[:, :2]) * size
        left_top = np.floor(u[:, 2:] * (size - sides))
        right_bottom = np.minimum(left_top + np.maximum(np.floor(sides), 1), size)
        return np.concatenate([left_top, right_bottom], axis=1)

    def apply_to_bboxes(self, bboxes, crop_coords, keep=None, **params):
        if keep is not None and len(keep) == len(bboxes):
            bboxes = bboxes[keep]
        return fcrops.crop_bboxes_by_coords(bboxes, crop_coords, params["shape"][:2])

    def apply_to_keypoints(self, keypoints, crop_coords, **params):
        return fcrops.crop_keypoints_by_coords(keypoints, crop_coords)


class ExpandCropResize(A.DualTransform):
    """``Expand`` -> ``MinIoURandomCrop`` -> ``Resize`` done as one affine warp.

    Same random draws, in the same order, as the three transforms one after the
    other, and the same boxes; the image comes from a single ``cv2.warpAffine``
    of the original, so the expanded canvas (up to 16x the image's area, fresh
    memory for every image; such large fresh allocations scaled poorly across
    threads in a quick test) is never built. :class:`Augmenter` substitutes it
    automatically (``fuse=True``).
    """

    def __init__(self, expand, crop, resize, p=1.0):
        super().__init__(p=p)
        self.expand, self.crop, self.resize = expand, crop, resize

    def set_random_state(self, random_generator, py_random):
        super().set_random_state(random_generator, py_random)
        for t in (self.expand, self.crop, self.resize):
            t.set_random_state(random_generator, py_random)

    def set_random_seed(self, seed):
        super().set_random_seed(seed)
        if hasattr(self, "crop"):  # the base __init__ calls this before the parts exist
            self.set_random_state(self.random_generator, self.py_random)

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        bboxes = np.asarray(data["bboxes"])
        pad = (0, 0, 0, 0)
        if self.expand.should_apply():
            pad = self.expand.get_params_dependent_on_data(params, data)["pad"]
            bboxes = self.expand.apply_to_bboxes(bboxes, pad, params["shape"]) if len(bboxes) else bboxes
        canvas = (height + pad[0] + pad[1], width + pad[2] + pad[3])
        crop = {"crop_coords": (0, 0, canvas[1], canvas[0]), "keep": np.ones(len(bboxes), bool)}
        if self.crop.should_apply():
            crop = self.crop.get_params_dependent_on_data({"shape": canvas + (3,)}, {"bboxes": bboxes})
        return {"pad": pad, "canvas": canvas, **crop}

    def _matrix(self, pad, crop_coords):
        """Output pixel -> source pixel, with cv2.resize's half-pixel alignment."""
        x0, y0, x1, y1 = crop_coords
        sx, sy = (x1 - x0) / self.resize.width, (y1 - y0) / self.resize.height
        top, _, left, _ = pad
        return np.array([[sx, 0, 0.5 * sx - 0.5 + x0 - left], [0, sy, 0.5 * sy - 0.5 + y0 - top]], np.float64)

    def _warp(self, img, pad, crop_coords, interpolation, fill):
        flags = interpolation | cv2.WARP_INVERSE_MAP
        size = (self.resize.width, self.resize.height)
        out = cv2.warpAffine(img, self._matrix(pad, crop_coords), size, flags=flags,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
        return out.reshape(out.shape[:2] + img.shape[2:])

    def apply(self, img, pad, crop_coords, **params):
        fill = [int(round(v)) for v in self.expand.fill] if img.dtype == np.uint8 else list(self.expand.fill)
        return self._warp(img, pad, crop_coords, self.resize.interpolation, fill)

    def apply_to_mask(self, mask, pad, crop_coords, **params):
        return self._warp(mask, pad, crop_coords, cv2.INTER_NEAREST, 0)

    def apply_to_bboxes(self, bboxes, pad, canvas, crop_coords, keep=None, shape=None, **params):
        if pad != (0, 0, 0, 0):
            bboxes = self.expand.apply_to_bboxes(bboxes, pad, shape)
        return self.crop.apply_to_bboxes(bboxes, crop_coords, keep=keep, shape=canvas)  # resize keeps them


def _fuse_expand_crop_resize(transforms):
    """Replace each ``Expand, MinIoURandomCrop, Resize`` run by one :class:`ExpandCropResize`."""
    out, i = [], 0
    while i < len(transforms):
        run = transforms[i:i + 3]
        if (len(run) == 3 and type(run[0]) is Expand and type(run[1]) is MinIoURandomCrop
                and type(run[2]) is A.Resize and run[2].p >= 1):
            out.append(ExpandCropResize(*run))
            i += 3
        else:
            out.append(transforms[i])
            i += 1
    return out


# ----------------------------------------------------- mosaic (pipeline level)
class Mosaic:
    """Four samples tiled around a random centre into one image (YOLO-style mosaic).

    Not an albumentations transform: the input pipeline draws 3 more records and
    calls :meth:`combine`; the rest of the augmentation list then runs on the
    result. Each tile is scaled to cover its quadrant (aspect kept) and the part
    next to the centre is kept; boxes less than ``min_visibility`` visible are dropped.
    """

    def __init__(self, p=0.5, center_range=(0.25, 0.75), fill=IMAGENET_MEAN_RGB, min_visibility=None):
        self.p = p
        self.center_range = tuple(center_range)
        self.fill = fill
        self.min_visibility = min_visibility

    def __repr__(self):
        return f"Mosaic(p={self.p}, center_range={self.center_range})"

    def combine(self, samples, rng, output_shape=None, min_visibility=DEFAULT_MIN_VISIBILITY):
        """``samples``: 4 tuples ``(image, boxes, classes, ignore)`` -> one such tuple.

        ``rng`` is a ``numpy.random.Generator``; ``output_shape`` ``(h, w)``
        defaults to the first image's size.
        """
        if len(samples) != 4:
            raise ValueError(f"Mosaic needs 4 samples, got {len(samples)}")
        if self.min_visibility is not None:
            min_visibility = self.min_visibility
        height, width = output_shape or samples[0][0].shape[:2]
        cx = int(round(rng.uniform(*self.center_range) * width))
        cy = int(round(rng.uniform(*self.center_range) * height))
        canvas = np.empty((height, width, 3), np.uint8)
        canvas[:] = np.round(np.broadcast_to(self.fill, (3,))).astype(np.uint8)
        quadrants = [(0, 0, cx, cy), (cx, 0, width, cy), (0, cy, cx, height), (cx, cy, width, height)]
        out_boxes, out_classes, out_ignore = [], [], []
        for (qx0, qy0, qx1, qy1), (image, boxes, classes, ignore) in zip(quadrants, samples):
            qw, qh = qx1 - qx0, qy1 - qy0
            if qw <= 0 or qh <= 0:
                continue
            h, w = image.shape[:2]
            scale = max(qw / w, qh / h)
            rw, rh = max(int(np.ceil(w * scale)), qw), max(int(np.ceil(h * scale)), qh)
            tile = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_LINEAR)
            # keep the tile's corner that touches the centre
            sx = rw - qw if qx0 == 0 else 0
            sy = rh - qh if qy0 == 0 else 0
            canvas[qy0:qy1, qx0:qx1] = tile[sy:sy + qh, sx:sx + qw]
            b = np.asarray(boxes, np.float32).reshape(-1, 4) * [rw / w, rh / h, rw / w, rh / h]
            b = b - [sx - qx0, sy - qy0, sx - qx0, sy - qy0]
            clipped = np.clip(b, [qx0, qy0, qx0, qy0], [qx1, qy1, qx1, qy1])
            keep = _visible_fraction(b, clipped) >= min_visibility
            out_boxes.append(clipped[keep])
            out_classes.append(np.asarray(classes)[keep])
            out_ignore.append(np.asarray(ignore)[keep])
        return (canvas, np.concatenate(out_boxes).astype(np.float32).reshape(-1, 4),
                np.concatenate(out_classes).astype(np.int32), np.concatenate(out_ignore).astype(bool))


def _visible_fraction(boxes, clipped):
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    full = area(boxes)
    return np.where(full > 0, area(clipped) / np.maximum(full, 1e-12), 0.0)


# ------------------------------------------------- copy-paste (pipeline level)
class CopyPaste:
    """Objects cut from other training images, pasted at free spots of this one (box-level copy-paste).

    Not an albumentations transform: the input pipeline draws ``donors`` records and calls
    :meth:`paste` (after mosaic, before the other entries). Each pasted object is its box plus a
    ``margin`` (a fraction of its side, at least 2 px) of the donor's background around it, scaled
    with the ratio of the two images' sizes; the margin's edge is feathered (linear alpha from 1 at
    the box to 0 at the margin's rim) so no hard rectangle edge is pasted. A spot is free when the
    pasted area overlaps no box of the image (nor an earlier paste), so no object is hidden. Up to
    ``max_objects`` objects per image, drawn from the donors' non-ignored boxes; boxes with a side
    under 2 px are left out. ``scale_range=(lo, hi)``: each paste is also scaled by a factor drawn
    log-uniformly from it (object sizes the training images lack; a paste under 2 px is skipped).
    It multiplies the objects and the backgrounds they are seen on: the few-images case (Ghiasi et
    al. 2021, "Simple Copy-Paste", pastes instance masks; only boxes here).
    """

    def __init__(self, p=0.5, max_objects=4, donors=2, margin=0.25, max_tries=10, scale_range=(1.0, 1.0)):
        lo, hi = scale_range
        if not 0 <= p <= 1 or max_objects < 1 or donors < 1 or margin < 0 or not 0 < lo <= hi:
            raise ValueError(f"copy_paste: need 0 <= p <= 1, max_objects >= 1, donors >= 1, margin >= 0, "
                             f"0 < scale_range[0] <= scale_range[1]; got p={p}, max_objects={max_objects}, "
                             f"donors={donors}, margin={margin}, scale_range={scale_range}")
        self.p, self.max_objects, self.donors = p, int(max_objects), int(donors)
        self.margin, self.max_tries = float(margin), int(max_tries)
        self.scale_range = (float(lo), float(hi))

    def __repr__(self):
        return (f"CopyPaste(p={self.p}, max_objects={self.max_objects}, donors={self.donors}, margin={self.margin}, "
                f"scale_range={self.scale_range})")

    def paste(self, sample, donors, rng):
        """``sample`` and ``donors``: tuples ``(image, boxes, classes, ignore)``; returns the new sample."""
        image, boxes, classes, ignore = sample
        image = np.array(image, np.uint8, copy=True)
        taken = [b for b in np.asarray(boxes, np.float32).reshape(-1, 4)]
        pieces = [(d, j) for d in donors for j in range(len(np.asarray(d[1]).reshape(-1, 4)))
                  if not bool(np.asarray(d[3]).reshape(-1)[j])]
        order = rng.permutation(len(pieces))[:int(rng.integers(1, self.max_objects + 1))]
        added_boxes, added_classes = [], []
        for i in order:
            (donor, donor_boxes, donor_classes, _), j = pieces[i]
            placed = self._paste_one(image, donor, np.asarray(donor_boxes, np.float64).reshape(-1, 4)[j], taken, rng)
            if placed is not None:
                taken.append(placed)
                added_boxes.append(placed)
                added_classes.append(int(np.asarray(donor_classes).reshape(-1)[j]))
        if not added_boxes:
            return image, boxes, classes, ignore
        return (image, np.concatenate([np.asarray(boxes, np.float32).reshape(-1, 4), np.array(added_boxes, np.float32)]),
                np.concatenate([np.asarray(classes, np.int32).reshape(-1), np.array(added_classes, np.int32)]),
                np.concatenate([np.asarray(ignore, bool).reshape(-1), np.zeros(len(added_boxes), bool)]))

    def _paste_one(self, image, donor, box, taken, rng):
        """Pastes the donor's ``box`` (pixels) at a free spot of ``image`` in place; its new box, or None."""
        height, width = image.shape[:2]
        scale = math.sqrt(height * width / (donor.shape[0] * donor.shape[1]))
        lo, hi = self.scale_range
        scale *= math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
        x0, y0, x1, y1 = box
        side = min(x1 - x0, y1 - y0)
        if side < 2 or side * scale < 2:  # too small in the donor, or once scaled
            return None
        pad_x, pad_y = max(2.0, self.margin * (x1 - x0)), max(2.0, self.margin * (y1 - y0))
        cx0, cy0 = int(max(0, math.floor(x0 - pad_x))), int(max(0, math.floor(y0 - pad_y)))
        cx1 = int(min(donor.shape[1], math.ceil(x1 + pad_x)))
        cy1 = int(min(donor.shape[0], math.ceil(y1 + pad_y)))
        patch = donor[cy0:cy1, cx0:cx1]
        inner = np.array([x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0], np.float64)  # the object in the patch
        if scale != 1.0:
            size = (max(1, int(round(patch.shape[1] * scale))), max(1, int(round(patch.shape[0] * scale))))
            inner = inner * np.tile([size[0] / patch.shape[1], size[1] / patch.shape[0]], 2)
            patch = cv2.resize(patch, size, interpolation=cv2.INTER_LINEAR)
        ph, pw = patch.shape[:2]
        if ph >= height or pw >= width:
            return None
        for _ in range(self.max_tries):
            left, top = int(rng.integers(0, width - pw + 1)), int(rng.integers(0, height - ph + 1))
            area = np.array([left, top, left + pw, top + ph], np.float64)
            if not any(_overlaps(area, other) for other in taken):
                alpha = _feather(ph, pw, inner)[..., None]
                region = image[top:top + ph, left:left + pw].astype(np.float32)
                image[top:top + ph, left:left + pw] = np.round(alpha * patch + (1 - alpha) * region).astype(np.uint8)
                return (inner + [left, top, left, top]).astype(np.float32)
        return None


def _overlaps(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _feather(height, width, inner):
    """``[height, width]`` alpha: 1 inside the ``inner`` box, falling linearly to 0 at the patch's rim."""
    def ramp(n, lo, hi):
        x = np.arange(n, dtype=np.float32) + 0.5
        rise = np.clip(x / max(lo, 1e-6), 0, 1)
        fall = np.clip((n - x) / max(n - hi, 1e-6), 0, 1)
        return np.minimum(rise, fall)

    return np.minimum(ramp(height, inner[1], inner[3])[:, None], ramp(width, inner[0], inner[2])[None, :])


# ------------------------------------------------------ recipe entry factories
def photometric(brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                hue_delta=18, channel_swap=True, p=1.0):
    """SSD photometric distortion (brightness, contrast, saturation, hue, channel swap)."""
    return PhotometricDistortion(brightness_delta, contrast_range, saturation_range, hue_delta, channel_swap, p=p)


def expand(max_ratio=4.0, fill=IMAGENET_MEAN_RGB, p=0.5):
    """Zoom out up to ``max_ratio`` x on a canvas filled with the dataset mean."""
    return Expand(max_ratio=max_ratio, fill=fill, p=p)


def min_iou_crop(min_ious=(None, 0.1, 0.3, 0.5, 0.7, 0.9), min_scale=0.3, aspect_ratio_range=(0.5, 2.0),
                 max_trials=50, p=1.0):
    """SSD min-IoU random crop (``None`` in ``min_ious`` = keep the whole image)."""
    return MinIoURandomCrop(min_ious, min_scale, aspect_ratio_range, max_trials, p=p)


def bbox_safe_crop(erosion_rate=0.0, p=0.5):
    """Random crop that keeps every box (albumentations ``BBoxSafeRandomCrop``)."""
    return A.BBoxSafeRandomCrop(erosion_rate=erosion_rate, p=p)


def hflip(p=0.5):
    return A.HorizontalFlip(p=p)


def vflip(p=0.5):
    return A.VerticalFlip(p=p)


def rotate(limit=10.0, fill=IMAGENET_MEAN_RGB, rotate_method="largest_box", p=0.5):
    """Small rotation by up to ``+-limit`` degrees; corners filled with ``fill``.

    ``rotate_method="largest_box"`` makes each new box bound the rotated old box
    (never cuts an object, loose for round ones); ``"ellipse"`` is tighter.
    """
    return A.Rotate(limit=limit, border_mode=cv2.BORDER_CONSTANT, fill=tuple(fill), fill_mask=0,
                    rotate_method=rotate_method, p=p)


def mosaic(p=0.5, center_range=(0.25, 0.75), fill=IMAGENET_MEAN_RGB):
    """4-image mosaic, applied by the input pipeline before the other entries."""
    return Mosaic(p=p, center_range=center_range, fill=fill)


def copy_paste(p=0.5, max_objects=4, donors=2, margin=0.25, scale_range=(1.0, 1.0)):
    """Objects of ``donors`` other training images pasted at free spots (:class:`CopyPaste`), each scaled by a
    log-uniform factor from ``scale_range``; applied by the input pipeline after mosaic and before the other
    entries (list it first, or right after mosaic())."""
    return CopyPaste(p=p, max_objects=max_objects, donors=donors, margin=margin, scale_range=scale_range)


class _ResizeToModel:
    """Placeholder for :func:`resize` without a size: the Augmenter's ``image_size`` fills it in."""

    def __init__(self, interpolation):
        self.interpolation = interpolation

    def build(self, image_size):
        height, width = size_hw(image_size)
        return A.Resize(height=height, width=width, interpolation=self.interpolation)

    def __repr__(self):
        return "resize(<model size>)"


def resize(size=None, interpolation=cv2.INTER_LINEAR):
    """Resize to ``size`` (int or ``(height, width)``); without a size, to the model's input size."""
    if size is None:
        return _ResizeToModel(interpolation)
    return _ResizeToModel(interpolation).build(size)


def ssd_augmentation(image_size=None, max_expand_ratio=4.0, fill=IMAGENET_MEAN_RGB, photometric_p=1.0,
                     expand_p=0.5, flip_p=0.5):
    """The SSD paper's training augmentation: photometric, expand, min-IoU crop, resize, flip.

    Flip comes after resize (they commute): flipping the small output is cheaper
    than flipping a crop of a 4x expanded canvas.
    """
    return [
        photometric(p=photometric_p),
        expand(max_ratio=max_expand_ratio, fill=fill, p=expand_p),
        min_iou_crop(),
        resize(image_size),
        hflip(p=flip_p),
    ]


def dataset_mean(records, max_images=200):
    """Mean RGB (0..255) over up to ``max_images`` evenly spaced records: a ``fill`` for expand/rotate/mosaic."""
    from kdet.data.records import load_image

    records = list(records)
    if not records:
        raise ValueError("dataset_mean: no records")
    step = max(1, len(records) // max_images)
    sums, count = np.zeros(3), 0
    for record in records[::step][:max_images]:
        image = load_image(record)
        sums += image.reshape(-1, 3).sum(axis=0, dtype=np.float64)
        count += image.shape[0] * image.shape[1]
    return tuple(float(v) for v in sums / count)


def size_hw(size):
    if np.ndim(size) == 0:
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


# --------------------------------------------------------------------- runner
class Augmenter:
    """Applies a list of transforms to ``(image uint8 HxWx3, boxes [N,4] pixels, classes [N], ignore [N])``.

    Deterministic under ``seed``: the same seed and the same inputs give the
    same outputs; ``__call__(..., seed=s)`` fixes one call's randomness on its
    own (what the input pipeline does per element). Thread-safe: concurrent
    calls use separate albumentations ``Compose`` objects. ``fuse`` runs each
    ``expand, min_iou_crop, resize`` sequence as one warp (:class:`ExpandCropResize`).
    """

    def __init__(self, transforms, seed=None, image_size=None, min_visibility=DEFAULT_MIN_VISIBILITY, fuse=True):
        transforms = list(transforms or [])
        self.mosaic = None
        self.copy_paste = None
        self.transforms = []
        for i, t in enumerate(transforms):
            if isinstance(t, Mosaic):
                if i != 0:
                    raise ValueError("mosaic() must be the first augmentation entry")
                self.mosaic = t
            elif isinstance(t, CopyPaste):
                if i != int(self.mosaic is not None):
                    raise ValueError("copy_paste() must be the first augmentation entry (or the second, after mosaic())")
                self.copy_paste = t
            elif isinstance(t, _ResizeToModel):
                if image_size is None:
                    raise ValueError("resize() without a size needs the Augmenter's image_size")
                self.transforms.append(t.build(image_size))
            elif isinstance(t, (A.BasicTransform, A.BaseCompose)):
                self.transforms.append(t)
            else:
                raise TypeError(f"augmentation entry {i} is not an albumentations transform: {t!r}")
        _check_keeps_uint8_rgb(self.transforms)
        self.image_size = None if image_size is None else size_hw(image_size)
        self.min_visibility = min_visibility
        self.fuse = fuse
        self._seeds = np.random.default_rng(seed)
        self._lock = threading.Lock()
        # Idle Compose objects, one taken per call: calls may run concurrently (tf.data threads) and
        # a Compose holds per-call state. Not threading.local: tf.numpy_function runs on native
        # threads whose Python thread state (and so their thread-locals) is dropped after each call.
        self._idle = []

    def __repr__(self):
        return f"Augmenter({self.transforms!r}, mosaic={self.mosaic!r}, copy_paste={self.copy_paste!r})"

    def _new_compose(self):
        with warnings.catch_warnings():  # "no transform to process bboxes" for colour-only lists
            warnings.simplefilter("ignore", UserWarning)
            # Boxes are filtered once, at the end (check_each_transform=False): visibility is then
            # the fraction of the whole (unclipped) box left in the final image, and the per-step
            # checks, pure Python under the GIL, are saved.
            transforms = _fuse_expand_crop_resize(self.transforms) if self.fuse else self.transforms
            return A.Compose(
                copy.deepcopy(transforms),
                bbox_params=A.BboxParams(format="pascal_voc", label_fields=["box_index"],
                                         min_visibility=self.min_visibility, clip=True,
                                         filter_invalid_bboxes=True, check_each_transform=False),
                is_check_shapes=False,
            )

    def next_seed(self):
        """A fresh call seed from the Augmenter's own stream."""
        with self._lock:
            return int(self._seeds.integers(0, 2**63 - 1))

    def __call__(self, image, boxes, classes, ignore, seed=None, mask=None):
        """Returns ``(image, boxes, classes, ignore)`` (plus the mask when one is given)."""
        image, boxes, classes, ignore = _check_sample(image, boxes, classes, ignore)
        if seed is None:
            seed = self.next_seed()
        with self._lock:
            compose = self._idle.pop() if self._idle else None
        compose = compose or self._new_compose()
        try:
            compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
            data = dict(image=image, bboxes=boxes, box_index=np.arange(len(boxes)))
            if mask is not None:
                data["mask"] = mask
            out = compose(**data)
        finally:
            with self._lock:
                self._idle.append(compose)
        _check_output_image(out["image"])
        index = np.asarray(out["box_index"], np.int64).reshape(-1)
        result = (out["image"], np.asarray(out["bboxes"], np.float32).reshape(-1, 4), classes[index], ignore[index])
        return result + (out["mask"],) if mask is not None else result


def _check_sample(image, boxes, classes, ignore):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"augmentation needs a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    classes = np.asarray(classes, np.int32).reshape(-1)
    ignore = np.asarray(ignore, bool).reshape(-1)
    if not len(boxes) == len(classes) == len(ignore):
        raise ValueError(f"boxes, classes, ignore differ in length: {len(boxes)}, {len(classes)}, {len(ignore)}")
    return image, boxes, classes, ignore


# ------------------------------------------------- augmentations must keep uint8 RGB
_NOT_FOR_KDET = ("Normalize", "ToFloat", "ToTensorV2", "ToTensor")
_UINT8_RGB_RULE = ("kdet's model takes uint8 0..255 RGB and normalises it itself, so augmentations must "
                   "return uint8 HxWx3 images: remove it from data.augment")


def _leaves(transforms):
    for t in transforms:
        children = getattr(t, "transforms", None)
        if isinstance(t, A.BaseCompose) and children is not None:
            yield from _leaves(children)
        else:
            yield t


def _check_keeps_uint8_rgb(transforms):
    """A :class:`~kdet.errors.RecipeError` naming the first transform that does not return uint8 HxWx3.

    Known offenders (``A.Normalize``, ``A.ToFloat``, tensor conversions) by name;
    every other transform is run once, alone and forced on, on a small uint8
    image with a box (a transform that cannot run on it is left to run time,
    where the output is checked too).
    """
    from kdet.errors import RecipeError

    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    for t in _leaves(transforms):
        name = type(t).__name__
        if name in _NOT_FOR_KDET:
            raise RecipeError(f"data.augment: A.{name} changes the image to float or a tensor; {_UINT8_RGB_RULE}")
        try:
            single = copy.deepcopy(t)
            single.p = 1.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compose = A.Compose([single], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["box_index"]),
                                    is_check_shapes=False, seed=0)
                out = compose(image=probe.copy(), bboxes=np.array([[16.0, 12.0, 80.0, 60.0]]),
                              box_index=np.arange(1))["image"]
        except Exception:  # needs other inputs or a larger image: checked on the real samples
            continue
        problem = _image_problem(out)
        if problem:
            raise RecipeError(f"data.augment: {name} returns {problem}; {_UINT8_RGB_RULE}")


def _image_problem(image):
    image = np.asarray(image)
    if image.dtype != np.uint8:
        return f"{image.dtype} images (not uint8)"
    if image.ndim != 3 or image.shape[2] != 3:
        return f"images of shape {image.shape} (not HxWx3)"
    return None


def _check_output_image(image):
    problem = _image_problem(image)
    if problem:
        from kdet.errors import DatasetError

        raise DatasetError(f"data.augment: an augmentation returned {problem}; {_UINT8_RGB_RULE}",
                           reason="augmentation")
