import os
import sys

import pytest

from _helpers import BCCD, load_tool


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
