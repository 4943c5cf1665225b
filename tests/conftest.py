import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # tools/train.py as an importable module ("tools_train") for the CLI tests.
    spec = importlib.util.spec_from_file_location("tools_train", os.path.join(ROOT, "tools", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["tools_train"] = module
