"""Small helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

import importlib.util
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BCCD = Path(os.environ.get("KDET_BCCD", REPO.parent / "shared/datasets/BCCD"))


def load_tool(name, module_name=None):
    """Import tools/NAME.py as a module without putting tools/ on sys.path."""
    spec = importlib.util.spec_from_file_location(module_name or f"kdet_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def box(x, y, size=10):
    return [x, y, x + size, y + size]


def gt(boxes, classes, difficult=None):
    return dict(boxes=np.array(boxes, float).reshape(-1, 4), classes=classes,
                difficult=difficult if difficult is not None else [False] * len(classes))


def det(boxes, scores, classes):
    return dict(boxes=np.array(boxes, float).reshape(-1, 4), scores=scores, classes=classes)


def run_tool(name, *args, timeout=900):
    """Run tools/NAME.py as a user does: a fresh process, this checkout's kdet first on the path."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # some test modules set it for this process; a user's shell has not
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=timeout)


TINY_RECIPE = """
import os
from _base_ssd import recipe as base
from kdet.config import merge
from kdet.data.augment import hflip, resize
from kdet.data.shapes import SHAPES_CLASSES
from kdet.data.sources import shapes

ROOT = {root!r}
PARAMS = dict(num_train=24, num_test=8, image_size=64, max_objects=3)
recipe = merge(base, dict(
    model=dict(image_size=64, width_multiplier=0.125, backbone_weights=None),
    data=dict(class_names=list(SHAPES_CLASSES), train=shapes(ROOT, "train", **PARAMS),
              val=shapes(ROOT, "test", **PARAMS), test=shapes(ROOT, "test", **PARAMS),
              augment=[hflip(), resize()], batch_size=8, eval_batch_size=8, max_boxes=8),
    loss=dict(class_weights="auto"),
    train=dict(epochs=1, optimizer="adamw", learning_rate=1e-3, warmup_epochs=0, lr_schedule="cosine"),
    eval=dict(every_n_epochs=1, max_detections=20),
    verbose=0,
))
"""


def write_tiny_recipe(tmp_path):
    """A 64-px, width-0.125 SSD recipe on 24 + 8 synthetic shapes images under tmp_path; returns its path."""
    recipes = str(REPO / "recipes")
    path = tmp_path / "tiny.py"
    path.write_text(f"import sys; sys.path.insert(0, {recipes!r})\n" + TINY_RECIPE.format(root=str(tmp_path / "shapes")))
    return str(path)
