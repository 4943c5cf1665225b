import os
import sys

import pytest

from _helpers import BCCD, load_tool, write_tiny_recipe


def pytest_configure(config):
    # tools/train.py as an importable module ("tools_train") for the CLI tests.
    sys.modules["tools_train"] = load_tool("train", "tools_train")


@pytest.fixture(scope="session")
def bccd():
    """The BCCD dataset's root (PASCAL VOC layout): skipped where it is absent, unless
    KDET_REQUIRE_BCCD=1 (CI sets it), where a missing dataset fails the test."""
    if not (BCCD / "ImageSets" / "Main" / "trainval.txt").is_file():
        message = f"BCCD not found at {BCCD} (set KDET_BCCD to its folder)"
        if os.environ.get("KDET_REQUIRE_BCCD") == "1":
            pytest.fail(message + "; KDET_REQUIRE_BCCD=1 makes this a failure")
        pytest.skip(message)
    return BCCD


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """One tiny SSD trained for one epoch on synthetic shapes (tools' and export tests; read-only)."""
    import kdet.engine as engine
    from kdet.config import load_recipe

    tmp = tmp_path_factory.mktemp("tiny_trained")
    recipe_path = write_tiny_recipe(tmp)
    work_dir = str(tmp / "work")
    metrics = engine.train(load_recipe(recipe_path, ["data.val=None"]), work_dir)
    return dict(recipe_path=recipe_path, work_dir=work_dir, metrics=metrics)
