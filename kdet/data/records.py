"""The record: one image and its objects, as every data source yields it."""

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np


@dataclass
class Record:
    """One annotated image. Boxes are pixel ``xyxy`` (docs/CONVENTIONS.md).

    ``classes`` are 0-based ids into the recipe's class names. ``difficult``
    (VOC) and ``iscrowd`` (COCO) mark objects that evaluation ignores and
    training does not use as targets. ``area`` is COCO's annotation area when
    the source has one (it decides COCO's small/medium/large ranges).
    """

    image_id: Union[int, str]
    image_path: Optional[str]
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    area: Optional[np.ndarray] = None
    image: Optional[Union[np.ndarray, bytes]] = None  # uint8 HxWx3 or encoded bytes, for sources without files
    # EXIF orientation (1-8) of the stored pixels, set by the load-time image check
    # (kdet.data.image_check); None: not checked, decoders read it from the file.
    orientation: Optional[int] = None
    annotation_path: Optional[str] = None  # the annotation file (VOC XML, COCO json), for messages and label review
    object_index: Optional[np.ndarray] = None  # [N] each box's 0-based index in that file's order (loaders may skip some)

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        n = len(self.boxes)
        self.classes = np.asarray(self.classes, np.int32).reshape(n)
        self.difficult = _flags(self.difficult, n)
        self.iscrowd = _flags(self.iscrowd, n)
        if self.area is not None:
            self.area = np.asarray(self.area, np.float32).reshape(n)
        if self.object_index is not None:
            self.object_index = np.asarray(self.object_index, np.int64).reshape(n)

    @property
    def ignore(self):
        """Objects that are neither positives nor negatives."""
        return self.difficult | self.iscrowd

    def __len__(self):
        return len(self.boxes)


def _flags(values, n):
    if values is None or (np.size(values) == 0 and n > 0):
        return np.zeros((n,), bool)
    return np.asarray(values, bool).reshape(n)


def load_image(record):
    """The record's image as uint8 ``HxWx3`` RGB, from memory or from its file, EXIF-oriented.

    The orientation is the record's (set when its source loaded) or else the file's
    (docs/CONVENTIONS.md: kdet uses images as labelling tools show them).
    """
    from PIL import Image  # local: only host-side readers need it
    import io

    from kdet.data.image_check import apply_orientation, exif_orientation

    if isinstance(record.image, np.ndarray):
        return record.image
    if record.image is not None:
        source = io.BytesIO(record.image)
    elif record.image_path:
        source = record.image_path
    else:
        raise ValueError(f"record {record.image_id!r} has neither an image nor an image_path")
    try:
        with Image.open(source) as img:
            orientation = record.orientation if record.orientation is not None else exif_orientation(img)
            return apply_orientation(np.asarray(img.convert("RGB")), orientation)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {record.image_path or record.image_id!r}: {err}") from err
