"""A training run killed with SIGKILL mid-epoch resumes in a new process, as a user runs it.

``tools/train.py`` is started as a subprocess on a tiny shapes recipe, killed once
``state.json`` shows a finished epoch, and run again with ``--resume``. Damaged resume
files (a checkpoint cut off mid-write, a garbage or disagreeing ``state.json``) end in
one line naming the file.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from _helpers import REPO

EPOCHS, EVERY, NUM_TRAIN, BATCH = 4, 2, 24, 4   # 6 steps an epoch: the kill lands 0.05-0.25 s into epoch 2, which takes longer (its steps, then evaluation and checkpoints)
STEPS = NUM_TRAIN // BATCH

RECIPE = """
import sys
sys.path.insert(0, {recipes!r})
from _base_ssd import recipe as base
from kdet.config import merge
from kdet.data.augment import hflip, resize
from kdet.data.shapes import SHAPES_CLASSES
from kdet.data.sources import shapes

PARAMS = dict(num_train={num_train}, num_test=8, image_size=64, max_objects=3)
recipe = merge(base, dict(
    model=dict(image_size=64, width_multiplier=0.125, backbone_weights=None),
    data=dict(class_names=list(SHAPES_CLASSES), train=shapes({root!r}, "train", **PARAMS),
              val=shapes({root!r}, "test", **PARAMS), augment=[hflip(), resize()],
              batch_size={batch}, eval_batch_size=8, max_boxes=8),
    train=dict(epochs={epochs}, optimizer="adamw", learning_rate=1e-3, warmup_epochs=0, lr_schedule="cosine"),
    eval=dict(every_n_epochs={every}, max_detections=20),
    verbose=0,
))
"""


def train_command(recipe, work_dir, *extra):
    return [sys.executable, str(REPO / "tools" / "train.py"), str(recipe), "--work-dir", str(work_dir), *extra]


def tool_env():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO)
    return env


def epochs_done(work_dir):
    try:
        return json.load(open(os.path.join(work_dir, "state.json")))["epochs_done"]
    except (OSError, ValueError, KeyError):
        return 0


def log_rows(work_dir):
    with open(os.path.join(work_dir, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    recipe = tmp / "tiny.py"
    recipe.write_text(RECIPE.format(recipes=str(REPO / "recipes"), root=str(tmp / "shapes"), num_train=NUM_TRAIN,
                                    batch=BATCH, epochs=EPOCHS, every=EVERY))
    work_dir = tmp / "work"
    with open(tmp / "first.log", "w") as log:
        proc = subprocess.Popen(train_command(recipe, work_dir), stdout=log, stderr=subprocess.STDOUT,
                                cwd=str(REPO), env=tool_env())
        deadline = time.time() + 900   # the first epoch includes compiling the train step
        while epochs_done(work_dir) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)   # into the next epoch's steps
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp / "first.log").read_text()[-3000:]
    killed_after = epochs_done(work_dir)
    assert killed_after >= 1, "no epoch finished before the deadline"
    assert killed_after < EPOCHS, "the run finished before the kill: make its epochs longer"
    # a save the kill interrupted leaves a temporary file next to the checkpoint; resume must not mind it
    (work_dir / ".kdet-tmp-last.keras.abc123.keras").write_bytes(b"PK\x03\x04 partial")
    resumed = subprocess.run(train_command(recipe, work_dir, "--resume"), capture_output=True, text=True,
                             cwd=str(REPO), env=tool_env(), timeout=600)
    return recipe, work_dir, killed_after, resumed


def test_killed_run_resumes_each_epoch_once(killed_and_resumed):
    _, work_dir, killed_after, resumed = killed_and_resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert f"resuming from {work_dir / 'last.keras'} after epoch {killed_after}" in resumed.stdout
    rows = log_rows(work_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    for row in rows:
        evaluated = (int(row["epoch"]) + 1) % EVERY == 0
        assert (row["val_AP"] != "") == evaluated, row
        assert 0.0 <= float(row["loss"]) < 100
    assert epochs_done(work_dir) == EPOCHS
    assert os.path.exists(work_dir / "metrics.json") and os.path.exists(work_dir / "best.keras")
    assert not [n for n in os.listdir(work_dir) if n.startswith(".kdet-tmp-")]


def test_resumed_optimizer_continued_its_step_count(killed_and_resumed):
    """Each epoch ran once: the optimizer (and its learning-rate schedule) is at EPOCHS * STEPS steps."""
    _, work_dir, _, _ = killed_and_resumed
    state = json.load(open(work_dir / "state.json"))
    assert state["iterations"] == EPOCHS * STEPS
    assert state["best"]["monitor"] == "val_AP" and state["best"]["epoch"] % EVERY == 0


def _copy_work_dir(work_dir, tmp_path):
    copy = tmp_path / "work"
    shutil.copytree(work_dir, copy, ignore=shutil.ignore_patterns("tensorboard", "saved_model"))
    return copy


def test_truncated_checkpoint_is_one_line_naming_it(killed_and_resumed, tmp_path):
    recipe, work_dir, _, _ = killed_and_resumed
    copy = _copy_work_dir(work_dir, tmp_path)
    last = copy / "last.keras"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    proc = subprocess.run(train_command(recipe, copy, "--resume"), capture_output=True, text=True,
                          cwd=str(REPO), env=tool_env(), timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {last}: not a .keras model file") and "cut off mid-write" in line


def test_damaged_or_disagreeing_state_names_state_json(killed_and_resumed, tmp_path):
    from kdet.engine import UserError, load_resume_point

    _, work_dir, _, _ = killed_and_resumed
    copy = _copy_work_dir(work_dir, tmp_path)
    state_path = copy / "state.json"
    good = json.loads(state_path.read_text())

    state_path.write_text('{"epochs_do')
    with pytest.raises(UserError, match="state.json: not a kdet training state"):
        load_resume_point(str(copy), STEPS)

    state_path.write_text(json.dumps(dict(good, iterations=good["iterations"] + 5 * STEPS)))
    with pytest.raises(UserError, match=rf"state.json says {EPOCHS} epochs \(.* optimizer steps\) are done, but .*last.keras"):
        load_resume_point(str(copy), STEPS)

    # killed between writing last.keras and state.json: state.json one epoch behind -> the checkpoint wins
    state_path.write_text(json.dumps(dict(good, epochs_done=EPOCHS - 1, iterations=good["iterations"] - STEPS)))
    assert load_resume_point(str(copy), STEPS)["epochs_done"] == EPOCHS


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    from kdet.training.callbacks import TEMP_PREFIX, atomic_write

    target = tmp_path / "state.json"
    target.write_text("old")

    def interrupted(temp):
        with open(temp, "w") as f:
            f.write("half of the new")
        raise KeyboardInterrupt   # the process dies mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), interrupted)
    assert target.read_text() == "old"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TEMP_PREFIX)]


def test_csv_log_columns_appear_later_and_resume_keeps_finished_epochs(tmp_path):
    from kdet.training.callbacks import CSVLog

    path = str(tmp_path / "log.csv")
    log = CSVLog(path)
    log.on_epoch_end(0, {"loss": 2.5})
    log.on_epoch_end(1, {"loss": 2.0, "val_AP": 0.25})
    log.on_epoch_end(2, {"loss": 1.5, "loss_box": 0.75})
    assert open(path).read().splitlines() == [
        "epoch,loss,val_AP,loss_box", "0,2.5,,", "1,2.0,0.25,", "2,1.5,,0.75"]
    # resumed after epoch 2 (state.json said 2): epoch 2's row is repeated by the new run, so dropped
    resumed = CSVLog(path, keep_epochs=2)
    resumed.on_epoch_end(2, {"loss": 1.25})
    assert [row.split(",")[:2] for row in open(path).read().splitlines()[1:]] == [["0", "2.5"], ["1", "2.0"],
                                                                                 ["2", "1.25"]]
    assert CSVLog(path).rows == []   # a run that does not resume starts a new log


def test_infer_with_the_checkpoint_skips_an_unreadable_image_with_a_warning(killed_and_resumed, tmp_path):
    """tools/infer.py on a .keras file (kdet's loader in a fresh process) and a folder with one broken JPEG."""
    from PIL import Image

    _, work_dir, _, _ = killed_and_resumed
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(images / "good.jpg")
    (images / "broken.jpg").write_bytes((images / "good.jpg").read_bytes()[:200])   # cut off mid-file
    out = tmp_path / "drawn"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "infer.py"), str(work_dir / "last.keras"),
                           str(images), "--out", str(out), "--score-threshold", "0.0"],
                          capture_output=True, text=True, cwd=str(REPO), env=tool_env(), timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(images / "broken.jpg") in warnings[0] and "skipped" in warnings[0]
    assert "1 images drawn" in proc.stdout and "1 unreadable files skipped" in proc.stdout
    assert sorted(json.load(open(out / "detections.json"))) == ["good.jpg"]
