"""Data: sources -> records -> augmentation -> tf.data batches.

Recipe-facing sources: ``voc``, ``coco``, ``tfds``, ``shapes``, ``concat``,
``yolo``, ``voc_folder`` and ``auto`` (any of these layouts, detected; ``kdet.data.sources``); augmentation entries in ``kdet.data.augment``; the
input pipeline in ``kdet.data.pipeline``; audits in ``kdet.data.audit``.
"""

from kdet.data.records import Record, load_image
from kdet.data.sources import DatasetError, auto, coco, concat, shapes, tfds, voc, voc_folder, yolo
__all__ = ["Record", "load_image", "DatasetError", "voc", "coco", "tfds", "shapes", "concat", "yolo", "voc_folder",
           "auto"]
