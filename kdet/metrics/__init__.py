"""Detection metrics: COCO, VOC and reports.

``from kdet.metrics import coco_evaluate`` (and the names below) load their module on
first use, so importing ``kdet.metrics`` itself stays light (no TensorFlow).
"""

import importlib

_EXPORTS = {
    "coco_evaluate": "kdet.metrics.coco",
    "load_coco_arrays": "kdet.metrics.coco",
    "CocoInputError": "kdet.metrics.coco",
    "CocoIdWarning": "kdet.metrics.coco",
    "format_summary": "kdet.metrics.coco",
    "format_per_class": "kdet.metrics.coco",
    "voc_evaluate": "kdet.metrics.voc",
    "COCOEvalCallback": "kdet.metrics.callback",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kdet.metrics' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
