"""Long runs: SIGTERM mid-epoch then --resume, kill -9 after a periodic checkpoint, the work-dir lock
(two runs at once, a stale lock) and a checkpoint the disk cannot take, each in fresh processes of
``tools/train.py`` on a tiny shapes recipe (64 px, width 0.125, 12 steps an epoch).

Equality with a run without a break uses the tolerance of the epoch-level resume test
(tests/test_engine.py: 1e-4 in any weight; a repeated or skipped batch moves weights by ~1e-3).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from _helpers import REPO
from test_resume_kill import RECIPE, tool_env, train_command

EPOCHS, NUM_TRAIN, BATCH = 2, 24, 2
STEPS = NUM_TRAIN // BATCH   # 12 steps an epoch
# no validation split: no evaluation or run report at the end (what is at stake here is training and its files)
QUICK_RECIPE = RECIPE.replace('val=shapes({root!r}, "test", **PARAMS)', "val=None")
TOLERANCE = 1e-4


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_train(recipe, work_dir, *extra, env=None, timeout=600):
    return subprocess.run(train_command(recipe, work_dir, *extra), capture_output=True, text=True, cwd=str(REPO),
                          env=env or tool_env(), timeout=timeout)


def read_state(work_dir):
    try:
        with open(os.path.join(work_dir, "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def weights_and_steps(path):
    from kdet.cli import load_keras_model

    model = load_keras_model(str(path))
    return {w.path: np.array(w.numpy()) for w in model.weights}, int(model.optimizer.iterations.numpy())


def worst_difference(a, b):
    return max(float(np.abs(a[key] - b[key]).max()) for key in a)


def log_epochs(work_dir):
    from kdet.training.callbacks import read_log

    return read_log(os.path.join(work_dir, "log.csv"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preempt")
    recipe = tmp / "tiny.py"
    assert QUICK_RECIPE != RECIPE
    recipe.write_text(QUICK_RECIPE.format(recipes=str(REPO / "recipes"), root=str(tmp / "shapes"), num_train=NUM_TRAIN,
                                    batch=BATCH, epochs=EPOCHS, every=EPOCHS))
    straight = tmp / "straight"
    proc = run_train(recipe, straight)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights, steps = weights_and_steps(straight / "last.keras")
    assert steps == EPOCHS * STEPS
    return tmp, recipe, weights, log_epochs(straight)


# ------------------------------------------------------------------ SIGTERM mid-epoch, then --resume
def test_sigterm_mid_epoch_checkpoints_stops_in_one_line_and_resume_equals_the_run_without_a_break(setup):
    tmp, recipe, straight, straight_log = setup
    work = tmp / "term"
    # the process sends itself a real SIGTERM after step 5 of epoch 2 (a test hook; the handler is the real one)
    env = dict(tool_env(), KDET_TEST_SIGNAL_AT="SIGTERM:1:5")
    stopped = run_train(recipe, work, env=env)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert last_line(stopped.stderr) == f"stopped by SIGTERM at epoch 2, step 5 of {STEPS}; resume with --resume"
    state = read_state(work)
    assert (state["epochs_done"], state["steps_done"], state["iterations"]) == (1, 5, STEPS + 5)
    assert [row["epoch"] for row in log_epochs(work)] == ["0"]   # only finished epochs are logged
    assert not os.path.exists(work / ".kdet-lock")   # released on the way out

    # a stale lock (its process is gone) on the way: taken over with a warning
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (work / ".kdet-lock").write_text(json.dumps(dict(pid=gone.pid, host=socket.gethostname(), started=time.time())))
    resumed = run_train(recipe, work, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {work / 'last.keras'} at epoch 2, step 5 of {STEPS}" in resumed.stdout
    assert (f"warning: {work}: took over the lock of a run that no longer runs (process {gone.pid} on host "
            f"{socket.gethostname()})") in resumed.stderr
    weights, steps = weights_and_steps(work / "last.keras")
    assert steps == EPOCHS * STEPS
    worst = worst_difference(weights, straight)
    assert worst <= TOLERANCE, f"SIGTERM + resume differs from the run without a break by up to {worst:.2g}"
    # log.csv: each epoch once; the interrupted epoch's loss averages all its steps (the running means were saved)
    rows = log_epochs(work)
    assert [row["epoch"] for row in rows] == [str(e) for e in range(EPOCHS)]
    for row, reference in zip(rows, straight_log):
        assert float(row["loss"]) == pytest.approx(float(reference["loss"]), rel=1e-4), row["epoch"]


# ------------------------------------------------------------------ kill -9 after a periodic checkpoint
def test_kill_9_after_a_periodic_checkpoint_loses_at_most_the_interval(setup):
    tmp, recipe, straight, _ = setup
    work = tmp / "kill"
    every_minutes = 0.001   # 60 ms: a mid-epoch checkpoint after about every step
    proc = subprocess.Popen(train_command(recipe, work, "--set", f"train.checkpoint_every_minutes={every_minutes}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(REPO), env=tool_env())
    deadline = time.time() + 600
    seen = {}
    while proc.poll() is None and time.time() < deadline:
        seen = read_state(work)
        if seen.get("epochs_done") == 1 and seen.get("steps_done", 0) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    assert seen.get("steps_done", 0) >= 3, f"no mid-epoch checkpoint seen in epoch 2: {seen}"
    kept = read_state(work)   # the last checkpoint before the kill (the one seen, or a later one)
    position = kept["epochs_done"] * STEPS + kept.get("steps_done", 0)
    assert position >= STEPS + seen["steps_done"]
    resumed = run_train(recipe, work, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epoch, step = divmod(position, STEPS)
    where = f"at epoch {epoch + 1}, step {step} of {STEPS}" if step else f"after epoch {epoch}"
    assert f"resuming from {work / 'last.keras'} {where}" in resumed.stdout
    weights, steps = weights_and_steps(work / "last.keras")
    assert steps == EPOCHS * STEPS and worst_difference(weights, straight) <= TOLERANCE


# ------------------------------------------------------------------ the work-dir lock
def test_a_second_run_on_a_held_work_dir_stops_before_touching_a_file(setup, tmp_path):
    from kdet.training.workdir_lock import WorkDirLock

    _, recipe, _, _ = setup
    work = tmp_path / "held"
    work.mkdir()
    (work / "state.json").write_text('{"epochs_done": 1}')
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in work.iterdir()}
    with WorkDirLock(work):   # this process holds it (alive, this host)
        proc = run_train(recipe, work)
        after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in work.iterdir() if p.name != ".kdet-lock"}
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert line.startswith(f"error: {work} is in use by another run (process {os.getpid()} on host "
                           f"{socket.gethostname()} since ")
    assert after == before   # nothing written, nothing created (no preflight.txt, no log.csv)
    assert not (work / ".kdet-lock").exists()


def test_two_runs_started_together_on_one_work_dir_one_runs_one_stops(setup, tmp_path):
    _, recipe, _, _ = setup
    work = tmp_path / "both"
    env = dict(tool_env(), KDET_TEST_SIGNAL_AT="SIGTERM:0:2")   # the one that runs stops early (quick test)
    procs = [subprocess.Popen(train_command(recipe, work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=str(REPO), env=env) for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=600), p.returncode) for p in procs]
    codes = sorted(r[3] for r in results)
    assert codes == [2, 128 + signal.SIGTERM], [r[2][-2000:] for r in results]
    (loser_pid, _, loser_err, _), (winner_pid, _, winner_err, _) = sorted(results, key=lambda r: r[3])
    assert last_line(loser_err).startswith(f"error: {work} is in use by another run (process {winner_pid} on host ")
    assert last_line(winner_err) == f"stopped by SIGTERM at epoch 1, step 2 of {STEPS}; resume with --resume"
    assert read_state(work)["steps_done"] == 2


def test_lock_in_process_busy_stale_and_released(tmp_path):
    from kdet.training.workdir_lock import LOCK_NAME, WorkDirBusy, WorkDirLock

    warnings = []
    with WorkDirLock(tmp_path, warn=warnings.append) as held:
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(WorkDirBusy, match=rf"is in use by another run \(process {os.getpid()} on host"):
            WorkDirLock(tmp_path).acquire()   # another open file: flock refuses it even in this process
        assert held.took_over is None
    assert not (tmp_path / LOCK_NAME).exists() and not warnings
    # a lock file whose process is gone: taken over, with a warning naming it
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=2 ** 22 + 12345, host=socket.gethostname())))
    with WorkDirLock(tmp_path, warn=warnings.append) as taken:
        assert taken.took_over["pid"] == 2 ** 22 + 12345
    assert len(warnings) == 1 and "took over the lock" in warnings[0] and str(2 ** 22 + 12345) in warnings[0]


# ------------------------------------------------------------------ signals, in a small process
SIGNAL_SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from kdet.training.signals import Interrupted, SignalStop
stop = SignalStop().install()
if sys.argv[1] == "immediate":
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    except Interrupted as err:
        print(err.line, err.status)
        sys.exit(0)
else:
    stop.deferred = True
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("noted", stop.pending, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("not reached")
"""


def test_signal_outside_training_stops_at_once_and_a_second_signal_exits_at_once(tmp_path):
    script = tmp_path / "signals.py"
    script.write_text(SIGNAL_SCRIPT.format(repo=str(REPO)))
    immediate = subprocess.run([sys.executable, str(script), "immediate"], capture_output=True, text=True, timeout=60)
    assert immediate.stdout.strip() == ("stopped by SIGINT before training started (nothing to save); resume with "
                                        "--resume 130")
    twice = subprocess.run([sys.executable, str(script), "twice"], capture_output=True, text=True, timeout=60)
    assert twice.returncode == 128 + signal.SIGTERM
    assert twice.stdout.strip() == f"noted {int(signal.SIGTERM)}"
    assert last_line(twice.stderr).startswith("stopped by a second SIGTERM at once")


# ------------------------------------------------------------------ a checkpoint the disk cannot take
def _mount_small_tmpfs(path, megabytes):
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _fill(folder):
    """Write a filler file until the file system is full; returns its path."""
    filler = os.path.join(folder, "filler")
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * (1 << 20)
        while True:
            try:
                f.write(chunk)
            except OSError:
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    return filler


def test_a_checkpoint_the_disk_cannot_take_keeps_the_previous_and_resume_works_once_freed(setup, tmp_path):
    """A real small file system (tmpfs) filled up after epoch 1; where mounting is not allowed, a file-size
    limit (RLIMIT_FSIZE, set on the running process) makes the write fail at the OS call instead."""
    import resource

    tmp, recipe, straight, _ = setup
    mount = tmp_path / "small"
    mounted = _mount_small_tmpfs(mount, 64)
    work = mount / "work"
    try:
        proc = subprocess.Popen(train_command(recipe, work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=str(REPO), env=tool_env())
        deadline = time.time() + 600
        while read_state(work).get("epochs_done", 0) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert read_state(work).get("epochs_done") == 1, "epoch 1 did not end"
        if mounted:
            filler = _fill(str(mount))
        else:   # the checkpoint (~6 MB) goes over a 1 MB file-size limit; log.csv and state.json do not
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
        line = last_line(err)
        reason = "No space left on device" if mounted else "File too large"
        assert line.startswith(f"error: {work}: cannot write ") and f"({reason})" in line, line
        assert "bytes (" in line and "needs about" in line and "run again with --resume" in line
        # the previous checkpoint is intact: epoch 1's, loadable, and state.json agrees
        assert read_state(work)["epochs_done"] == 1
        _, steps = weights_and_steps(work / "last.keras")
        assert steps == STEPS
        assert not [n for n in os.listdir(work) if n.startswith(".kdet-tmp-")]
        if mounted:
            os.remove(filler)
        resumed = run_train(recipe, work, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        weights, steps = weights_and_steps(work / "last.keras")
        assert steps == EPOCHS * STEPS and worst_difference(weights, straight) <= TOLERANCE
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# ------------------------------------------------------------------ tf.distribute multi-worker: SIGTERM to one worker
def test_sigterm_to_one_worker_stops_both_at_the_same_step_and_both_resume(tmp_path):
    """Two ``tools/train.py`` workers (MultiWorkerMirroredStrategy on loopback); worker 1 (not the chief) gets
    SIGTERM after step 5 of epoch 2. Every step the workers all-reduce whether one was signalled, so both
    stop after that step, the chief writes the checkpoint, and both print the line and exit 143."""
    from test_multiworker import RECIPE as WORKER_RECIPE, free_ports

    from kdet.data.sources import shapes

    params = dict(num_train=48, num_test=4, image_size=48, max_objects=2)
    for split in ("train", "test"):
        shapes(str(tmp_path / "shapes"), split, **params).records()
    text = (WORKER_RECIPE.replace("num_train=16", "num_train=48").replace("batch_size=8", "batch_size=4")
            .replace('val=shapes({root!r}, "test", **PARAMS)', "val=None"))
    recipe = tmp_path / "recipe.py"
    recipe.write_text(text.format(recipes=str(REPO / "recipes"), root=str(tmp_path / "shapes"), strategy="multiworker"))
    work = tmp_path / "work"
    steps = 48 // 4

    def workers(*extra, signal_worker1=None):
        cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
        procs = []
        for index in range(2):
            env = dict(tool_env(), CUDA_VISIBLE_DEVICES="",
                       TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
            for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy", "ALL_PROXY",
                        "all_proxy"):
                env.pop(key, None)
            if index == 1 and signal_worker1:
                env["KDET_TEST_SIGNAL_AT"] = signal_worker1
            procs.append(subprocess.Popen(train_command(recipe, work, *extra), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=env))
        try:
            return [(p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=420)]]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()

    stopped = workers(signal_worker1="SIGTERM:1:5")
    for code, _, err in stopped:
        assert code == 128 + signal.SIGTERM, err[-3000:]
        assert last_line(err) == f"stopped by SIGTERM at epoch 2, step 5 of {steps}; resume with --resume"
    state = read_state(work)
    assert (state["epochs_done"], state["steps_done"], state["iterations"]) == (1, 5, steps + 5)
    resumed = workers("--resume")
    for code, out, err in resumed:
        assert code == 0, err[-3000:]
        assert f"resuming from {work / 'last.keras'} at epoch 2, step 5 of {steps}" in out
    assert read_state(work)["iterations"] == 2 * steps


# ------------------------------------------------------------------ the pipeline: a pass resumed mid-epoch
@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_with_skipped_batches_is_the_rest_of_the_same_pass(workers):
    import tensorflow as tf
    from test_time_budget import one_pass, solid_records

    from kdet.data.augment import hflip, mosaic
    from kdet.data.pipeline import close_worker_pools, make_dataset

    epoch, skip = tf.Variable(3, dtype=tf.int64), tf.Variable(0, dtype=tf.int64)
    dataset = make_dataset(solid_records(), image_size=32, batch_size=4, augment=[mosaic(p=0.5), hflip()],
                           max_boxes=8, seed=5, workers=workers, epoch=epoch, skip_batches=skip)
    try:
        full_images, full_targets = one_pass(dataset)   # 16 images: 4 batches
        skip.assign(3)
        rest_images, rest_targets = one_pass(dataset)
        assert len(rest_images) == 4
        np.testing.assert_array_equal(rest_images, full_images[12:])   # same elements, same augmentation
        np.testing.assert_array_equal(rest_targets, full_targets[12:])
        skip.assign(0)
        np.testing.assert_array_equal(one_pass(dataset)[0], full_images)
    finally:
        close_worker_pools()
