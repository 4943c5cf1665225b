"""Training and evaluation driven by a recipe; ``tools/train.py`` is a thin wrapper.

The flow is the one data takes: sources -> records -> tf.data (augmentation,
batching) -> model -> loss / decode + NMS -> metrics -> reports and export.
Each step is a small function here so a user can call them from plain Keras.
"""

import json
import os
import time

import numpy as np

from kdet.config import RecipeError, load_recipe, resolve_source


class UserError(Exception):
    """An error whose message is the whole story (no traceback needed)."""


# ------------------------------------------------------------------ data
def load_sources(recipe):
    """The recipe's train/val/test sources (None where absent)."""
    data = recipe["data"]
    return {split: resolve_source(data.get(split), data.get("root")) for split in ("train", "val", "test")}


def class_names_of(recipe, sources):
    names = recipe["data"].get("class_names")
    if names:
        return list(names)
    for source in sources.values():
        if source is not None:
            return list(source.class_names)
    raise RecipeError("the recipe names no classes and has no data source")


def load_records(sources):
    """Records of each split, read (and validated) once, before training starts."""
    from kdet.data.sources import DatasetError

    try:
        return {split: (src.records() if src is not None else None) for split, src in sources.items()}
    except (DatasetError, OSError) as err:
        raise UserError(str(err)) from err


def build_train_dataset(recipe, records, seed=None):
    from kdet.data.pipeline import make_dataset

    data = recipe["data"]
    return make_dataset(records, image_size=_image_size(recipe), batch_size=data["batch_size"],
                        augment=data.get("augment"), training=True, max_boxes=data["max_boxes"],
                        seed=seed)


def build_eval_dataset(recipe, records, with_meta=False):
    from kdet.data.pipeline import make_eval_dataset

    data = recipe["data"]
    return make_eval_dataset(records, image_size=_image_size(recipe),
                             batch_size=data.get("eval_batch_size", data["batch_size"]),
                             max_boxes=data["max_boxes"], with_meta=with_meta)


def _image_size(recipe):
    size = recipe["model"]["image_size"]
    return (size, size) if isinstance(size, int) else tuple(size)
