"""train.strategy="multiworker": two worker processes on 127.0.0.1 train as one run.

Two processes run ``kdet.engine.train`` with ``TF_CONFIG`` (MultiWorkerMirroredStrategy,
one CPU replica each, gRPC on loopback ports found free); a third runs the same recipe
with the default strategy (one device, the same global batch of 8). Checks:

* both workers end with identical weights (the all-reduce keeps the copies in step);
* they equal the single-device run's weights: the data is seeded by ``(seed, epoch)``, so
  both workers draw the same global batches and each takes its half (``AutoShardPolicy.DATA``);
  the loss divides by the positive count of the global batch (summed over replicas), so the
  averaged gradient is the single-device one; vgg16 has no BatchNorm. What remains is float32
  summation order (two half-batch sums added by the all-reduce instead of one sum):
  relative error ~1e-7 per step, grown over 4 Adam steps to well under the 1e-4 tolerance
  used here (the largest difference measured is printed on failure);
* only the chief writes the work dir (checkpoints, log, export); the other worker's files
  went to a temporary folder that is gone afterwards; both log the same val_AP.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from _helpers import REPO

RECIPE = """
import sys; sys.path.insert(0, {recipes!r})
from _base_ssd import recipe as base
from kdet.config import merge
from kdet.data.augment import hflip, resize
from kdet.data.shapes import SHAPES_CLASSES
from kdet.data.sources import shapes

PARAMS = dict(num_train=16, num_test=4, image_size=48, max_objects=2)
recipe = merge(base, dict(
    model=dict(image_size=48, width_multiplier=0.125, backbone_weights=None),
    data=dict(class_names=list(SHAPES_CLASSES), train=shapes({root!r}, "train", **PARAMS),
              val=shapes({root!r}, "test", **PARAMS), test=None,
              augment=[hflip(), resize()], batch_size=8, eval_batch_size=4, max_boxes=4, workers=0),
    train=dict(epochs=2, optimizer="sgd", learning_rate=1e-3, warmup_epochs=0, seed=3, strategy={strategy!r}),
    eval=dict(every_n_epochs=1, max_detections=10, report_train_images=0),
    verbose=0,
))
"""

# Runs engine.train as tools/train.py does, up to the final evaluation and export (skipped: the
# claim here is about training; they cost ~10 s of CPU each): keeps the weights, log.csv and where
# this worker wrote.
WORKER = r"""
import os, shutil, sys
import numpy as np
import kdet.engine as engine
from kdet.config import load_recipe

recipe, work_dir, out = sys.argv[1:4]

def keep_results(model, recipe, out_dir, *args, **kwargs):
    np.savez(out + ".npz", *model.get_weights())
    shutil.copy(os.path.join(out_dir, "log.csv"), out + ".log.csv")
    print("OUT_DIR " + out_dir)
    return {}

engine.finish = keep_results
engine.train(load_recipe(recipe), work_dir)
"""

TIMEOUT = 420  # seconds for the two workers (about 20 s of CPU each; the wall time grows with the load)
PARAMS = dict(num_train=16, num_test=4, image_size=48, max_objects=2)


def free_ports(n):
    """Ports free on 127.0.0.1 now (bound to port 0, then released for the workers)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_recipe(tmp_path, strategy):
    path = tmp_path / f"recipe_{strategy}.py"
    path.write_text(RECIPE.format(recipes=str(REPO / "recipes"), root=str(tmp_path / "shapes"), strategy=strategy))
    return str(path)


def start_worker(recipe, work_dir, out, log, cluster, index):
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
               TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(key, None)   # gRPC between the workers stays on loopback
    return subprocess.Popen([sys.executable, "-c", WORKER, recipe, str(work_dir), str(out)], cwd=str(REPO),
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def tail(path, chars=3000):
    return f"--- {path}:\n" + open(path).read()[-chars:]


def wait_all(procs, logs):
    deadline = time.monotonic() + TIMEOUT
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"timed out after {TIMEOUT} s:\n" + "\n".join(tail(p) for p in logs))
        assert proc.returncode == 0, tail(log)


def kill(procs):
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)   # the worker and anything it started
            proc.wait()


def train_single_device(recipe_path, work_dir, monkeypatch):
    """The same recipe, one device, same global batch, in this process: ``(weights, log.csv rows)``."""
    import kdet.engine as engine
    from kdet.config import load_recipe

    kept = {}

    def keep_results(model, recipe, out_dir, *args, **kwargs):
        kept.update(weights=model.get_weights(), log=read_log(os.path.join(out_dir, "log.csv")))
        return {}

    monkeypatch.setattr(engine, "finish", keep_results)
    engine.train(load_recipe(recipe_path), str(work_dir))
    return kept


def read_log(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from kdet.data.sources import shapes

    monkeypatch = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("multiworker")
    for split in ("train", "test"):   # written once here, so the workers do not race to create them
        shapes(str(tmp / "shapes"), split, **PARAMS).records()
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    recipe = write_recipe(tmp, "multiworker")
    logs = [str(tmp / f"worker{i}.log") for i in range(2)]
    procs = []
    try:
        for i in range(2):
            with open(logs[i], "w") as log:
                procs.append(start_worker(recipe, tmp / "work", tmp / f"worker{i}", log, cluster, i))
        single = train_single_device(write_recipe(tmp, "default"), tmp / "work_single", monkeypatch)
        wait_all(procs, logs)
    finally:
        kill(procs)
        monkeypatch.undo()
    workers = [dict(weights=weights_of(tmp / f"worker{i}.npz"), log=read_log(tmp / f"worker{i}.log.csv"),
                    out_dir=out_dir_of(logs[i])) for i in range(2)]
    return dict(tmp=tmp, workers=workers, single=single, logs=logs)


def out_dir_of(log):
    lines = [line for line in open(log).read().splitlines() if line.startswith("OUT_DIR ")]
    assert lines, tail(log)
    return lines[-1][len("OUT_DIR "):]


def weights_of(path):
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def max_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def initial_weights(recipe_path):
    """The seeded initial weights, built as train() builds them (seed 3, same recipe)."""
    import keras

    from kdet.config import load_recipe
    from kdet.engine import build_model

    recipe = load_recipe(recipe_path)
    keras.utils.set_random_seed(3)
    return build_model(recipe, recipe["data"]["class_names"]).get_weights()


def test_workers_end_with_identical_weights(runs):
    w0, w1 = (w["weights"] for w in runs["workers"])
    assert len(w0) == len(w1) > 10
    assert max_difference(w0, w1) == 0.0


def test_two_workers_equal_one_device_with_the_same_global_batch(runs):
    multi, single = runs["workers"][0]["weights"], runs["single"]["weights"]
    moved = max_difference(single, initial_weights(str(runs["tmp"] / "recipe_default.py")))
    assert moved > 1e-3   # it trained
    difference = max_difference(multi, single)
    print(f"two workers vs one device: largest weight difference {difference:.3g}; trained weights moved up to {moved:.3g}")
    for m, s in zip(multi, single):
        assert np.allclose(m, s, rtol=1e-4, atol=1e-5), f"largest difference {difference} (trained: moved {moved})"


def test_only_the_chief_writes_and_both_log_the_same_val_ap(runs):
    work = runs["tmp"] / "work"
    chief, other = runs["workers"]
    assert chief["out_dir"] == str(work)
    assert not other["out_dir"].startswith(str(work)) and not os.path.exists(other["out_dir"])  # removed
    names = set(os.listdir(work))
    assert {"last.keras", "best.keras", "state.json", "log.csv", "preflight.txt"} <= names
    state = json.loads((work / "state.json").read_text())
    assert state["epochs_done"] == 2 and state["iterations"] == 4   # 16 images / global batch 8, 2 epochs
    ap = lambda log: [row["val_AP"] for row in log]
    assert len(ap(chief["log"])) == 2 and ap(chief["log"]) == ap(other["log"])
    for key in ("conf", "loc"):  # the parts of the loss, logged as global-batch means
        for m, s in zip(chief["log"], runs["single"]["log"]):
            assert float(m[key]) == pytest.approx(float(s[key]), rel=1e-3)
