"""The own-data default (issue: defaults chosen on a suite of real datasets): early stopping that waits
for learning, the small-data switch, zero-size boxes, swapped Roboflow split names, the run report of a
run that learnt nothing, and tools/benchmark_suite.py (a smoke run scored against pycocotools)."""

import json
import os
import warnings

import numpy as np
import pytest

from _helpers import REPO, load_tool, run_tool
from kdet.data.base import DatasetError
from kdet.data.tiny import generate_tiny_dataset
from kdet.data.yolo import YOLOSource, read_data_yaml
from kdet.metrics import run_report
from kdet.training.callbacks import EarlyStoppingOnEvaluations

suite = load_tool("benchmark_suite")


# ------------------------------------------------------------------ early stopping
class FakeModel:
    stop_training = False

    def get_weights(self):
        return []

    def set_weights(self, weights):
        pass


def run_history(values, planned=20, patience=2, min_value=0.01, min_fraction=0.5, budget_stops_at=None):
    """Feed a val_AP history (None: no evaluation) to the callback; returns (stopped after epoch, holds)."""
    stopper = EarlyStoppingOnEvaluations(monitor="val_AP", mode="max", patience=patience, restore_best_weights=True,
                                         min_value=min_value, min_fraction=min_fraction, planned_epochs=lambda: planned)
    model = FakeModel()
    stopper.set_model(model)
    stopper.on_train_begin()
    for epoch, value in enumerate(values):
        model.stop_training = budget_stops_at == epoch  # the time budget decides first, as in the engine
        stopper.on_epoch_end(epoch, {} if value is None else {"val_AP": value})
        if model.stop_training:
            return epoch + 1, stopper.holds
    return None, stopper.holds


def test_no_stop_while_the_best_val_ap_is_noise():
    # the run: val_AP peaked at 0.001 in epoch 4, then nothing; patience 2 would stop it at epoch 6
    stopped, holds = run_history([0.0, 0.0005, 0.0, 0.001, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert stopped is None
    assert holds and all("below 0.01" in reason and "nothing measurable" in reason for _, reason in holds)


def test_no_stop_before_the_stated_share_of_the_plan():
    # learnt something (0.2 > 0.01) by epoch 1, then flat: patience 2 asks at epoch 3, the plan's half is epoch 10
    history = [0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    stopped, holds = run_history(history, planned=20)
    assert stopped == 10  # epoch 10 of 20 done: half the plan, patience long exceeded
    assert [epoch + 1 for epoch, _ in holds] == [3, 4, 5, 6, 7, 8, 9]
    assert "3 of 20 planned epochs" in holds[0][1]


def test_stops_as_keras_does_once_both_rules_are_met():
    stopped, holds = run_history([0.05, 0.2, 0.1, 0.1, 0.1], planned=4)
    assert (stopped, holds) == (4, [])  # best 0.2 at epoch 2, two evaluations without improvement


def test_epochs_without_evaluation_and_a_budget_stop_are_left_alone():
    stopped, holds = run_history([None, None, 0.0, None], planned=100)
    assert (stopped, holds) == (None, [])
    stopped, holds = run_history([0.0, 0.0, 0.0, 0.0], planned=100, budget_stops_at=3)
    assert stopped == 4  # the budget's stop is not held back, even with nothing learnt


# ------------------------------------------------------------------ small data, recipe
def test_set_wins_over_the_conditional_sections():
    from kdet.config import load_recipe

    recipe = load_recipe(str(REPO / "recipes" / "ssd_custom_race.py"), ["loss.assigner=max_iou", "model.width_multiplier=0.25"])
    assert "assigner" not in recipe["small_data"]["loss"] and "width_multiplier" not in recipe["small_data"]["model"]
    assert recipe["small_data"]["loss"]["cls_loss"] == "softmax"  # what was not --set stays
    assert "width_multiplier" not in recipe["pretrained"]["model"]


def test_small_data_settings_apply_only_to_small_training_sets(capsys):
    from kdet.config import load_recipe
    from kdet.engine import resolve_small_data

    recipe = load_recipe(str(REPO / "recipes" / "ssd_custom_race.py"))
    small = resolve_small_data(recipe, 10)
    assert (small["model"]["backbone"], small["loss"]["assigner"], small["loss"]["cls_loss"]) == (
        "vgg16_bn", "atss", "softmax")
    assert "10 training images <= 50" in capsys.readouterr().out
    large = resolve_small_data(recipe, 51)
    assert (large["model"]["backbone"], large["loss"]["assigner"], large["loss"]["cls_loss"]) == (
        "cspdarknet_tiny_fpn", "tal", "quality_bce")
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------ zero-size boxes
def write_labels(root, lines_per_image):
    from PIL import Image

    images = root / "images"
    labels = root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for k, lines in enumerate(lines_per_image):
        Image.new("RGB", (100, 100), (90, 90, 90)).save(images / f"{k}.jpg")
        (labels / f"{k}.txt").write_text("\n".join(lines) + "\n")
    return images


def test_an_isolated_zero_size_box_is_dropped_with_a_counted_warning(tmp_path):
    good = ["0 0.5 0.5 0.2 0.2"] * 50
    images = write_labels(tmp_path, [good, good[:49] + ["0 0.3 0.3 0 0"]])  # 1 of 100 boxes
    source = YOLOSource(images, ["cat"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = source.records()
    assert sum(len(r.boxes) for r in records) == 99
    message = " ".join(str(w.message) for w in caught)
    assert "dropped 1 zero-size box of 100" in message and "1.txt:50" in message
    assert "--set data.skip_invalid=True" in message


def test_many_zero_size_boxes_are_systematic_and_stop_with_the_way_out(tmp_path):
    images = write_labels(tmp_path, [["0 0.5 0.5 0.2 0.2"] * 18 + ["0 0.3 0.3 0 0"] * 2])  # 10%
    with pytest.raises(DatasetError, match=r"0\.txt:19: zero or negative box size .* and 1 more: 2 of 20 boxes "
                                           r"\(10\.0%\) .*--set data\.skip_invalid=True"):
        YOLOSource(images, ["cat"]).records()
    assert sum(len(r.boxes) for r in YOLOSource(images, ["cat"], skip_invalid=True).records()) == 18


def test_other_bad_boxes_still_stop_at_the_first_one(tmp_path):
    images = write_labels(tmp_path, [["0 0.5 0.5 0.2 0.2"] * 200 + ["3 0.5 0.5 0.2 0.2"]])
    with pytest.raises(DatasetError, match=r"0\.txt:201: class id 3"):
        YOLOSource(images, ["cat"]).records()


# ------------------------------------------------------------------ swapped split names
def write_split_folders(root, counts):
    from PIL import Image

    for folder, count in counts.items():
        (root / folder / "images").mkdir(parents=True)
        (root / folder / "labels").mkdir()
        for k in range(count):
            Image.new("RGB", (20, 20)).save(root / folder / "images" / f"{folder}{k}.jpg")


def test_another_machines_swapped_split_names_give_way_to_the_folders_names(tmp_path, capsys):
    write_split_folders(tmp_path, dict(train=5, valid=3, test=2))
    (tmp_path / "data.yaml").write_text("train: /content/drive/Lp/test/images\nval: /content/drive/Lp/train/images\n"
                                        "test: /content/drive/Lp/valid/images\nnames: [plate]\n")
    _, splits, _ = read_data_yaml(tmp_path / "data.yaml")
    assert {k: len(v) for k, v in splits.items()} == dict(train=5, val=3, test=2)
    out = capsys.readouterr().out
    assert "train: /content/drive/Lp/test/images names a 'test' folder" in out and "train/images" in out


def test_a_mapping_valid_on_this_machine_is_the_users_choice(tmp_path, capsys):
    write_split_folders(tmp_path, dict(train=5, valid=3, test=2))
    (tmp_path / "data.yaml").write_text("train: test/images\nval: valid/images\nnames: [plate]\n")
    _, splits, _ = read_data_yaml(tmp_path / "data.yaml")
    assert {k: len(v) for k, v in splits.items()} == dict(train=2, val=3)
    assert "swapped" not in capsys.readouterr().out


# ------------------------------------------------------------------ the report of a run that learnt nothing
ZERO_TABLE = {n: dict(AP50=0.0, instances=5) for n in ("fish", "penguin")}
ZERO_TABLE["all"] = dict(AP50=0.0, instances=10)


def test_learnt_nothing_ranks_the_runs_own_evidence_and_names_one_fix():
    run = dict(planned_steps=4000, steps_done=2400, stopped_by="early stopping after epoch 14", learning_rate=5e-3,
               backbone="vgg16_bn", width_multiplier=0.125)
    log = {"loss": [12.0, 11.5, 11.2]}
    preflight = {"match_iou": 0.3, "anchor_coverage": {"overall": {"covered": 0.45}},
                 "auto_anchor_coverage": {"overall": {"covered": 0.55}}}
    sizes = np.array([4.0, 6.0, 9.0, 12.0])
    text = run_report.finding_learnt_nothing(ZERO_TABLE, ["fish", "penguin"], run, log, preflight, sizes, 300)
    assert text.startswith("Nothing learnt: held-out AP50 is under 0.05 for every class")
    # ranked: the loss that did not fall, tiny objects, anchors, width; steps (58% of plan, > 1000) last
    order = [text.index(s) for s in ("the training loss barely fell (12.000 -> 11.200 at learning rate 0.005)",
                                     "median object size at the input 7.5 px (50% under 8 px)",
                                     "55% of the training objects have an anchor at the matching IoU 0.3",
                                     "model vgg16_bn at width 0.125 (small)",
                                     "2400 of 4000 planned optimizer steps (60%), stopped by early stopping")]
    assert order == sorted(order)
    assert text.endswith("Change first: the learning rate: try train.learning_rate=0.015 and 0.0017.")


def test_learnt_nothing_stands_alone_among_the_findings():
    confusion = np.zeros((3, 3), int)
    found = run_report.findings(ZERO_TABLE, ["fish", "penguin"], confusion, np.array([20.0]), np.array([False]),
                                np.array([0]), None, 300, 0.01, train_ap50=0.0,
                                log={"loss": [3.0, 2.0, 1.0, 0.5], "val_AP": [0.001, 0.0, 0.0, 0.0]},
                                run=dict(planned_steps=100, steps_done=1, stopped_by="the plan's last epoch"))
    assert len(found) == 1 and found[0].startswith("Nothing learnt")
    assert "Change first: let the run use its plan" in found[0]


def test_fit_findings_never_contradict_or_repeat():
    log = {"val_AP": [0.2, 0.3, 0.1], "loss": [3.0, 2.0, 1.0]}
    underfit = run_report.finding_fit(0.3, 0.25, log)
    assert len(underfit) == 1 and underfit[0].startswith("Underfitting")
    overfit = run_report.finding_fit(0.9, 0.3, log)
    assert len(overfit) == 1 and overfit[0].startswith("Overfitting") and "; and val_AP peaked at 0.300" in overfit[0]


def test_one_step_run_reports_that_it_learnt_nothing(tmp_path):
    """A fresh tools/train.py process, one optimizer step on a generated set: the report's first and only finding."""
    generate_tiny_dataset(tmp_path / "data", num_train=16, num_test=12, num_val=8, image_size=96, max_size=40)
    work = tmp_path / "work"
    done = run_tool("train", REPO / "recipes" / "ssd_custom.py", "--work-dir", work,
                    "--set", f"data.root={tmp_path / 'data'}", "--set", "model.image_size=64",
                    "--set", "model.backbone_weights=None", "--set", "train.epochs=1",
                    "--set", "data.min_images_per_epoch=0", "--set", "data.batch_size=16",
                    "--set", "eval.report_train_images=0", "--set", "verbose=0")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    assert len(report["findings"]) == 1
    finding = report["findings"][0]
    assert finding.startswith("Nothing learnt") and "(1) 1 of 1 planned optimizer steps (100%), stopped by the plan's last epoch" in finding
    assert "Weakest class" not in finding and "Change first: train longer" in finding


# ------------------------------------------------------------------ the suite
def test_mean_ranks_share_places_on_ties():
    rows = [[dict(system="a", AP=0.5), dict(system="b", AP=0.4)],
            [dict(system="a", AP=0.3), dict(system="b", AP=0.3)]]
    assert suite.mean_ranks(rows, ["a", "b"]) == {"a": 1.25, "b": 1.75}


def test_licence_comes_from_the_datasets_own_files(tmp_path):
    (tmp_path / "d1").mkdir()
    (tmp_path / "d1" / "data.yaml").write_text("names: [a]\nroboflow:\n  license: CC BY 4.0\n")
    (tmp_path / "d2").mkdir()
    (tmp_path / "d2" / "LICENSE").write_text("\nMIT License\n\nCopyright ...\n")
    (tmp_path / "d3").mkdir()
    assert [suite.dataset_licence(str(tmp_path / d)) for d in ("d1", "d2", "d3")] == [
        "CC BY 4.0", "MIT License", "unknown (see the dataset's files)"]


def test_suite_smoke_two_datasets_scored_by_pycocotools(tmp_path):
    """CI's smoke of tools/benchmark_suite.py: two generated datasets, one short epoch each, the table and
    every row's AP equal to pycocotools on the written files (and to kdet's own evaluator)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    for name, seed in (("alpha", 0), ("beta", 1)):
        generate_tiny_dataset(tmp_path / name, num_train=16, num_test=10, num_val=6, image_size=96, max_size=40, seed=seed)
    out = tmp_path / "suite"
    done = run_tool("benchmark_suite", "--datasets", tmp_path / "alpha", tmp_path / "beta", "--budget", "0.05",
                    "--systems", "kdet,yolov8n", "--out", out, "--set", "model.image_size=64",
                    "--set", "model.backbone_weights=None", "--set", "verbose=0", "--set", "data.min_images_per_epoch=0")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "YOLOv8n is not run" in done.stdout or "YOLOv8n" in done.stdout
    table = (out / "suite.md").read_text()
    assert "| alpha (unknown (see the dataset's files)) | 10 | kdet ssd_custom |" in table
    assert "Over 2 datasets every system finished" in table
    for name in ("alpha", "beta"):
        entry = json.loads((out / f"{name}.json").read_text())
        row = next(r for r in entry["rows"] if r["system"] == "kdet ssd_custom")
        gt = COCO(str(out / name / "ground_truth.json"))
        kdet_dir = out / name / "kdet"
        names = {i["id"]: os.path.basename(i["file_name"])
                 for i in json.loads((kdet_dir / "ground_truth.json").read_text())["images"]}
        ids = {i["file_name"]: i["id"] for i in gt.dataset["images"]}
        results = [dict(r, image_id=ids[names[r["image_id"]]]) for r in json.loads((kdet_dir / "test_detections.json").read_text())]
        evaluator = COCOeval(gt, gt.loadRes(results) if results else COCO(), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
        assert row["AP"] == pytest.approx(evaluator.stats[0], abs=1e-12)
        assert row["AP50"] == pytest.approx(evaluator.stats[1], abs=1e-12)
        metrics = json.loads((kdet_dir / "metrics.json").read_text())
        assert row["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
