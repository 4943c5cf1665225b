"""COCO json annotations plus an image folder, and COCO-format writers.

Class ids: the json's categories, sorted by category id, become contiguous
0-based class ids (or follow ``class_names`` when the caller gives them);
``source.category_ids[class_id]`` maps back. ``iscrowd`` and GT ``area`` are
kept (crowd objects are ignored as training targets through ``Record.ignore``);
images without annotations are kept; image ids stay the json's ints.

:func:`records_to_coco_json` writes any source's records as a COCO GT dict
for evaluation. VOC ``difficult`` objects are written with ``iscrowd=1`` and
``ignore=1`` (pycocotools reads only ``iscrowd`` and never counts a crowd GT
as a miss or a detection on it as a false positive, which is the closest it
has to VOC's difficult rule; note that it matches a detection to a crowd
region by intersection over the *detection's* area, a bit more lenient than
VOC). They also get ``"difficult": 1`` so that :class:`COCOSource` reads
them back as difficult, not crowd.
"""

import json
from pathlib import Path

import numpy as np

from kdet.boxes import coco_to_xyxy, xyxy_to_coco, box_area_np
from kdet.data.base import DatasetError, Source, check_box
from kdet.data.records import Record

# COCO 2017's 80 detection categories in category-id order (for sources that
# only know label indices, e.g. TFDS coco/2017 without its metadata).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54,
    55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81,
    82, 84, 85, 86, 87, 88, 89, 90,
)
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# COCO json boxes are floats; allow this much rounding slack past the image
# border (such boxes are clipped), anything further is "out of image".
BORDER_TOLERANCE = 1.0


class COCOSource(Source):
    """Records of a COCO-style json file and its image folder.

    Args:
        annotation_file: the json (``images``, ``annotations``, ``categories``).
        image_dir: folder the images' ``file_name`` are relative to.
        class_names: optional class list; it must name exactly the json's
            categories (any order; ids follow it). None: categories sorted by id.
        skip_invalid: drop bad boxes/images instead of raising :class:`DatasetError`.
        check_files: check at load time that every image file exists (False
            also turns off the image check).
        check_images: load-time image check, ``"quick"``, ``"full"`` or ``"off"``
            (see :mod:`kdet.data.image_check`).
    """

    def __init__(self, annotation_file, image_dir, class_names=None, skip_invalid=False, check_files=True,
                 check_images="quick"):
        super().__init__(class_names)
        self.check_images = check_images
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.skip_invalid = skip_invalid
        self.check_files = check_files
        self.name = str(self.annotation_file)
        self._category_ids = None

    @property
    def category_ids(self):
        """``category_ids[class_id]`` is the json's category id."""
        if self._category_ids is None:
            self.records()
        return self._category_ids

    def to_coco_results(self, image_ids, detections):
        """Detections (pixel ``xyxy``, 0-based classes) -> COCO result dicts."""
        return to_coco_results(image_ids, detections, self.category_ids)

    # ----------------------------------------------------------- loading
    def _annotation_of(self, record):
        return f"{self.annotation_file} (image id {record.image_id})"

    def _load(self):
        data = self._read_json()
        class_names, self._category_ids = self._class_mapping(data["categories"])
        class_of_category = {c: k for k, c in enumerate(self._category_ids)}
        annotations = {}
        for ann in data.get("annotations", []):
            annotations.setdefault(ann.get("image_id"), []).append(ann)
        records = []
        for image in data["images"]:
            try:
                records.append(self._to_record(image, annotations.get(image.get("id"), []), class_of_category))
            except DatasetError as err:
                if not self.skip_invalid:
                    raise
                self._skip_image(err.reason)
        return records, class_names

    def _read_json(self):
        if not self.annotation_file.is_file():
            raise DatasetError(f"{self.annotation_file}: annotation file not found", reason="missing annotation")
        try:
            data = json.loads(self.annotation_file.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise DatasetError(f"{self.annotation_file}: cannot parse json ({err})", reason="unparsable json") from None
        missing = [key for key in ("images", "categories") if key not in data]
        if missing:
            raise DatasetError(f"{self.annotation_file}: not a COCO detection file (no {missing})")
        return data

    def _class_mapping(self, categories):
        by_id = sorted(categories, key=lambda c: c["id"])
        if self._class_names is None:
            return [c["name"] for c in by_id], [int(c["id"]) for c in by_id]
        id_of_name = {c["name"]: int(c["id"]) for c in by_id}
        if set(self._class_names) != set(id_of_name):
            raise DatasetError(
                f"{self.annotation_file}: class_names {self._class_names} do not match the "
                f"categories {list(id_of_name)}"
            )
        return list(self._class_names), [id_of_name[name] for name in self._class_names]

    def _to_record(self, image, annotations, class_of_category):
        where = f"{self.annotation_file}: image {image.get('id')!r} ({image.get('file_name')})"
        try:
            image_id, file_name = int(image["id"]), image["file_name"]
            width, height = int(image["width"]), int(image["height"])
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{where}: malformed image entry ({err!r})", reason="malformed image") from None
        image_path = self.image_dir / file_name
        if self.check_files and not image_path.is_file():
            raise DatasetError(f"{where}: image file not found: {image_path}", reason="missing file")
        objects, index = [], []
        for k, ann in enumerate(annotations):  # k: the annotation's place among this image's, in file order
            try:
                objects.append(self._check_annotation(ann, width, height, class_of_category, where))
                index.append(k)
            except DatasetError as err:
                self._bad_box(err)
        boxes, classes, difficult, iscrowd, area = zip(*objects) if objects else ([], [], [], [], [])
        return Record(image_id, str(image_path), width, height, np.reshape(boxes, (-1, 4)), classes,
                      difficult, iscrowd, np.asarray(area, np.float32),
                      annotation_path=str(self.annotation_file), object_index=np.asarray(index, np.int64))

    def _check_annotation(self, ann, width, height, class_of_category, where):
        where = f"{where}, annotation {ann.get('id')!r}"
        try:
            box = coco_to_xyxy(ann["bbox"])[0]
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{where}: malformed bbox {ann.get('bbox')!r}", reason="malformed box") from None
        if ann.get("category_id") not in class_of_category:
            raise DatasetError(f"{where}: unknown category_id {ann.get('category_id')!r}", reason="unknown class")
        problem = check_box(box, width, height, tolerance=BORDER_TOLERANCE)
        if problem:
            raise DatasetError(f"{where}: bbox {ann['bbox']} is {problem} ({width}x{height} image)", reason=problem)
        box = np.clip(box, 0, [width, height, width, height])
        difficult = bool(ann.get("difficult", 0))
        iscrowd = bool(ann.get("iscrowd", 0)) and not difficult
        area = float(ann["area"]) if "area" in ann else float(box_area_np(box)[0])
        return box, class_of_category[ann["category_id"]], difficult, iscrowd, area


# ------------------------------------------------------------------ writers
def coco_image_ids(records):
    """The int image ids :func:`records_to_coco_json` uses, one per record.

    Int ids are kept; otherwise (VOC string ids) images are numbered 1..N in order.
    """
    ids = [r.image_id for r in records]
    if all(isinstance(i, (int, np.integer)) for i in ids) and len(set(ids)) == len(ids):
        return [int(i) for i in ids]
    return list(range(1, len(records) + 1))


def records_to_coco_json(records, class_names, category_ids=None):
    """Any source's records as a COCO GT dict (category id = class id + 1 by default).

    Difficult objects get ``iscrowd=1, ignore=1, difficult=1`` (see module doc).
    Each image entry also carries ``kdet_image_id``, the record's own id.
    """
    category_ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
    images, annotations = [], []
    for image_id, record in zip(coco_image_ids(records), records):
        images.append(dict(id=image_id, file_name=Path(record.image_path).name if record.image_path else str(record.image_id),
                           width=int(record.width), height=int(record.height), kdet_image_id=_jsonable(record.image_id)))
        area = record.area if record.area is not None else box_area_np(record.boxes)
        for k in range(len(record)):
            difficult = bool(record.difficult[k])
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id,
                category_id=int(category_ids[int(record.classes[k])]),
                bbox=[float(v) for v in xyxy_to_coco(record.boxes[k])[0]],
                area=float(area[k]),
                iscrowd=int(bool(record.iscrowd[k]) or difficult),
                ignore=int(difficult), difficult=int(difficult),
            ))
    categories = [dict(id=int(c), name=name) for c, name in zip(category_ids, class_names)]
    return dict(images=images, annotations=annotations, categories=categories)


def to_coco_results(image_ids, detections, category_ids=None):
    """Per-image detections -> COCO result dicts ``{image_id, category_id, bbox, score}``.

    ``detections[i]`` is a dict with ``boxes`` ``[K, 4]`` pixel ``xyxy``, ``scores``
    ``[K]``, ``classes`` ``[K]`` (0-based; ``-1`` rows and rows past an optional
    ``num_detections`` are padding) or a ``(boxes, scores, classes)`` tuple.
    ``category_ids[class_id]`` gives the json's id (default ``class_id + 1``).
    """
    results = []
    for image_id, det in zip(image_ids, detections):
        boxes, scores, classes, count = _unpack_detections(det)
        for box, score, cls in zip(boxes[:count], scores[:count], classes[:count]):
            if cls < 0:
                continue
            category = category_ids[int(cls)] if category_ids is not None else int(cls) + 1
            results.append(dict(image_id=_jsonable(image_id), category_id=int(category),
                                bbox=[float(v) for v in xyxy_to_coco(box)[0]], score=float(score)))
    return results


def _unpack_detections(det):
    if isinstance(det, dict):
        boxes, scores, classes = det["boxes"], det["scores"], det["classes"]
        count = det.get("num_detections")
    else:
        (boxes, scores, classes), count = det, None
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    count = len(boxes) if count is None else int(count)
    return boxes, np.asarray(scores).reshape(-1), np.asarray(classes).reshape(-1), count


def _jsonable(value):
    return int(value) if isinstance(value, (int, np.integer)) else str(value)
