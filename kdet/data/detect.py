"""Which dataset layout is under a folder, and its train / val / test sources.

:func:`detect_layout` looks, in this order, for

1. **YOLO** with a ``data.yaml`` (any ``*.yaml`` at the root with ``names``):
   splits from its ``train`` / ``val`` / ``test`` keys, else from the folders;
2. **VOC** with ``Annotations/`` + ``ImageSets/Main/*.txt`` (+ ``JPEGImages/``):
   ``train`` + ``val`` files, else ``trainval`` or the one split file there is; ``test`` when present;
3. **COCO** json: ``annotations/instances_<split>*.json`` (images in ``<split>*/``,
   ``images/<split>*/`` or ``images/``), Roboflow's ``<split>/_annotations.coco.json``
   (images beside it), or one COCO json at the root (images in ``images/`` or the root);
4. **YOLO** without a yaml: ``images/<split>/`` + ``labels/<split>/``,
   ``<split>/images/`` + ``<split>/labels/``, or ``images/`` + ``labels/``; class
   names from ``classes.txt`` / ``obj.names``;
5. **VOC folder**: images with ``.xml`` beside them or in a sibling folder
   (``JPEGImages``/``Annotations``, ``images``/``annotations``), at the root or
   in ``<split>/`` folders.

Split folder names: ``train``; ``val``, ``valid``, ``validation``; ``test``.
Class names come from the data (``names``, the json's categories, the XMLs'
object names sorted) unless given. A layout without a validation split gets a
seeded, stratified one (:mod:`kdet.data.split`).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from kdet.data.base import DatasetError
from kdet.data.coco import COCOSource
from kdet.log import get_logger

logger = get_logger(__name__)

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
LOOKED_FOR = ("data.yaml with 'names' (YOLO)", "Annotations/ + ImageSets/Main/ (VOC)",
              "annotations/instances_*.json, */_annotations.coco.json or a COCO *.json (COCO)",
              "images/ + labels/ with .txt files (YOLO)", "images with .xml beside them or in Annotations/ (VOC folder)")


@dataclass
class Layout:
    """A recognised layout: its kind, where it was found, and a source factory per split."""

    kind: str
    where: str
    splits: dict                # split -> factory(class_names, skip_invalid) -> Source
    class_names: object         # () -> class names read from the data
    names_from: str
    notes: list = field(default_factory=list)


def detect_layout(root):
    """The :class:`Layout` under ``root``; :class:`DatasetError` (one line, what was looked for) if none."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    for finder in (_yolo_with_yaml, _voc_with_imagesets, _coco, _yolo_folders, _voc_folder):
        layout = finder(root)
        if layout is not None:
            if "train" not in layout.splits:
                raise DatasetError(f"{root}: {layout.kind} layout ({layout.where}) has no training split "
                                   f"(found {sorted(layout.splits)})")
            return layout
    raise DatasetError(f"{root}: no dataset layout recognised; looked for {'; '.join(LOOKED_FOR)}")


# ------------------------------------------------------------------ helpers
def _child(folder, *names):
    """The first sub-folder of ``folder`` named one of ``names`` (case-insensitive), or None."""
    if not folder.is_dir():
        return None
    children = {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}
    return next((children[n.lower()] for n in names if n.lower() in children), None)


def _split_children(folder):
    """``{split: sub-folder}`` for the split-named sub-folders of ``folder``."""
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        child = _child(folder, *names)
        if child is not None:
            found[split] = child
    return found


def _has_files(folder, suffixes, recursive=False):
    if folder is None or not folder.is_dir():
        return False
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    return any(p.suffix.lower() in suffixes for p in pattern if p.is_file())


def _has_images(folder, recursive=False):
    from kdet.data.yolo import IMAGE_EXTENSIONS

    return _has_files(folder, IMAGE_EXTENSIONS, recursive)


# ------------------------------------------------------------------ YOLO
def _yolo_with_yaml(root):
    from kdet.data.yolo import read_data_yaml

    yaml_path = _data_yaml(root)
    if yaml_path is None:
        return None
    names, splits, base = read_data_yaml(yaml_path)
    where = f"{yaml_path.name}"
    if "train" not in splits:
        folders = _yolo_split_folders(base) or _yolo_split_folders(root)
        if folders is None:
            raise DatasetError(f"{yaml_path}: no 'train' entry and no images/train or train/images folder")
        splits = folders
        where += " + folders"
    return Layout("YOLO", where, {s: _yolo_factory(images, f"{root} [{s}]") for s, images in splits.items()},
                  lambda: names, yaml_path.name)


def _data_yaml(root):
    import yaml

    preferred = [root / "data.yaml", root / "dataset.yaml"]
    others = sorted(p for p in root.glob("*.y*ml") if p not in preferred)
    for path in [p for p in preferred if p.is_file()] + others:
        if path in preferred:
            return path
        try:
            data = yaml.safe_load(path.read_text())
        except Exception:  # noqa: BLE001  (any other yaml: not ours)
            continue
        if isinstance(data, dict) and "names" in data:
            return path
    return None


def _yolo_split_folders(root):
    """``{split: image folder}`` of YOLO folders with ``.txt`` labels, or None."""
    images, labels = _child(root, "images"), _child(root, "labels")
    if images is not None and labels is not None and _has_files(labels, {".txt"}, recursive=True):
        return _split_children(images) or {"train": images}
    by_split, label_dirs = {}, []
    for split, folder in _split_children(root).items():
        if _child(folder, "images") is not None and _child(folder, "labels") is not None:
            by_split[split] = _child(folder, "images")
            label_dirs.append(_child(folder, "labels"))
    if any(_has_files(d, {".txt"}, recursive=True) for d in label_dirs):
        return by_split
    return None


def _yolo_folders(root):
    folders = _yolo_split_folders(root)
    if folders is None:
        return None
    names, names_from = _yolo_names_without_yaml(root, folders)
    where = ", ".join(f"{s}: {f.relative_to(root)}" for s, f in folders.items())
    return Layout("YOLO", where, {s: _yolo_factory(f, f"{root} [{s}]") for s, f in folders.items()},
                  lambda: names, names_from)


def _yolo_names_without_yaml(root, folders):
    from kdet.data.yolo import label_path, image_files

    candidates = [root / "classes.txt", root / "obj.names", root / "labels" / "classes.txt"]
    candidates += [label_path(f / "x.jpg").parent / "classes.txt" for f in folders.values()]
    for path in candidates:
        if path.is_file():
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if names:
                return names, path.name
    largest = -1
    for folder in folders.values():
        for image in image_files(folder):
            labels = label_path(image)
            if labels.is_file():
                for line in labels.read_text().splitlines():
                    try:
                        largest = max(largest, int(float(line.split()[0])))
                    except (ValueError, IndexError):
                        pass  # the source reports bad lines with file:line
    if largest < 0:
        raise DatasetError(f"{root}: YOLO folders without data.yaml, classes.txt or any label: no class names")
    return [str(i) for i in range(largest + 1)], "the label files' class ids (no data.yaml or classes.txt)"


def _yolo_factory(images, name):
    def make(class_names, skip_invalid):
        from kdet.data.yolo import YOLOSource

        return YOLOSource(images, class_names, skip_invalid=skip_invalid, name=name)

    return make


# ------------------------------------------------------------------ VOC
VOC_TRAIN_FILES = ("train", "trainval")


def _voc_with_imagesets(root):
    main = root / "ImageSets" / "Main"
    annotations = _child(root, "Annotations")
    if annotations is None or not main.is_dir():
        return None
    files = {p.stem: p for p in main.glob("*.txt") if "_" not in p.stem}  # not VOC's per-class lists
    if not files:
        return None
    splits = {}
    if "train" in files and "val" in files:
        splits.update(train="train", val="val")
    elif "trainval" in files or "train" in files:
        splits["train"] = "trainval" if "trainval" in files else "train"
    elif len([s for s in files if s != "test"]) == 1:
        splits["train"] = next(s for s in files if s != "test")  # CVAT writes ImageSets/Main/default.txt
    else:
        raise DatasetError(f"{main}: VOC split files {sorted(files)}: cannot tell which one is the training split "
                           "(expected train.txt + val.txt, trainval.txt or a single file)")
    if "test" in files:
        splits["test"] = "test"

    def factory(split):
        def make(class_names, skip_invalid):
            from kdet.data.voc import VOCSource

            return VOCSource(root, split, class_names=class_names, skip_invalid=skip_invalid)
        return make

    where = "ImageSets/Main: " + ", ".join(f"{s}={f}.txt" for s, f in splits.items())
    return Layout("VOC", where, {s: factory(f) for s, f in splits.items()},
                  lambda: _xml_names(sorted(annotations.glob("*.xml"))), "the XMLs' object names")


def _xml_names(paths):
    from kdet.data.voc_folder import xml_class_names

    return xml_class_names(paths)


def _voc_folder_pair(folder):
    """``(image folder, xml folder)`` of a VOC folder layout at ``folder``, or None."""
    for images, xmls in (("JPEGImages", "Annotations"), ("images", "annotations"), ("images", "Annotations"),
                         ("images", "xml"), ("images", "labels")):
        image_dir, xml_dir = _child(folder, images), _child(folder, xmls)
        if image_dir is not None and xml_dir is not None and _has_files(xml_dir, {".xml"}) and _has_images(image_dir):
            return image_dir, xml_dir
    if _has_files(folder, {".xml"}) and _has_images(folder):
        return folder, folder
    return None


def _voc_folder(root):
    pairs = {s: _voc_folder_pair(f) for s, f in _split_children(root).items()}
    pairs = {s: p for s, p in pairs.items() if p is not None}
    if not pairs:
        pair = _voc_folder_pair(root)
        if pair is None:
            return None
        pairs = {"train": pair}

    def factory(image_dir, xml_dir):
        def make(class_names, skip_invalid):
            from kdet.data.voc_folder import VOCFolderSource

            return VOCFolderSource(image_dir, xml_dir, class_names=class_names, skip_invalid=skip_invalid)
        return make

    def describe(split, image_dir, xml_dir):
        rel = lambda p: str(p.relative_to(root)) if p != root else "."  # noqa: E731
        return f"{split}: {rel(image_dir)}" + ("" if xml_dir == image_dir else f" + {rel(xml_dir)}")

    xmls = [p for _, xml_dir in pairs.values() for p in sorted(xml_dir.glob("*.xml"))]
    return Layout("VOC folder", ", ".join(describe(s, *p) for s, p in pairs.items()),
                  {s: factory(*p) for s, p in pairs.items()}, lambda: _xml_names(xmls), "the XMLs' object names")


# ------------------------------------------------------------------ COCO
def _coco(root):
    found = _coco_annotations_folder(root) or _coco_roboflow(root) or _coco_single(root)
    if found is None:
        return None
    where, files = found  # files: split -> (json, image folder)
    factories = {s: _coco_factory(j, d) for s, (j, d) in files.items()}
    return Layout("COCO", where, factories, lambda: coco_class_names(files["train"][0]), "the json's categories")


def _split_of(stem):
    stem = stem.lower()
    for split, names in (("train", ("train",)), ("val", ("val", "valid")), ("test", ("test",))):
        if any(n in stem for n in names):
            return split
    return None


def _coco_annotations_folder(root):
    folder = _child(root, "annotations")
    if folder is None:
        return None
    files = {}
    for path in sorted(folder.glob("*.json")):
        if any(skip in path.stem for skip in ("keypoints", "captions", "panoptic", "stuff")):
            continue
        split = _split_of(path.stem)
        if split is None or split in files:
            continue
        data = _coco_json(path)
        if data is None or "annotations" not in data:  # image_info_test*.json: no labels to train or score
            continue
        image_dir = _coco_image_dir(root, path.stem.replace("instances_", ""), data, folder)
        files[split] = (path, image_dir)
    if not files:
        return None
    return "annotations/: " + ", ".join(f"{s}={j.name} + {_rel(d, root)}" for s, (j, d) in files.items()), files


def _coco_roboflow(root):
    files = {s: (f / "_annotations.coco.json", f) for s, f in _split_children(root).items()
             if (f / "_annotations.coco.json").is_file()}
    if not files:
        return None
    return "Roboflow: " + ", ".join(f"{s}={_rel(j, root)}" for s, (j, _) in files.items()), files


def _coco_single(root):
    for path in sorted(root.glob("*.json")):
        data = _coco_json(path)
        if data is not None:
            image_dir = _coco_image_dir(root, "images", data, root)
            return f"{path.name} + {_rel(image_dir, root)}", {"train": (path, image_dir)}
    return None


def _rel(path, root):
    return "." if path == root else str(path.relative_to(root))


def _coco_json(path):
    """The parsed json when it is a COCO detection file, else None."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    return data if isinstance(data, dict) and "images" in data and "categories" in data else None


def _coco_image_dir(root, split_name, data, json_folder):
    """The folder holding the json's first image file (its ``file_name`` is relative to it)."""
    candidates = [root / split_name, root / "images" / split_name, root / "images", json_folder, root]
    first = next((im.get("file_name") for im in data["images"] if im.get("file_name")), None)
    for folder in candidates:
        if first is not None and (folder / first).is_file():
            return folder
    return next((f for f in candidates if f.is_dir()), root)


def coco_class_names(json_path):
    """Category names sorted by id, without Roboflow's parent category (named by the others' supercategory, unused)."""
    data = _coco_json(Path(json_path)) or {}
    categories = sorted(data.get("categories", []), key=lambda c: c["id"])
    used = {a.get("category_id") for a in data.get("annotations", [])}
    parents = {c.get("supercategory") for c in categories}
    return [c["name"] for c in categories if not (c["name"] in parents and c["id"] not in used)]


def _coco_factory(json_path, image_dir):
    def make(class_names, skip_invalid):
        return CategoryFilteredCOCO(json_path, image_dir, class_names=class_names, skip_invalid=skip_invalid)

    return make


class CategoryFilteredCOCO(COCOSource):
    """A COCOSource that drops categories outside ``class_names`` that no annotation uses (Roboflow's parent)."""

    def _read_json(self):
        data = super()._read_json()
        if self._class_names is not None:
            used = {a.get("category_id") for a in data.get("annotations", [])}
            data["categories"] = [c for c in data["categories"] if c["name"] in self._class_names or c["id"] in used]
        return data


# ------------------------------------------------------------------ the dataset
class CustomDataset:
    """The train / val / test sources of whatever layout is under ``root``.

    Class names: ``class_names`` when given, else read from the data. Without a
    validation split in the data, ``val_fraction`` of the training images
    become one (seeded, stratified; ``val_fraction=0``: no validation split; none either when
    it would hold fewer than ``min_val_images`` images: then every image trains).
    ``source("test")`` is None when the data has no test split.
    """

    def __init__(self, root, class_names=None, val_fraction=0.2, seed=0, skip_invalid=False, min_val_images=None):
        from kdet.data.split import SeededSplit

        self.root = Path(root).expanduser()
        self.layout = detect_layout(self.root)
        self.class_names = list(class_names) if class_names else list(self.layout.class_names())
        if not self.class_names:
            raise DatasetError(f"{self.root}: {self.layout.kind} layout ({self.layout.where}) has no objects, "
                               "so no class names; pass class_names")
        self.sources = {s: make(self.class_names, skip_invalid) for s, make in self.layout.splits.items()}
        self.seeded_val = "val" not in self.sources and bool(val_fraction)
        if self.seeded_val:
            split = SeededSplit(self.sources["train"], val_fraction, seed, min_val_images)
            self.sources.update(train=split.part("train"), val=split.part("val"))
        logger.info(self.describe())

    def describe(self):
        splits = [s + (" (seeded from train)" if s == "val" and self.seeded_val else "") for s in self.sources]
        text = (f"data: {self.layout.kind} layout at {self.root} ({self.layout.where}); splits: {', '.join(splits)}; "
                f"{len(self.class_names)} classes from {self.layout.names_from}: {self.class_names}")
        if "test" not in self.sources:
            text += "\ndata: no test split: the final evaluation uses the validation split"
        return text

    def source(self, split):
        if split not in SPLIT_FOLDERS:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return self.sources.get(split)


_DATASETS = {}


def custom_dataset(root, class_names=None, val_fraction=0.2, seed=0, skip_invalid=False, min_val_images=None):
    """The :class:`CustomDataset` for these arguments, shared by the train / val / test sources of one run."""
    key = (str(Path(root).expanduser().resolve()), tuple(class_names or ()), float(val_fraction or 0), int(seed),
           bool(skip_invalid), int(min_val_images or 0))
    if key not in _DATASETS:
        _DATASETS[key] = CustomDataset(root, class_names, val_fraction, seed, skip_invalid, min_val_images)
    return _DATASETS[key]
