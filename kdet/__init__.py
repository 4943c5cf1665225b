"""kdet: SSD object detectors for Keras 3 / TensorFlow.

Top-level shortcuts (loaded on first use, so ``import kdet.boxes`` stays light):

* ``kdet.load_recipe(path, overrides)`` - a recipe dict from a recipe file
* ``kdet.build_model(recipe, class_names)`` - the recipe's ``SSD`` keras.Model (started from ``model.init_from`` when set)
* ``kdet.build_loss(recipe, class_names, train_records)`` - its MultiBox loss
* ``kdet.train(recipe, work_dir)`` - what ``tools/train.py`` runs
* ``kdet.load_model(path)`` - a saved ``.keras`` model, compiled, with kdet's classes registered
* ``kdet.SSD``, ``kdet.MultiBoxLoss``, ``kdet.decode_detections``, ``kdet.coco_evaluate``
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_recipe": "kdet.config",
    "merge": "kdet.config",
    "build_model": "kdet.build",
    "build_loss": "kdet.build",
    "train": "kdet.engine",
    "evaluate_records": "kdet.inference",
    "SSD": "kdet.models.ssd",
    "load_model": "kdet.models.ssd",
    "AnchorBoxes": "kdet.models.anchors",
    "MultiBoxLoss": "kdet.losses",
    "decode_detections": "kdet.postprocess",
    "coco_evaluate": "kdet.metrics.coco",
    "COCOEvalCallback": "kdet.metrics.callback",
    "export_saved_model": "kdet.export",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kdet' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
