"""A synthetic detection dataset of filled shapes, written in PASCAL VOC layout.

Five classes (:data:`SHAPES_CLASSES`) with imbalanced frequencies
(:data:`CLASS_FREQUENCIES`), flat-coloured shapes from ``min_size`` pixels up
to half the image, on textured backgrounds (colour gradient, blotchy low
frequency noise, per-pixel noise). Shapes are drawn one after another, so
later ones occlude earlier ones. Each box is the tight pixel box of the whole
shape as drawn (including its hidden part); a shape with more than 60% of its
pixels hidden is marked ``difficult`` (ignored by training and VOC-style
evaluation), one hidden completely is left out.

Generation is deterministic: the same parameters and seed give the same
bytes (each image has its own generator seeded with ``(seed, split, index)``).
Output: ``JPEGImages/<split>_<index>.jpg`` (quality 95), ``Annotations/*.xml``
(VOC, 1-based), ``ImageSets/Main/{train,val,test,trainval}.txt`` (trainval =
train; ``val`` is a validation split drawn like ``test``, for tuning without
touching the reported split), and ``kdet-shapes.json`` with the parameters.
"""

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from kdet.boxes import xyxy_to_voc
from kdet.data.base import DatasetError
from kdet.data.voc import VOCSource

SHAPES_CLASSES = ("circle", "square", "triangle", "cross", "ring")
CLASS_FREQUENCIES = (0.4, 0.25, 0.15, 0.12, 0.08)
MAX_HIDDEN_FRACTION = 0.6  # more hidden than this -> difficult
DEFAULTS = dict(num_train=600, num_test=150, num_val=0, image_size=128, min_size=8, max_size=None, max_objects=6, seed=0)
MARKER = "kdet-shapes.json"
_SPLIT_CODES = {"train": 0, "test": 1, "val": 2}


# ------------------------------------------------------------------ drawing
def shape_mask(class_name, size, center, image_size, rng):
    """Boolean ``[H, W]`` mask of one shape fitting a ``size`` square around ``center``."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = center
    r = size / 2
    angle = rng.uniform(0, 2 * np.pi)
    if class_name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=255)
    elif class_name == "ring":
        width = max(2, int(round(size / 5)))
        draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], outline=255, width=width)
    elif class_name == "square":
        draw.polygon(_polygon(np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]]) / np.sqrt(2), r, angle, cx, cy), fill=255)
    elif class_name == "triangle":
        corners = [[np.cos(a), np.sin(a)] for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
        draw.polygon(_polygon(np.array(corners), r, angle, cx, cy), fill=255)
    elif class_name == "cross":
        a, b = 1.0, 1 / 3  # arm half-length, arm half-thickness
        plus = [[b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b], [-b, -a], [b, -a], [b, -b], [a, -b], [a, b]]
        # scale so that the rotated cross still fits the size square
        draw.polygon(_polygon(np.array(plus) / np.hypot(a, b), r, angle, cx, cy), fill=255)
    else:
        raise ValueError(f"unknown shape class {class_name!r}")
    return np.asarray(mask) > 0


def _polygon(unit_points, radius, angle, cx, cy):
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = unit_points @ rotation.T * radius + [cx, cy]
    return [tuple(p) for p in points]


def textured_background(rng, image_size):
    """Gradient + blotchy low-frequency noise, float ``[H, W, 3]`` in 0..255."""
    from PIL import Image

    yy, xx = np.mgrid[0:image_size, 0:image_size] / max(image_size - 1, 1)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xx + np.sin(direction) * yy)[..., None]
    start, end = rng.uniform(40, 215, size=(2, 3))
    gradient = start + (end - start) * (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    grid = rng.integers(0, 256, size=(rng.integers(3, 9),) * 2 + (3,), dtype=np.uint8)
    blotches = np.asarray(Image.fromarray(grid).resize((image_size, image_size), Image.BILINEAR), np.float64)
    return 0.6 * gradient + 0.4 * blotches


def render_scene(rng, image_size=128, min_size=8, max_size=None, max_objects=6, textured=True, noise_std=6.0):
    """One image and its objects.

    Returns ``(image uint8 [H, W, 3], objects)``; each object is a dict with
    ``class_id``, ``box`` (pixel ``xyxy`` of the whole shape), ``difficult``,
    ``color`` and ``mask`` (the pixels it covers as drawn, before occlusion).
    ``textured=False, noise_std=0`` gives a flat grey background and exact
    colours (used by the tests to check the boxes against the pixels).
    """
    max_size = max_size or image_size // 2
    if not 1 <= min_size <= max_size <= image_size:
        raise ValueError(f"need 1 <= min_size ({min_size}) <= max_size ({max_size}) <= image_size ({image_size})")
    image = textured_background(rng, image_size) if textured else np.full((image_size, image_size, 3), 128.0)
    objects = []
    for _ in range(rng.integers(1, max_objects + 1)):
        class_id = int(rng.choice(len(SHAPES_CLASSES), p=CLASS_FREQUENCIES))
        size = int(round(np.exp(rng.uniform(np.log(min_size), np.log(max_size)))))
        center = rng.uniform(size / 2, image_size - size / 2, size=2)
        mask = shape_mask(SHAPES_CLASSES[class_id], size, center, image_size, rng)
        if not mask.any():
            continue
        color = contrasting_color(rng, image[mask].mean(axis=0))
        image[mask] = color
        objects.append(dict(class_id=class_id, box=mask_box(mask), color=color, mask=mask, difficult=False))
    objects = _apply_occlusion(objects)
    if noise_std:
        image = image + rng.normal(0, noise_std, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def contrasting_color(rng, background, min_distance=80.0):
    for _ in range(20):
        color = rng.integers(0, 256, size=3).astype(np.float64)
        if np.abs(color - background).sum() >= min_distance:
            break
    return color


def mask_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _apply_occlusion(objects):
    """Mark objects hidden more than MAX_HIDDEN_FRACTION difficult; drop fully hidden ones."""
    kept = []
    covered = np.zeros_like(objects[0]["mask"]) if objects else None
    for obj in reversed(objects):  # from the top of the stack down
        area = obj["mask"].sum()
        visible = (obj["mask"] & ~covered).sum()
        covered |= obj["mask"]
        if visible == 0:
            continue
        obj["difficult"] = bool(1 - visible / area > MAX_HIDDEN_FRACTION)
        kept.append(obj)
    return kept[::-1]


# ------------------------------------------------------------------ writing
def voc_xml(filename, width, height, objects):
    """A PASCAL VOC annotation (1-based inclusive corners) for the objects."""
    lines = ["<annotation>", "\t<folder>JPEGImages</folder>", f"\t<filename>{escape(filename)}</filename>",
             f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>",
             "\t<segmented>0</segmented>"]
    for obj in objects:
        xmin, ymin, xmax, ymax = (int(round(v)) for v in xyxy_to_voc(obj["box"])[0])
        lines.append(
            f"\t<object>\n\t\t<name>{escape(SHAPES_CLASSES[obj['class_id']])}</name>\n\t\t<pose>Unspecified</pose>\n"
            f"\t\t<truncated>0</truncated>\n\t\t<difficult>{int(obj['difficult'])}</difficult>\n"
            f"\t\t<bndbox>\n\t\t\t<xmin>{xmin}</xmin>\n\t\t\t<ymin>{ymin}</ymin>\n"
            f"\t\t\t<xmax>{xmax}</xmax>\n\t\t\t<ymax>{ymax}</ymax>\n\t\t</bndbox>\n\t</object>"
        )
    lines.append("</annotation>\n")
    return "\n".join(lines)


def _params(**params):
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown shapes parameters {sorted(unknown)} (known: {sorted(DEFAULTS)})")
    full = dict(DEFAULTS, **params)
    full["max_size"] = full["max_size"] or full["image_size"] // 2
    return full


def generated_already(root, marker_name, params, overwrite, kind):
    """True when ``root`` holds the generated dataset of these ``params`` (reuse it).

    False for an empty or missing folder, or with ``overwrite``; a folder holding anything
    else (no marker file, or a marker with other parameters) raises `DatasetError`.
    """
    marker = Path(root) / marker_name
    if not (Path(root).exists() and any(Path(root).iterdir())):
        return False
    if not marker.is_file():
        raise DatasetError(f"{root}: exists and is not a kdet {kind} dataset; choose another folder")
    if json.loads(marker.read_text()) == params and not overwrite:
        return True
    if not overwrite:
        raise DatasetError(f"{marker}: holds a {kind} dataset with other parameters; pass overwrite=True")
    return False


def generate_shapes(root, num_train=600, num_test=150, image_size=128, seed=0, overwrite=False,
                    min_size=8, max_size=None, max_objects=6, num_val=0):
    """Write the shapes dataset in VOC layout at ``root`` and return ``root``.

    An existing dataset with the same parameters is reused (``overwrite=True``
    regenerates it). A folder holding anything else is never touched.
    """
    root = Path(root)
    params = _params(num_train=num_train, num_test=num_test, num_val=num_val, image_size=image_size, seed=seed,
                     min_size=min_size, max_size=max_size, max_objects=max_objects)
    if generated_already(root, MARKER, params, overwrite, "shapes"):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        _write_dataset(staging, params)
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    except OSError:
        marker = root / MARKER
        if not (marker.is_file() and json.loads(marker.read_text()) == params):
            raise
        # another process finished the same dataset first: use theirs
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _write_dataset(root, params):
    from PIL import Image

    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    size = params["image_size"]
    for split in _SPLIT_CODES:
        count = params[f"num_{split}"]
        ids = []
        for index in range(count):
            rng = np.random.default_rng([params["seed"], _SPLIT_CODES[split], index])
            image, objects = render_scene(rng, size, params["min_size"], params["max_size"], params["max_objects"])
            image_id = f"{split}_{index:05d}"
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=95)
            (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(buffer.getvalue())
            (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", size, size, objects))
            ids.append(image_id)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    shutil.copy(root / "ImageSets/Main/train.txt", root / "ImageSets/Main/trainval.txt")
    (root / MARKER).write_text(json.dumps(params, sort_keys=True, indent=1) + "\n")  # written last: marks completion


# ------------------------------------------------------------------ source
def cache_dir():
    """``$KDET_CACHE`` or ``~/.cache/kdet``."""
    return Path(os.environ.get("KDET_CACHE") or Path.home() / ".cache" / "kdet")


def shapes(root=None, split="train", skip_invalid=False, **params):
    """The shapes dataset as a VOC source; it is generated on first use when missing.

    ``root=None`` uses ``<cache_dir>/shapes-<hash of the parameters>``.
    ``params`` are :func:`generate_shapes`'s (``num_train``, ``image_size``, ...).
    """
    full = _params(**params)
    if root is None:
        digest = hashlib.sha1(json.dumps(full, sort_keys=True).encode()).hexdigest()[:10]
        root = cache_dir() / f"shapes-{digest}"
    return ShapesSource(root, split, full, skip_invalid)


class ShapesSource(VOCSource):
    """A VOC source over a shapes folder that generates the folder before the first read."""

    def __init__(self, root, split, params, skip_invalid=False):
        super().__init__(root, split, class_names=list(SHAPES_CLASSES), skip_invalid=skip_invalid)
        self.params = params
        self.name = f"shapes[{split}] at {root}"

    def _load(self):
        generate_shapes(self.root, **self.params)
        return super()._load()
