"""Recipes, overrides, the train tool's error lines, and one tiny end-to-end run with resume."""

import json
import os

import pytest

from kdet.config import RecipeError, apply_override, load_recipe, merge

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


def _write_recipe(tmp_path):
    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
    path = tmp_path / "tiny.py"
    path.write_text(f"import sys; sys.path.insert(0, {recipes!r})\n" + TINY_RECIPE.format(root=str(tmp_path / "shapes")))
    return str(path)


def test_merge_is_deep_and_leaves_base_alone():
    base = dict(model=dict(a=1, b=2), train=dict(epochs=3))
    out = merge(base, dict(model=dict(b=5)))
    assert out == dict(model=dict(a=1, b=5), train=dict(epochs=3))
    assert base["model"]["b"] == 2


def test_override_parses_literals_and_rejects_unknown_keys():
    recipe = dict(train=dict(epochs=3, optimizer="sgd", lr_steps=(1, 2)), model=dict(backbone_weights="imagenet"))
    apply_override(recipe, "train.epochs=7")
    apply_override(recipe, "train.lr_steps=[4, 5]")
    apply_override(recipe, "model.backbone_weights=None")
    apply_override(recipe, "train.optimizer=adamw")
    assert recipe["train"] == dict(epochs=7, optimizer="adamw", lr_steps=[4, 5])
    assert recipe["model"]["backbone_weights"] is None
    with pytest.raises(RecipeError, match="train.epoch.*no such key"):
        apply_override(recipe, "train.epoch=1")
    with pytest.raises(RecipeError, match="no section 'nope'"):
        apply_override(recipe, "nope.x=1")
    with pytest.raises(RecipeError, match="expected key=value"):
        apply_override(recipe, "train.epochs")


def test_shipped_recipes_load(tmp_path, monkeypatch):
    monkeypatch.setenv("KDET_CACHE", str(tmp_path))
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("ssd_shapes", "ssd300_voc", "ssd300_bccd", "ssd300_fpn_voc", "ssd_fpn_bccd", "ssd_bccd_scratch"):
        recipe = load_recipe(os.path.join(here, "recipes", name + ".py"), ["train.epochs=2"])
        assert recipe["train"]["epochs"] == 2 and recipe["name"] == name
        assert {"model", "data", "loss", "train", "eval"} <= set(recipe)


def test_train_tool_errors_are_one_line(tmp_path, capsys):
    from tools_train import main

    assert main([str(tmp_path / "missing.py")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: recipe not found") and "\n" not in err

    recipe = _write_recipe(tmp_path)
    assert main([recipe, "--set", "train.epochz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.epochz" in err and "\n" not in err

    bad_root = tmp_path / "bccd.py"
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bad_root.write_text(open(os.path.join(here, "recipes", "ssd300_bccd.py")).read().replace(
        "from _base_ssd", f"import sys; sys.path.insert(0, {os.path.join(here, 'recipes')!r})\nfrom _base_ssd"))
    assert main([str(bad_root), "--set", f"data.root={tmp_path / 'nowhere'}", "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere" in err and "\n" not in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import kdet.engine as engine

    tmp = tmp_path_factory.mktemp("engine")
    recipe_path = _write_recipe(tmp)
    work_dir = str(tmp / "work")
    metrics = engine.train(load_recipe(recipe_path), work_dir)
    return recipe_path, work_dir, metrics


def test_train_writes_checkpoints_logs_metrics_and_export(tiny_run):
    _, work_dir, metrics = tiny_run
    for name in ("last.keras", "log.csv", "metrics.json", "state.json", "saved_model/saved_model.pb"):
        assert os.path.exists(os.path.join(work_dir, name)), name
    saved = json.load(open(os.path.join(work_dir, "metrics.json")))
    for key in ("AP", "AP50", "AR100", "VOC_mAP50", "per_class", "train_seconds"):
        assert key in saved
    assert 0.0 <= saved["AP50"] <= 1.0
    header = open(os.path.join(work_dir, "log.csv")).readline()
    assert "val_AP" in header and "loss" in header


def test_final_metrics_equal_coco_evaluate_on_written_detections(tiny_run):
    from kdet.data.coco import records_to_coco_json
    from kdet.metrics.coco import coco_evaluate

    recipe_path, work_dir, metrics = tiny_run
    recipe = load_recipe(recipe_path)
    records = recipe["data"]["test"].records()
    gt = records_to_coco_json(records, recipe["data"]["class_names"])
    dets = json.load(open(os.path.join(work_dir, "test_detections.json")))
    assert coco_evaluate(gt, dets)["AP"] == pytest.approx(metrics["AP"], abs=1e-12)


def test_resume_continues_from_last_epoch(tiny_run):
    import keras

    import kdet.engine as engine

    recipe_path, work_dir, _ = tiny_run
    before = keras.models.load_model(os.path.join(work_dir, "last.keras"))
    steps_before = int(before.optimizer.iterations.numpy())
    engine.train(load_recipe(recipe_path, ["train.epochs=2"]), work_dir, resume=True)
    state = json.load(open(os.path.join(work_dir, "state.json")))
    assert state["epochs_done"] == 2
    after = keras.models.load_model(os.path.join(work_dir, "last.keras"))
    assert int(after.optimizer.iterations.numpy()) == 2 * steps_before
    rows = open(os.path.join(work_dir, "log.csv")).read().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1"]


def test_callback_val_ap_equals_final_coco_evaluate(tiny_run):
    # val and test are the same split in the tiny recipe and the callback ran after the last epoch.
    _, work_dir, metrics = tiny_run
    rows = open(os.path.join(work_dir, "log.csv")).read().strip().splitlines()
    header, last = rows[0].split(","), rows[1].split(",")
    logged = dict(zip(header, last))
    assert float(logged["val_AP"]) == pytest.approx(metrics["AP"], abs=1e-6)
    assert float(logged["val_AP50"]) == pytest.approx(metrics["AP50"], abs=1e-6)


def test_fpn_recipe_trains_with_gradual_unfreezing(tmp_path, capsys):
    """Also runs the recipe keys for rare-class oversampling and the matching's ignore band."""
    import kdet.engine as engine

    recipe = load_recipe(_write_recipe(tmp_path), [
        "model.backbone=mobilenetv2_fpn", "model.width_multiplier=0.35", "model.fpn_channels=32",
        "model.image_size=72", "train.epochs=2", "train.unfreeze_schedule={0: 0, 1: 'all'}",
        "data.val=None", "data.test=None", "data.repeat_factor_threshold=0.9",
        "loss.negative_iou_threshold=0.4"])
    work_dir = str(tmp_path / "fpn")
    engine.train(recipe, work_dir)
    assert "repeat-factor sampling (threshold 0.9): 24 -> " in capsys.readouterr().out
    rows = open(os.path.join(work_dir, "log.csv")).read().strip().splitlines()
    header = rows[0].split(",")
    stages = [float(r.split(",")[header.index("trainable_stages")]) for r in rows[1:]]
    assert stages[0] == 0 and stages[1] > 0  # frozen, then unfrozen by the schedule
    assert os.path.exists(os.path.join(work_dir, "saved_model", "saved_model.pb"))


def test_fresh_process_loads_a_trained_model_with_import_kdet(tiny_run):
    import subprocess
    import sys

    _, work_dir, _ = tiny_run
    script = ("import kdet; m = kdet.load_model(%r); "
              "print(type(m).__name__, type(m.loss).__name__, int(m.optimizer.iterations.numpy()) > 0)"
              % os.path.join(work_dir, "last.keras"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "SSD MultiBoxLoss True"


def test_export_and_infer_tools(tiny_run, tmp_path):
    from _helpers import load_tool

    recipe_path, work_dir, _ = tiny_run
    out = str(tmp_path / "exported")
    assert load_tool("export").main([os.path.join(work_dir, "last.keras"), out, "--recipe", recipe_path]) == 0
    images = os.path.dirname(load_recipe(recipe_path)["data"]["test"].records()[0].image_path)
    drawn = str(tmp_path / "drawn")
    assert load_tool("infer").main([out, images, "--out", drawn, "--score-threshold", "0.0"]) == 0
    results = json.load(open(os.path.join(drawn, "detections.json")))
    count = len(os.listdir(images))  # the shapes JPEGImages folder: train and test images
    assert len(results) == count and len(os.listdir(drawn)) == count + 1  # + detections.json
    assert load_tool("export").main([os.path.join(work_dir, "last.keras"), out, "--classes", "a,b"]) == 2
