"""PASCAL VOC layout reader (VOCdevkit year folders, BCCD, the shapes dataset).

Layout: ``root/Annotations/<id>.xml``, ``root/JPEGImages/<file>``,
``root/ImageSets/Main/<split>.txt``. VOC boxes are 1-based inclusive pixel
indices; they become kdet pixel corners with :func:`kdet.boxes.voc_to_xyxy`.

Validation (at load time):
* image level: missing/unparsable XML, missing or unreadable image file;
* box level: unknown class (when ``class_names`` is given), malformed
  ``<bndbox>``, degenerate box, box outside the image.
A box is *degenerate* when ``xmax <= xmin`` or ``ymax <= ymin`` in the XML's
own numbers. Read literally as 1-based inclusive indices such a box would be
at most one pixel wide; in practice it is a stray click of the annotation
tool (BCCD has two: ``BloodImage_00338`` and ``BloodImage_00343``, each a
single point) and no real object, so it is treated as invalid.
"""

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdet.boxes import voc_to_xyxy
from kdet.data.base import DatasetError, Source, check_box
from kdet.data.records import Record

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# PASCAL VOC's 20 classes (alphabetical, as in the XML and in TFDS's voc/*)
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


@dataclass
class _VOCObject:
    name: str
    voc_box: tuple  # raw (xmin, ymin, xmax, ymax) from the XML
    difficult: bool


@dataclass
class VOCImage:
    image_id: str
    xml_path: Path
    image_path: Path
    width: int
    height: int
    objects: list = field(default_factory=list)
    orientation: int = None  # EXIF orientation, from the load-time image check


def split_names(split):
    """``"trainval+test"`` or ``["trainval", "test"]`` -> ``["trainval", "test"]``."""
    names = split.split("+") if isinstance(split, str) else list(split)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"empty split {split!r}")
    return names


class VOCSource(Source):
    """Records of a PASCAL VOC layout folder.

    Args:
        root: folder holding ``Annotations``, ``JPEGImages``, ``ImageSets/Main``.
        split: split file name(s) in ``ImageSets/Main``; ``"a+b"`` joins them.
        class_names: class list (ids are indices into it); None collects the
            names found in the annotations, sorted.
        skip_invalid: drop bad boxes/images (counted in ``.skipped``, one
            warning) instead of raising :class:`DatasetError`.
        check_images: load-time image check, ``"quick"``, ``"full"`` or ``"off"``
            (see :mod:`kdet.data.image_check`).
    """

    def __init__(self, root, split, class_names=None, skip_invalid=False, check_images="quick"):
        super().__init__(class_names)
        self.check_images = check_images
        self.root = Path(root)
        self.split = split
        self.splits = split_names(split)
        self.skip_invalid = skip_invalid
        self.name = f"{self.root} [{'+'.join(self.splits)}]"

    # ----------------------------------------------------------- loading
    def image_ids(self):
        """Image ids of the split(s), in file order, without duplicates."""
        ids = {}
        for split in self.splits:
            path = self.root / "ImageSets" / "Main" / f"{split}.txt"
            if not path.is_file():
                available = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
                raise DatasetError(
                    f"{path}: split file not found (available splits in {path.parent}: {available or 'none'})",
                    reason="missing split",
                )
            for line in path.read_text().splitlines():
                if line.strip():
                    ids.setdefault(line.split()[0], None)
        return list(ids)

    def _load(self):
        images = []
        for image_id in self.image_ids():
            try:
                images.append(self._checked_image_file(self._parse_image(image_id)))
            except DatasetError as err:
                if not self.skip_invalid:
                    raise
                self._skip_image(err.reason)
        class_names = self._class_names
        if class_names is None:
            class_names = sorted({obj.name for image in images for obj in image.objects})
        class_ids = {name: i for i, name in enumerate(class_names)}
        return [self._to_record(image, class_ids) for image in images], class_names

    def _parse_image(self, image_id):
        return parse_voc_xml(self.root / "Annotations" / f"{image_id}.xml", image_id, self._image_path)

    def _image_path(self, image_id, filename, xml_path):
        """``JPEGImages/<filename>`` when the XML names one, else ``<id>.jpg``."""
        folder = self.root / "JPEGImages"
        candidates = []
        filename = (filename or "").strip()
        if filename:
            name = os.path.basename(filename)
            candidates.append(name if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name + ".jpg")
        candidates += [image_id + ext for ext in IMAGE_EXTENSIONS]
        for candidate in candidates:
            if (folder / candidate).is_file():
                return folder / candidate
        raise DatasetError(
            f"{xml_path}: image file not found (looked for {folder / candidates[0]})", reason="missing file"
        )

    def _checked_image_file(self, image):
        """``image`` after the load-time image check (kdet.data.image_check), which comes before its boxes are
        checked against its size: a wrong ``<size>`` is named as such, not as boxes outside the image."""
        from kdet.data.image_check import check_record_image

        probe = Record(image.image_id, str(image.image_path), image.width, image.height)
        image.orientation = check_record_image(probe, self.check_images, annotation=image.xml_path).orientation
        return image

    def _annotation_of(self, record):
        return self.root / "Annotations" / f"{record.image_id}.xml"

    def _to_record(self, image, class_ids):
        boxes, classes, difficult, index = [], [], [], []
        for k, obj in enumerate(image.objects):
            try:
                box = self._check_object(image, obj, k, class_ids)
            except DatasetError as err:
                self._bad_box(err)
                continue
            boxes.append(box)
            classes.append(class_ids[obj.name])
            difficult.append(obj.difficult)
            index.append(k)
        return Record(
            image_id=image.image_id,
            image_path=str(image.image_path),
            width=image.width,
            height=image.height,
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            classes=classes,
            difficult=difficult,
            iscrowd=np.zeros(len(boxes), bool),
            orientation=image.orientation,
            annotation_path=str(image.xml_path),
            object_index=np.asarray(index, np.int64),
        )

    def _check_object(self, image, obj, k, class_ids):
        if obj.voc_box is None:
            raise DatasetError(f"{image.xml_path}: object {k} ({obj.name!r}) has no valid <bndbox>",
                               reason="malformed box")
        where = f"{image.xml_path}: object {k} ({obj.name!r}, VOC box {[int(v) if v.is_integer() else v for v in obj.voc_box]})"
        if obj.name not in class_ids:
            raise DatasetError(f"{where}: unknown class (known: {list(class_ids)})", reason="unknown class")
        xmin, ymin, xmax, ymax = obj.voc_box
        if xmax <= xmin or ymax <= ymin:
            raise DatasetError(f"{where}: degenerate box (zero or negative size)", reason="degenerate")
        box = voc_to_xyxy(obj.voc_box)[0]
        if check_box(box, image.width, image.height) is not None:
            raise DatasetError(f"{where}: box outside the {image.width}x{image.height} image",
                               reason="out of image")
        return box


def parse_voc_xml(xml_path, image_id, find_image):
    """One VOC annotation file -> ``VOCImage`` (raw 1-based boxes; checked later by the source).

    ``find_image(image_id, filename_in_xml, xml_path)`` returns the image's path
    (or raises :class:`DatasetError`). The size comes from ``<size>``, else from
    the image header.
    """
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise DatasetError(f"{xml_path}: annotation file not found", reason="missing annotation")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise DatasetError(f"{xml_path}: cannot parse XML ({err})", reason="unparsable XML") from None
    image_path = find_image(image_id, root.findtext("filename"), xml_path)
    width, height = _xml_size(root)
    if not (width > 0 and height > 0):
        width, height = _image_header_size(image_path, xml_path)
    objects = [_parse_object(obj) for obj in root.findall("object")]
    return VOCImage(image_id, xml_path, image_path, width, height, objects)


def _xml_size(root):
    try:
        return int(float(root.findtext("size/width"))), int(float(root.findtext("size/height")))
    except (TypeError, ValueError):
        return 0, 0


def _image_header_size(image_path, xml_path):
    """The image's size as shown (after EXIF orientation), for XMLs without a ``<size>``."""
    from kdet.data.image_check import image_info

    try:
        return image_info(str(image_path))[:2]
    except DatasetError as err:
        raise DatasetError(f"{xml_path}: no <size>, and {err}", reason=err.reason) from None


def _parse_object(obj):
    name = (obj.findtext("name") or "").strip()
    difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true", "True")
    try:
        voc_box = tuple(float(obj.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, ValueError):
        voc_box = None
    return _VOCObject(name, voc_box, difficult)
