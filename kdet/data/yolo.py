"""The YOLO txt layout, as Ultralytics and Roboflow export it.

Layout: one ``.txt`` per image, found by Ultralytics' rule (the last
``/images/`` in the image path becomes ``/labels/``, the extension ``.txt``):
``images/train/a.jpg`` -> ``labels/train/a.txt``, ``train/images/a.jpg`` ->
``train/labels/a.txt``. Each line is ``class cx cy w h``, normalised to the
image (converted at this edge with :func:`kdet.boxes.yolo_to_xyxy`, the image
size read from its header). A line with more than 5 numbers (odd count, at
least 3 points) is a segmentation polygon ``class x1 y1 x2 y2 ...``: its box is
the bounding box of the points, as Ultralytics does; the source counts them and
says so. An image without a label file (or with an empty one) is a background
image, as in Ultralytics.

Validation (at load time): a line that is not numbers, a class id that is not
an integer in ``[0, len(names))``, a non-finite or out-of-``[0, 1]`` coordinate
(beyond a 1e-3 rounding slack, then clipped), a zero-size box: one
:class:`DatasetError` naming ``file:line``, or a counted skip with
``skip_invalid=True``.

``data.yaml``: ``names`` (a list, or ``{id: name}`` with ids 0..n-1), optional
``nc``, ``path`` (the dataset root) and ``train`` / ``val`` / ``test``: an
image folder, a ``.txt`` list of image paths, or a list of either.
"""

from pathlib import Path

import numpy as np

from kdet.boxes import yolo_to_xyxy
from kdet.data.base import DatasetError, Source
from kdet.data.records import Record
from kdet.log import get_logger

logger = get_logger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
COORD_TOLERANCE = 1e-3  # exporters round to 6 digits; more than this outside [0, 1] is an error
SPLIT_KEYS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


# ------------------------------------------------------------------ files
def image_files(folder, recursive=True):
    """Image files under ``folder`` (by extension, case-insensitive), sorted."""
    folder = Path(folder)
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def label_path(image_path):
    """Ultralytics' rule: the last ``/images/`` becomes ``/labels/``, the extension ``.txt``."""
    parts = list(Path(image_path).parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def image_size(image_path, where=None):
    """``(width, height)`` from the image header (PIL reads no pixels for this)."""
    from PIL import Image

    try:
        with Image.open(image_path) as img:
            return img.size
    except (OSError, ValueError) as err:
        raise DatasetError(f"{where or image_path}: cannot read image header ({err})", reason="unreadable image") from None


# ------------------------------------------------------------------ lines
def parse_label_line(line, num_classes, where):
    """One label line -> ``(class_id, (cx, cy, w, h), is_polygon)``; DatasetError names ``where``."""
    parts = line.split()
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise DatasetError(f"{where}: not numbers: {line.strip()!r}", reason="malformed line") from None
    if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
        raise DatasetError(f"{where}: expected 'class cx cy w h' (5 numbers) or a polygon 'class x1 y1 x2 y2 ...' "
                           f"(an odd count >= 7), got {len(values)} numbers", reason="malformed line")
    cls, coords = values[0], np.asarray(values[1:], np.float64)
    if not cls.is_integer() or not 0 <= cls < num_classes:
        raise DatasetError(f"{where}: class id {parts[0]} is not one of 0..{num_classes - 1} "
                           f"(the {num_classes} names)", reason="unknown class")
    if not np.all(np.isfinite(coords)):
        raise DatasetError(f"{where}: non-finite coordinate in {line.strip()!r}", reason="malformed line")
    if len(values) == 5:
        cx, cy, w, h = coords
        corners = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        if w <= 0 or h <= 0:
            raise DatasetError(f"{where}: zero or negative box size (w {w:g}, h {h:g})", reason="degenerate")
        polygon = False
    else:
        xs, ys = coords[0::2], coords[1::2]
        corners = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
        if corners[2] <= corners[0] or corners[3] <= corners[1]:
            raise DatasetError(f"{where}: polygon of zero width or height", reason="degenerate")
        polygon = True
    if np.any(corners < -COORD_TOLERANCE) or np.any(corners > 1 + COORD_TOLERANCE):
        raise DatasetError(f"{where}: box {np.round(corners, 4).tolist()} (normalised corners) is outside the "
                           "image; YOLO coordinates are fractions of the image size in [0, 1]", reason="out of image")
    x1, y1, x2, y2 = np.clip(corners, 0.0, 1.0)
    return int(cls), ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), polygon


# ------------------------------------------------------------------ source
class YOLOSource(Source):
    """Records of YOLO txt labels.

    Args:
        images: an image folder (searched recursively) or a list of image paths.
        class_names: the class list (``names`` of data.yaml); required, ids index it.
        skip_invalid: drop bad lines / unreadable images (counted in ``.skipped``)
            instead of raising :class:`DatasetError`.
        name: for messages (default: the folder).
    """

    def __init__(self, images, class_names, skip_invalid=False, name=None):
        if not class_names:
            raise DatasetError(f"{name or images}: YOLO labels need class names (data.yaml 'names')")
        super().__init__(class_names)
        self.images = images
        self.skip_invalid = skip_invalid
        self.name = name or str(images)
        self.polygon_lines = 0
        self.background_images = 0

    def image_paths(self):
        if isinstance(self.images, (str, Path)):
            folder = Path(self.images)
            if not folder.is_dir():
                raise DatasetError(f"{folder}: image folder not found", reason="missing file")
            return image_files(folder)
        return [Path(p) for p in self.images]

    def _load(self):
        records, seen = [], {}
        for path in self.image_paths():
            if path.stem in seen:
                raise DatasetError(f"{path}: image id {path.stem!r} also names {seen[path.stem]}; "
                                   "image file names (without extension) must be unique in a split")
            seen[path.stem] = path
            try:
                records.append(self._record(path))
            except DatasetError as err:
                if not self.skip_invalid:
                    raise
                self._skip_image(err.reason)
        self._print_notes(len(records))
        return records, self._class_names

    def _record(self, path):
        if not path.is_file():
            raise DatasetError(f"{path}: image file not found", reason="missing file")
        width, height = image_size(path)
        labels = label_path(path)
        normalised, classes = [], []
        lines = labels.read_text().splitlines() if labels.is_file() else []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                cls, box, polygon = parse_label_line(line, len(self._class_names), f"{labels}:{lineno}")
            except DatasetError as err:
                self._bad_box(err)
                continue
            self.polygon_lines += polygon
            normalised.append(box)
            classes.append(cls)
        if not classes:
            self.background_images += 1
        boxes = yolo_to_xyxy(normalised, width, height) if normalised else np.zeros((0, 4))
        return Record(image_id=path.stem, image_path=str(path), width=width, height=height,
                      boxes=boxes, classes=classes)

    def _print_notes(self, num_images):
        if self.polygon_lines:
            logger.info(f"{self.name}: {self.polygon_lines} label lines are polygons (segments): their boxes are the "
                        "bounding boxes of the points, as Ultralytics does")
        if self.background_images:
            logger.info(f"{self.name}: {self.background_images} of {num_images} images have no labels: "
                        "kept as background images")


# ------------------------------------------------------------------ data.yaml
def read_names(names, where):
    """``names`` of a data.yaml (list or ``{id: name}``) -> list indexed by class id."""
    if isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: 'names' keys must be class ids 0..n-1, got {list(names)}") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise DatasetError(f"{where}: 'names' ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
        return [by_id[i] for i in range(len(by_id))]
    if isinstance(names, (list, tuple)) and names:
        return [str(n) for n in names]
    raise DatasetError(f"{where}: 'names' must be a non-empty list or {{id: name}} mapping, got {names!r}")


def read_data_yaml(path):
    """``(names, {split: [image paths]}, base folder)`` of an Ultralytics/Roboflow data.yaml.

    Splits the yaml does not name are absent from the dict. Relative entries
    are tried against ``path:`` (when it exists), the yaml's folder, and the
    yaml's folder with leading ``../`` removed (Roboflow writes
    ``train: ../train/images`` beside the yaml); an absolute path that does not
    exist here (the exporting machine's) is tried by its last 3 and 2 parts.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot parse YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DatasetError(f"{path}: no 'names' (the class list) in this YAML")
    names = read_names(data["names"], path)
    if "nc" in data and int(data["nc"]) != len(names):
        raise DatasetError(f"{path}: nc is {data['nc']} but 'names' has {len(names)} entries")
    bases = [path.parent]
    if data.get("path"):
        given = Path(str(data["path"])).expanduser()
        given = given if given.is_absolute() else path.parent / given
        if given.is_dir():
            bases.insert(0, given)
    splits = {}
    for split, keys in SPLIT_KEYS.items():
        key = next((k for k in keys if data.get(k)), None)
        if key is not None:
            entries = data[key] if isinstance(data[key], (list, tuple)) else [data[key]]
            entries = [_unswapped(str(entry), split, key, bases, path) for entry in entries]
            splits[split] = [p for entry in entries for p in _split_images(entry, bases, path, key)]
    return names, splits, bases[0]


SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _unswapped(entry, split, key, bases, yaml_path):
    """``entry``, or the split's own folder when ``entry`` is another machine's path to another split's folder.

    A Roboflow export re-zipped from a notebook can say ``train: /content/.../test/images``: the
    path does not exist here, and its folder name contradicts the key. The folders beside the yaml
    are the export's truth then (as written they would train on the test images); a note says so.
    """
    if Path(entry).expanduser().exists() or any((base / entry).exists() for base in bases):
        return entry  # the yaml's own mapping, valid on this machine: the user's choice
    named = [SPLIT_FOLDERS[p] for p in Path(entry).parts[-3:] if p in SPLIT_FOLDERS]
    if not named or named[-1] == split:
        return entry
    for base in bases:
        for folder, folder_split in SPLIT_FOLDERS.items():
            own = base / folder / "images"
            if folder_split == split and own.is_dir():
                logger.info(f"{yaml_path}: {key}: {entry} names a '{named[-1]}' folder (another machine's path, split "
                            f"names swapped?): using {own}, the folder named for {key}")
                return str(own)
    return entry


def _split_images(entry, bases, yaml_path, key):
    parts = Path(entry).parts
    tails = [Path(*parts[-k:]) for k in (3, 2) if len(parts) > k]  # another machine's absolute path
    candidates = [Path(entry).expanduser()] if Path(entry).is_absolute() else []
    for base in bases:
        stripped = entry
        while stripped.startswith("../"):
            stripped = stripped[3:]
        candidates += [base / entry, base / stripped] + [base / tail for tail in tails]
    for candidate in candidates:
        if candidate.is_dir():
            return image_files(candidate)
        if candidate.is_file() and candidate.suffix == ".txt":
            return _image_list(candidate)
    raise DatasetError(f"{yaml_path}: {key}: {entry} not found (looked for "
                       f"{', '.join(str(c) for c in dict.fromkeys(candidates))})", reason="missing file")


def _image_list(txt):
    """Image paths listed in a txt file, relative ones taken from the file's folder."""
    paths = []
    for line in txt.read_text().splitlines():
        line = line.strip()
        if line:
            p = Path(line)
            paths.append(p if p.is_absolute() else txt.parent / p)
    return paths
