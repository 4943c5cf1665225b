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
