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


def run_tool(name, *args, timeout=300):
    """Run tools/NAME.py as a user does: a fresh process, this checkout's kdet first on the path."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=timeout)
