"""The Example: sections of the public entry points' docstrings run and print what they say."""

import doctest
import importlib

import pytest

# (module, object names whose docstrings hold an Example: section)
ENTRY_POINTS = [
    ("kdet.models.ssd", ["SSD", "SSD.detect"]),
    ("kdet.postprocess", ["decode_detections"]),
    ("kdet.metrics.coco", ["coco_evaluate", "match_records"]),
    ("kdet.data.pipeline", ["make_dataset"]),
    ("kdet.data.sources", ["voc", "coco", "tfds", "shapes", "concat"]),
]


def _resolve(module, dotted):
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("module_name, names", ENTRY_POINTS, ids=[m for m, _ in ENTRY_POINTS])
def test_docstring_examples_run(module_name, names, tmp_path, monkeypatch):
    monkeypatch.setenv("KDET_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    finder = doctest.DocTestFinder(recurse=False)
    for name in names:
        obj = _resolve(module, name)
        doc = obj.__doc__ or ""
        assert "Example:" in doc and "Args:" in doc and "Returns:" in doc, f"{module_name}.{name}: docstring sections"
        tests = [t for t in finder.find(obj, name, module=module, globs=vars(module).copy()) if t.examples]
        assert tests, f"{module_name}.{name} has no runnable example"
        for test in tests:
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name} (see the output above)"


# ------------------------------------------------------------------ boundary checks
def test_multibox_loss_names_a_bad_target_layout():
    import numpy as np

    from kdet.losses import MultiBoxLoss

    loss = MultiBoxLoss(num_classes=2)
    y_pred = np.zeros((1, 4, 4 + 3 + 4), np.float32)
    with pytest.raises(ValueError, match=r"y_true of shape \(1, 3, 5\) is not \[B, max_boxes, 6\]"):
        loss(np.zeros((1, 3, 5), np.float32), y_pred)
    with pytest.raises(ValueError, match=r"y_pred of shape \(1, 4, 6\) is not"):
        MultiBoxLoss()(np.zeros((1, 3, 6), np.float32), np.zeros((1, 4, 6), np.float32))
    targets = np.zeros((1, 3, 6), np.float32)
    targets[..., 4] = -1
    assert np.isfinite(float(loss(targets, y_pred)))  # the right layout passes
