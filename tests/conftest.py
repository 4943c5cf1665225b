import sys

from _helpers import load_tool


def pytest_configure(config):
    # tools/train.py as an importable module ("tools_train") for the CLI tests.
    sys.modules["tools_train"] = load_tool("train", "tools_train")
