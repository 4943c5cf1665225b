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
def voc(root, split, class_names=None, skip_invalid=False, **kwargs):
    """PASCAL VOC layout at ``root`` (``split`` may join sets: ``"trainval+test"``)."""
    from kdet.data.voc import VOCSource

    return VOCSource(root, split, class_names=class_names, skip_invalid=skip_invalid, **kwargs)


def coco(annotation_file, image_dir, class_names=None, skip_invalid=False, **kwargs):
    """COCO json annotations plus an image folder."""
    from kdet.data.coco import COCOSource

    return COCOSource(annotation_file, image_dir, class_names=class_names, skip_invalid=skip_invalid, **kwargs)


def tfds(name, split, data_dir=None, **kwargs):
    """A TFDS detection dataset (``voc/2007``, ``voc/2012``, ``coco/2017``)."""
    from kdet.data.tfds_source import TFDSSource

    return TFDSSource(name, split, data_dir=data_dir, **kwargs)


def shapes(root=None, split="train", **params):
    """The synthetic shapes dataset, generated into a cache folder when missing."""
    from kdet.data.shapes import shapes as _shapes

    return _shapes(root, split, **params)


def concat(*sources):
    """Sources one after the other; their class lists must agree."""
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
    ``split_seed``, ``skip_invalid``), which the engine passes in.
    """
    from kdet.data.detect import custom_dataset

    data = data or {}
    pick = lambda value, key, default: value if value is not None else (  # noqa: E731
        data.get(key) if data.get(key) is not None else default)
    dataset = custom_dataset(root, class_names=pick(class_names, "class_names", None),
                             val_fraction=pick(val_fraction, "val_fraction", 0.2), seed=pick(seed, "split_seed", 0),
                             skip_invalid=pick(skip_invalid, "skip_invalid", False))
    return dataset.source(split)


auto.reads_recipe_data = True  # kdet.config.resolve_source passes the recipe's data section as data=
