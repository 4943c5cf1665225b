"""The device COCO engine and COCOEvalCallback under KERAS_BACKEND=jax (tests/jax_checks.py in a subprocess).

The pytest process runs the TensorFlow backend, so the JAX checks run in one child process
(one interpreter start and one JAX import for all of them). What they check: float64
precision / recall arrays identical to the host evaluator on the edge cases and a random
workload (float32 within 1e-4), the >100 detections per image cut, the ignore / crowd flags by
hand, x64 enabled only inside the engine, and COCOEvalCallback under model.fit on a PyDataset
(validation batches of 5, of 1 image, float32) and on tf.data, equal to coco_evaluate.
"""

import os
import subprocess
import sys

from _helpers import REPO  # jax[cpu] is in the test extras: no skip


def jax_env():
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "JAX_ENABLE_X64")}
    env.update(KERAS_BACKEND="jax", PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    return env


def test_engine_and_callback_under_jax():
    out = subprocess.run([sys.executable, str(REPO / "tests" / "jax_checks.py")], capture_output=True, text=True,
                         env=jax_env(), timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    passed = [line for line in out.stdout.splitlines() if line.startswith("ok ")]
    assert len(passed) == 7, out.stdout


def test_device_check_tool_under_jax():
    """tools/device_check.py on a small workload and a one-epoch tiny training: numbers agree, exit 0."""
    out = subprocess.run([sys.executable, str(REPO / "tools" / "device_check.py"), "--images", "100", "--epochs", "1"],
                         capture_output=True, text=True, env=jax_env(), timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert "TensorFlow imported: False" in out.stdout  # the tool's path is TensorFlow-free
    assert lines[-1].startswith("largest difference: ") and float(lines[-1].split()[2]) <= 1e-9
