"""The recipe-facing data-source factories.

Recipes build sources with these::

    data=dict(train=concat(voc(VOC07, "trainval"), voc(VOC12, "trainval")),
              val=voc(VOC07, "test"))

Every source validates its annotations when it loads (never mid-epoch) and
raises :class:`DatasetError` naming the file and the problem. Sources that
take ``skip_invalid=True`` drop bad boxes/images instead, count them in
``source.skipped`` and warn once. The base types live in :mod:`kdet.data.base`.
"""

from kdet.data.base import ConcatSource, DatasetError, Source, check_box, skipped_message  # noqa: F401  (re-exported)


# ---------------------------------------------------------- recipe factories
# Each returns a `kdet.data.base.Source`: ``.class_names`` and ``.records()`` (a list of
# `kdet.data.records.Record`, read and validated on first call; DatasetError names the file).

def voc(root, split: str, class_names=None, skip_invalid: bool = False, **kwargs) -> Source:
    """PASCAL VOC layout at ``root`` (``split`` may join sets: ``"trainval+test"``).

    Args:
        root: the folder holding ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/``.
        split: image-set name(s) in ``ImageSets/Main``, joined by ``+``.
        class_names: class order (0-based ids); default: the names found, sorted.
        skip_invalid: drop bad boxes / images with a counted warning instead of raising.

    Returns:
        a source (``VOCSource``) of records with pixel ``xyxy`` boxes.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> _ = shapes(root, "train", num_train=2, num_test=0, image_size=64).records()  # writes VOC files
        >>> src = voc(root, "train", class_names=["circle", "square", "triangle", "cross", "ring"])
        >>> records = src.records()
        >>> len(records), records[0].width, records[0].boxes.shape[1]
        (2, 64, 4)
    """
    from kdet.data.voc import VOCSource

    return VOCSource(root, split, class_names=class_names, skip_invalid=skip_invalid, **kwargs)


def coco(annotation_file, image_dir, class_names=None, skip_invalid: bool = False, **kwargs) -> Source:
    """COCO json annotations plus an image folder.

    Args:
        annotation_file: an ``instances_*.json``.
        image_dir: the folder of its ``file_name`` images.
        class_names: class order; default the json's categories in id order.
        skip_invalid: drop bad boxes / images with a counted warning instead of raising.
        **kwargs: ``check_files=False`` skips the check that every image file exists.

    Returns:
        a source (``COCOSource``); ``iscrowd`` objects are ignore-flagged.

    Example:
        >>> import json, os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> gt = {"images": [{"id": 5, "file_name": "a.jpg", "width": 64, "height": 48}],
        ...       "categories": [{"id": 3, "name": "cat"}],
        ...       "annotations": [{"id": 1, "image_id": 5, "category_id": 3, "bbox": [4, 4, 20, 10],
        ...                        "area": 200, "iscrowd": 0}]}
        >>> with open(os.path.join(folder, "gt.json"), "w") as f:
        ...     json.dump(gt, f)
        >>> src = coco(os.path.join(folder, "gt.json"), folder, check_files=False)
        >>> record = src.records()[0]
        >>> src.class_names, record.boxes.tolist(), record.classes.tolist()
        (['cat'], [[4.0, 4.0, 24.0, 14.0]], [0])
    """
    from kdet.data.coco import COCOSource

    return COCOSource(annotation_file, image_dir, class_names=class_names, skip_invalid=skip_invalid, **kwargs)


def tfds(name: str, split: str, data_dir=None, **kwargs) -> Source:
    """A TFDS detection dataset (``voc/2007``, ``voc/2012``, ``coco/2017``).

    Args:
        name: the TFDS builder name.
        split: a TFDS split expression (``"train+validation"``).
        data_dir: TFDS's data folder; None: its default (``~/tensorflow_datasets``).

    Returns:
        a source (``TFDSSource``); TFDS downloads and prepares the data on first use.

    Example:
        Needs the data (a download on first use), so not run by the tests:

        >>> src = tfds("voc/2007", "test")  # doctest: +SKIP
        >>> len(src.records())  # doctest: +SKIP
        4952
    """
    from kdet.data.tfds_source import TFDSSource

    return TFDSSource(name, split, data_dir=data_dir, **kwargs)


def shapes(root=None, split: str = "train", **params) -> Source:
    """The synthetic shapes dataset, generated into a cache folder when missing.

    Args:
        root: the folder for the generated VOC layout; None: ``$KDET_CACHE`` or ``~/.cache/kdet``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        **params: ``kdet.data.shapes.generate_shapes``'s (``num_train``, ``num_test``,
            ``image_size``, ``max_objects``, ...).

    Returns:
        a VOC source over the generated folder (five classes: circle, square, triangle, cross, ring).

    Example:
        >>> import tempfile
        >>> src = shapes(tempfile.mkdtemp(), "test", num_train=0, num_test=3, image_size=64)
        >>> len(src.records()), src.class_names
        (3, ['circle', 'square', 'triangle', 'cross', 'ring'])
    """
    from kdet.data.shapes import shapes as _shapes

    return _shapes(root, split, **params)


def concat(*sources) -> Source:
    """Sources one after the other; their class lists must agree.

    Args:
        *sources: sources with the same ``class_names``.

    Returns:
        a source whose records are those of each source in turn.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> both = concat(shapes(root, "train", num_train=2, num_test=1, image_size=64),
        ...               shapes(root, "test", num_train=2, num_test=1, image_size=64))
        >>> len(both.records())
        3
    """
    return ConcatSource(*sources)


def yolo(images, class_names, skip_invalid=False, **kwargs):
    """YOLO txt labels for an image folder (or list of image paths); labels by Ultralytics' images/ -> labels/ rule."""
    from kdet.data.yolo import YOLOSource

    return YOLOSource(images, class_names, skip_invalid=skip_invalid, **kwargs)


def voc_folder(image_dir, xml_dir=None, class_names=None, skip_invalid=False):
    """Images with PASCAL VOC XMLs beside them or in ``xml_dir``, no ImageSets (LabelImg, CVAT, Label Studio)."""
    from kdet.data.voc_folder import VOCFolderSource

    return VOCFolderSource(image_dir, xml_dir, class_names=class_names, skip_invalid=skip_invalid)


def auto(root, split="train", class_names=None, val_fraction=None, seed=None, skip_invalid=None, data=None):
    """The ``split`` source of whichever layout is under ``root`` (YOLO, VOC, VOC folder, COCO).

    See :mod:`kdet.data.detect`. Without a validation split in the data,
    ``val_fraction`` (default 0.2) of the training images become one, seeded by
    ``seed`` (default 0) and stratified by class. ``split="test"`` gives None
    when the data has no test split. Unset arguments are taken from ``data``,
    the recipe's data section (``class_names``, ``val_fraction``,
    ``split_seed``, ``skip_invalid``, ``min_val_images``), which the engine passes in.
    """
    from kdet.data.detect import custom_dataset

    data = data or {}
    pick = lambda value, key, default: value if value is not None else (  # noqa: E731
        data.get(key) if data.get(key) is not None else default)
    dataset = custom_dataset(root, class_names=pick(class_names, "class_names", None),
                             val_fraction=pick(val_fraction, "val_fraction", 0.2), seed=pick(seed, "split_seed", 0),
                             skip_invalid=pick(skip_invalid, "skip_invalid", False),
                             min_val_images=data.get("min_val_images"))
    return dataset.source(split)


auto.reads_recipe_data = True  # kdet.config.resolve_source passes the recipe's data section as data=


# ------------------------------------------------- the headline recipes' data: a local folder, else TFDS
TFDS_DEFAULT_DIR = "~/tensorflow_datasets"
_VOC_TFDS_SPLITS = {"trainval": "train+validation", "train": "train", "val": "validation", "test": "test"}
VOC_LAYOUT = ("a VOCdevkit: the folder holding VOC2007/ and VOC2012/ as the official tars extract them, each "
              "with Annotations/, JPEGImages/ and ImageSets/Main/<set>.txt (VOC2007/ImageSets/Main/test.txt for the "
              "test set)")
COCO_LAYOUT = ("a COCO 2017 folder: annotations/instances_train2017.json, annotations/instances_val2017.json, "
               "train2017/ and val2017/ as the official zips extract them")


def voc_or_tfds(root, sets="2007:trainval+2012:trainval", class_names=None, skip_invalid=False) -> Source:
    """PASCAL VOC from a local VOCdevkit under ``root`` when there is one, else TFDS ``voc/YEAR`` in ``root``.

    What is on disk decides: ``root`` (or ``root/VOCdevkit``) holding a ``VOC2007/`` or ``VOC2012/``
    folder is read as the official VOCdevkit; otherwise ``root`` is TFDS's data_dir (an existing
    folder, or TFDS's default ``~/tensorflow_datasets``, which TFDS creates), and TFDS downloads and
    prepares the data there when it is missing. A ``root`` that is neither (no such folder) is a
    :class:`DatasetError` naming both layouts; so is a failed TFDS preparation, and so is a year's
    folder itself (``VOCdevkit/VOC2007``: its parent is meant, and TFDS must not download into it).

    Args:
        root: a VOCdevkit (or the folder above it) or a TFDS data_dir; None: TFDS's default.
        sets: ``"year:image-set"`` entries joined by ``+``: ``"2007:trainval+2012:trainval"`` (07+12),
            ``"2007:test"``. Image sets ``trainval``, ``train``, ``val``, ``test`` map to TFDS's
            ``train+validation``, ``train``, ``validation``, ``test``.
        class_names: default VOC's 20 classes in TFDS's (alphabetical) order.
        skip_invalid: local folders only: drop bad boxes / images with a counted warning.

    Returns:
        one source, or a ``concat`` of one per year. ``difficult`` objects are kept flagged (ignored
        by training and evaluation, as VOC's devkit and pycocotools conversions ignore them).

    Example:
        >>> import tempfile
        >>> voc_or_tfds(tempfile.mkdtemp() + "/missing", "2007:test")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        kdet.errors.DatasetError: data.root .../missing: no such folder; the VOC recipes read a VOCdevkit: ...
    """
    import os
    from pathlib import Path

    from kdet.data.voc import VOC_CLASSES, VOCSource

    pairs = _voc_sets(sets)
    names = list(class_names or VOC_CLASSES)
    folder = Path(os.path.expanduser(str(root))) if root is not None else None
    devkit = _find_devkit(folder, sorted({year for year, _ in pairs})) if folder is not None else None
    if devkit is not None:
        sources = []
        for year, image_set in pairs:
            if not (devkit / f"VOC{year}").is_dir():
                raise DatasetError(f"{devkit / f'VOC{year}'}: not found (data.root {root} is a VOCdevkit without "
                                   f"VOC{year}/; expected {VOC_LAYOUT})")
            sources.append(VOCSource(devkit / f"VOC{year}", image_set, class_names=names, skip_invalid=skip_invalid))
        return sources[0] if len(sources) == 1 else ConcatSource(*sources)
    if folder is not None and (folder / "Annotations").is_dir() and (folder / "ImageSets").is_dir():
        raise DatasetError(f"data.root {root} is one year's folder ({folder.name}/); set data.root to the folder "
                           f"holding it: {VOC_LAYOUT}")
    data_dir = _tfds_data_dir(folder, root, "VOC", VOC_LAYOUT,
                              "voc/2007 and voc/2012 prepared by `tfds build voc/2007 voc/2012 --data_dir DIR`")
    hint = (f"Or set data.root to {VOC_LAYOUT}; {root} is not one." if root is not None else
            f"Or set data.root to {VOC_LAYOUT}.")
    from kdet.data.tfds_source import TFDSSource

    sources = [TFDSSource(f"voc/{year}", _VOC_TFDS_SPLITS[image_set], data_dir=data_dir, class_names=names, hint=hint)
               for year, image_set in pairs]
    return sources[0] if len(sources) == 1 else ConcatSource(*sources)


voc_or_tfds.root_may_be_none = True  # kdet.config.resolve_source: data.root=None is TFDS's default data_dir


def coco_or_tfds(root, split="val2017", class_names=None, skip_invalid=False) -> Source:
    """COCO 2017 from a local folder under ``root`` when there is one, else TFDS ``coco/2017`` in ``root``.

    Local: ``root/annotations/instances_<split>.json`` and the image folder ``root/<split>/`` (or the
    same under ``root/coco/``, where ``unzip -d coco`` puts them), read by
    :func:`coco` (``iscrowd`` objects are ignore regions, as pycocotools treats them). Otherwise ``root``
    is TFDS's data_dir, as in :func:`voc_or_tfds`. TFDS's source holds a split's encoded images in
    memory: about 19 GB for train2017, so the local folder is the way for training on a normal machine.

    Args:
        root: the COCO folder or a TFDS data_dir; None: TFDS's default.
        split: ``"train2017"`` or ``"val2017"`` (TFDS ``train`` / ``validation``).
        class_names: default: the json's categories in id order (TFDS: COCO's 80 names, the same order).
        skip_invalid: local folders only: drop bad boxes / images with a counted warning.

    Returns:
        a source of records with pixel ``xyxy`` boxes, ``iscrowd`` and COCO's ``area``.
    """
    import os
    from pathlib import Path

    from kdet.data.coco import COCOSource

    tfds_split = {"train2017": "train", "val2017": "validation"}.get(split)
    if tfds_split is None:
        raise DatasetError(f"coco_or_tfds: split must be 'train2017' or 'val2017', got {split!r}")
    folder = Path(os.path.expanduser(str(root))) if root is not None else None
    if folder is not None and not (folder / "annotations").is_dir() and (folder / "coco" / "annotations").is_dir():
        folder = folder / "coco"  # the folder the zips were extracted into (unzip -d coco)
    if folder is not None and ((folder / "annotations").is_dir() or (folder / split).is_dir()):
        annotation_file, image_dir = folder / "annotations" / f"instances_{split}.json", folder / split
        for path, kind in ((annotation_file, "file"), (image_dir, "folder")):
            if not path.exists():
                raise DatasetError(f"{path}: {kind} not found (data.root {root} looks like a COCO folder; expected "
                                   f"{COCO_LAYOUT})")
        return COCOSource(annotation_file, image_dir, class_names=class_names, skip_invalid=skip_invalid)
    data_dir = _tfds_data_dir(folder, root, "COCO", COCO_LAYOUT,
                              "coco/2017 prepared by `tfds build coco/2017 --data_dir DIR`")
    hint = (f"Or set data.root to {COCO_LAYOUT}; {root} is not one." if root is not None else
            f"Or set data.root to {COCO_LAYOUT}.")
    from kdet.data.tfds_source import TFDSSource

    return TFDSSource("coco/2017", tfds_split, data_dir=data_dir, class_names=class_names, hint=hint)


coco_or_tfds.root_may_be_none = True


def _voc_sets(sets):
    """``"2007:trainval+2012:trainval"`` -> ``[("2007", "trainval"), ("2012", "trainval")]``."""
    pairs = []
    for entry in (sets.split("+") if isinstance(sets, str) else list(sets)):
        year, _, image_set = str(entry).strip().partition(":")
        if not year.isdigit() or image_set not in _VOC_TFDS_SPLITS:
            raise DatasetError(f"VOC sets {sets!r}: each entry is year:set with set one of "
                               f"{', '.join(_VOC_TFDS_SPLITS)}, e.g. '2007:trainval+2012:trainval'")
        pairs.append((year, image_set))
    return pairs


def _find_devkit(folder, years):
    """``folder`` or ``folder/VOCdevkit`` when it holds a ``VOC<year>/`` of ``years``, else None."""
    for candidate in (folder, folder / "VOCdevkit"):
        if any((candidate / f"VOC{year}").is_dir() for year in years):
            return candidate
    return None


def _tfds_data_dir(folder, root, what, layout, tfds_layout):
    """TFDS's ``data_dir`` for ``root``: None for TFDS's default, else the folder, which must exist."""
    import os

    if folder is None or os.path.abspath(folder) == os.path.abspath(os.path.expanduser(TFDS_DEFAULT_DIR)):
        return None  # TFDS's default (it honours $TFDS_DATA_DIR and creates the folder)
    if not folder.is_dir():
        raise DatasetError(f"data.root {root}: no such folder; the {what} recipes read {layout}; or a TFDS data_dir "
                           f"(an existing folder: empty for TFDS to download into, or holding {tfds_layout} on a "
                           "machine with internet)")
    return str(folder)
