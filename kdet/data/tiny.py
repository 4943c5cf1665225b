"""Tiny synthetic detection sets, written in YOLO layout: the few-images case users bring.

Ten or twenty training images, one or two classes of simple shapes (circles, squares, ...)
from ``min_size`` to ``max_size`` pixels (log-uniform, so small objects are as common as
large ones), each class in its own colour (or any colour: ``colors="random"``), on textured
backgrounds with per-pixel noise (:mod:`kdet.data.shapes`'s drawing). Objects do not overlap, so every box is the tight box of a fully visible shape.

Layout (what a labelling tool exports)::

    images/train/*.jpg  labels/train/*.txt  images/test/...  labels/test/...  classes.txt

No ``val`` split by default: a user with ten images has none, and kdet holds one out
(``data.val_fraction``). ``test`` is a separate held-out set drawn the same way, for the
reported figure. Deterministic: each image has its own generator seeded with
``(seed, split, index)``. ``tools/make_tiny_dataset.py`` is the command line.
"""

import io
import json
import shutil
from pathlib import Path

import numpy as np

from kdet.data.shapes import (SHAPES_CLASSES, contrasting_color, generated_already, mask_box, shape_mask,
                              textured_background)

MARKER = "kdet-tiny.json"
_SPLIT_CODES = {"train": 0, "test": 1, "val": 2}


# One colour per class (``colors="class"``): a class looks alike in every image, as cells or defects do.
CLASS_COLORS = ((150, 40, 160), (40, 140, 60), (200, 120, 30), (40, 80, 200), (200, 40, 60))


def render_tiny_scene(rng, image_size, class_names, min_size, max_size, max_objects, noise_std=6.0,
                      colors="class"):
    """One image and its non-overlapping objects: ``(uint8 [H, W, 3], [(class_id, xyxy box)])``.

    ``colors="class"``: each class has its colour (:data:`CLASS_COLORS`, +-20 per channel), drawn
    darker or lighter, whichever contrasts with the background under it; ``"random"``: any colour
    contrasting with the background (the class is the shape alone, a harder task).
    """
    image = textured_background(rng, image_size)
    taken = np.zeros((image_size, image_size), bool)
    objects = []
    for _ in range(rng.integers(1, max_objects + 1)):
        class_id = int(rng.integers(len(class_names)))
        size = int(round(np.exp(rng.uniform(np.log(min_size), np.log(max_size)))))
        for _attempt in range(20):  # a free spot, 2 px clear of the other objects
            center = rng.uniform(size / 2, image_size - size / 2, size=2)
            mask = shape_mask(class_names[class_id], size, center, image_size, rng)
            if mask.any() and not (_grown(mask, 2) & taken).any():
                break
        else:
            continue
        image[mask] = _object_color(rng, image[mask].mean(axis=0), class_id, colors)
        taken |= mask
        objects.append((class_id, mask_box(mask)))
    if noise_std:
        image = image + rng.normal(0, noise_std, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def _object_color(rng, background, class_id, colors):
    if colors == "random":
        return contrasting_color(rng, background)
    if colors != "class":
        raise ValueError(f"colors must be 'class' or 'random', got {colors!r}")
    base = np.array(CLASS_COLORS[class_id], np.float64) + rng.uniform(-20, 20, size=3)
    shade = 0.55 if background.mean() > base.mean() else 1.35   # darker on light ground, lighter on dark
    return np.clip(base * shade, 0, 255)


def _grown(mask, pixels):
    """``mask`` dilated by ``pixels`` (a square structuring element)."""
    grown = mask.copy()
    for axis in (0, 1):
        base = grown.copy()
        for shift in range(1, pixels + 1):
            grown |= np.roll(base, shift, axis) | np.roll(base, -shift, axis)
    return grown


def yolo_lines(objects, image_size):
    """YOLO label lines ``class cx cy w h`` (fractions of the image side)."""
    lines = []
    for class_id, (x1, y1, x2, y2) in objects:
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        lines.append(f"{class_id} " + " ".join(f"{v / image_size:.6f}" for v in (cx, cy, w, h)))
    return "".join(line + "\n" for line in lines)


def generate_tiny_dataset(root, num_train=10, num_test=100, num_val=0, num_classes=1, image_size=300,
                          min_size=6, max_size=60, max_objects=6, colors="class", seed=0, overwrite=False):
    """Write a tiny YOLO-layout set at ``root`` and return ``root`` (same parameters: reused)."""
    if not 1 <= num_classes <= len(SHAPES_CLASSES):
        raise ValueError(f"num_classes must be 1..{len(SHAPES_CLASSES)}, got {num_classes}")
    if not 1 <= min_size <= max_size <= image_size // 2:
        raise ValueError(f"need 1 <= min_size ({min_size}) <= max_size ({max_size}) <= image_size / 2")
    params = dict(num_train=num_train, num_test=num_test, num_val=num_val, num_classes=num_classes,
                  image_size=image_size, min_size=min_size, max_size=max_size, max_objects=max_objects, colors=colors,
                  seed=seed)
    root = Path(root)
    if generated_already(root, MARKER, params, overwrite, "tiny"):
        return root
    if root.exists():
        shutil.rmtree(root)  # empty, or overwrite=True of a tiny dataset (anything else raised above)
    _write(root, params)
    return root


def _write(root, params):
    from PIL import Image

    names = SHAPES_CLASSES[:params["num_classes"]]
    size = params["image_size"]
    for split, code in _SPLIT_CODES.items():
        if not params[f"num_{split}"]:
            continue
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for index in range(params[f"num_{split}"]):
            rng = np.random.default_rng([params["seed"], code, index])
            image, objects = render_tiny_scene(rng, size, names, params["min_size"], params["max_size"],
                                               params["max_objects"], colors=params["colors"])
            stem = f"{split}_{index:04d}"
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=95)
            (root / "images" / split / f"{stem}.jpg").write_bytes(buffer.getvalue())
            (root / "labels" / split / f"{stem}.txt").write_text(yolo_lines(objects, size))
    (root / "classes.txt").write_text("".join(n + "\n" for n in names))
    (root / MARKER).write_text(json.dumps(params, sort_keys=True, indent=1) + "\n")  # last: marks completion
