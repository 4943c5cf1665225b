"""tools/train.py under KERAS_BACKEND=jax: training, val_AP, the final evaluation, the report and --resume.

The pytest process runs the TensorFlow backend, so the runs are subprocesses (the JAX
environment of test_coco_jax.py). tf.data stays the input pipeline; the SavedModel export is
TensorFlow-only, so the run saves ``final.keras`` and prints the export command instead.
A JAX compilation cache in tmp_path lets the resumed run reuse the first run's programs.
"""

import csv
import json
import subprocess
import sys

from _helpers import REPO, write_tiny_recipe
from test_coco_jax import jax_env

from kdet.metrics.coco import coco_evaluate


def _train(recipe, work_dir, cache, *args):
    env = dict(jax_env(), JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), recipe, "--work-dir", str(work_dir), *args],
                          capture_output=True, text=True, env=env, timeout=900)


def _epochs_logged(work_dir):
    with open(work_dir / "log.csv") as f:
        return [row for row in csv.DictReader(f)]


def truth_images(work_dir):
    return json.loads((work_dir / "ground_truth.json").read_text())["images"]


def test_train_tool_under_jax_evaluates_and_resumes(tmp_path):
    recipe, work_dir, cache = write_tiny_recipe(tmp_path), tmp_path / "run", tmp_path / "jax_cache"

    refused = _train(recipe, work_dir, cache, "--strategy", "mirrored")
    assert refused.returncode != 0
    assert "train.strategy='mirrored' is a tf.distribute strategy: it needs KERAS_BACKEND=tensorflow" in refused.stderr

    out = _train(recipe, work_dir, cache)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = _epochs_logged(work_dir)
    assert [row["epoch"] for row in rows] == ["0"] and float(rows[0]["val_AP"]) >= 0.0
    metrics = json.loads((work_dir / "metrics.json").read_text())
    truth = coco_evaluate(json.loads((work_dir / "ground_truth.json").read_text()),
                          json.loads((work_dir / "test_detections.json").read_text()))
    assert json.loads((work_dir / "test_detections.json").read_text())  # the model detects something
    assert metrics["AP50"] == truth["AP50"] and metrics["AP"] == truth["AP"]
    assert (work_dir / "report.json").exists() and (work_dir / "final.keras").exists()
    candidates = json.loads((work_dir / "report_config.json").read_text())["nms"]["candidates"]  # the cap finding's
    assert len(candidates) == len(truth_images(work_dir)) and all(n >= 0 for n in candidates)
    assert metrics["saved_model"] is None and not (work_dir / "saved_model").exists()
    assert "SavedModel export needs the TensorFlow backend" in out.stdout
    assert f"KERAS_BACKEND=tensorflow python tools/export.py {work_dir / 'final.keras'}" in out.stdout

    resumed = _train(recipe, work_dir, cache, "--resume", "--set", "train.epochs=2")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {work_dir / 'last.keras'} after epoch 1" in resumed.stdout
    assert [row["epoch"] for row in _epochs_logged(work_dir)] == ["0", "1"]
    assert json.loads((work_dir / "state.json").read_text())["epochs_done"] == 2
