"""Recipes, overrides, the train tool's error lines, and end-to-end runs checked against independent truth:
a fixed detector (known boxes) for the metrics, in-process resume, a trained tiny model for export and infer."""

import copy
import csv
import json
import os

import numpy as np
import pytest

from _helpers import REPO, run_tool, write_tiny_recipe
from kdet.config import RecipeError, apply_override, load_recipe, merge
from kdet.data.records import Record

_write_recipe = write_tiny_recipe


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


SHIPPED = ("ssd_shapes", "ssd300_voc", "ssd300_bccd", "ssd300_fpn_voc", "ssd_fpn_bccd", "ssd_bccd_scratch",
           "ssd_bccd_race")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_build_their_model_and_sources(name, tmp_path, monkeypatch, request):
    """Each shipped recipe loads, builds its model (offline: backbone weights None) and, where its data
    is here, its sources (BCCD: required in CI; VOC and TFDS are downloads, never present offline)."""
    import kdet.engine as engine

    monkeypatch.setenv("KDET_CACHE", str(tmp_path))
    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
    overrides = ["train.epochs=2", "model.backbone_weights=None"]
    if "bccd" in name:
        overrides.append(f"data.root={request.getfixturevalue('bccd')}")
    recipe = load_recipe(os.path.join(recipes, name + ".py"), overrides)
    assert recipe["train"]["epochs"] == 2 and recipe["name"] == name
    assert {"model", "data", "loss", "train", "eval"} <= set(recipe)
    names = recipe["data"].get("class_names")
    model = engine.build_model(recipe, names or ["a"] * 20)
    size = recipe["model"]["image_size"]
    assert model.input_shape[1:3] == ((size, size) if isinstance(size, int) else tuple(size))
    assert model.output_shape[-1] == 4 + 1 + len(names or ["a"] * 20) + 4
    if "voc" in name:
        pytest.skip("the VOC recipes' data (PASCAL VOC / TFDS) is a download: model built, sources not")
    if name == "ssd_shapes":  # generating the full synthetic set takes long: a small one proves the source
        from kdet.data.sources import shapes

        recipe["data"].update(train=shapes(str(tmp_path / "s"), "train", num_train=4, num_test=0, image_size=96),
                              val=None, test=None)
    sources = engine.load_sources(recipe)
    records = engine.load_records(sources)
    assert records["train"] and engine.class_names_of(recipe, sources) == list(names)
    for split, recs in records.items():
        if recs:
            assert max(int(r.classes.max(initial=-1)) for r in recs) < len(names), split


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




def read_log(work_dir):
    with open(os.path.join(work_dir, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ a fixed detector
class RecordsSource:
    """A data source over records in memory (a recipe accepts any object with records() and class_names)."""

    name = "in-memory records"

    def __init__(self, records, class_names):
        self._records, self.class_names = records, list(class_names)

    def records(self):
        return self._records

    def __len__(self):
        return len(self._records)


FIXED_CLASSES = ["a", "b", "c"]
FIXED_W, FIXED_H = 80, 60  # not the model's 64 x 64: detections must be scaled back to these pixels


def fixed_scene():
    """Eight flat images (image i filled with 20 (i + 1), which identifies it after resizing), their
    objects (pixel xyxy; some difficult) and the detector's known outputs (pixel xyxy, score, class)."""
    rng = np.random.default_rng(0)
    records, known = [], []
    for i in range(8):
        boxes, classes, difficult, dets = [], [], [], []
        for k in range(3):
            x, y = rng.uniform(0, 40), rng.uniform(0, 25)
            w, h = rng.uniform(12, 38), rng.uniform(10, 32)
            b = [x, y, min(x + w, FIXED_W), min(y + h, FIXED_H)]
            boxes.append(b), classes.append(int(rng.integers(3))), difficult.append(k == 2 and i % 2 == 0)
            jitter = rng.normal(0, 2.0, 4) if rng.random() < 0.7 else rng.normal(0, 8.0, 4)
            found = np.clip(np.array(b) + jitter, 0, [FIXED_W, FIXED_H] * 2)
            found = np.r_[np.minimum(found[:2], found[2:]), np.maximum(found[:2], found[2:])]  # a valid box
            label = classes[-1] if rng.random() < 0.85 else (classes[-1] + 1) % 3
            # difficult objects are found first (score 0.99): whether they are ignored decides the AP
            dets.append((found, 0.99 - 0.001 * i if difficult[-1] else float(rng.uniform(0.2, 0.95)), label))
        dets.append((np.array([50, 30, 70, 55.0]), float(rng.uniform(0.3, 0.9)), int(rng.integers(3))))  # a miss
        image = np.full((FIXED_H, FIXED_W, 3), 20 * (i + 1), np.uint8)
        records.append(Record(image_id=f"im{i}", image_path=None, width=FIXED_W, height=FIXED_H, boxes=boxes,
                              classes=classes, difficult=difficult, image=image))
        known.append(dets)
    return records, known


def patch_detect(monkeypatch, known):
    """``SSD.detect`` returns the known detections of whichever image it is given (normalised xyxy)."""
    import tensorflow as tf

    from kdet.models.ssd import SSD

    scale = np.array([FIXED_W, FIXED_H] * 2, np.float32)
    boxes = tf.constant(np.stack([[d[0] / scale for d in dets] for dets in known]).astype(np.float32))
    scores = tf.constant([[d[1] for d in dets] for dets in known], tf.float32)
    classes = tf.constant([[d[2] for d in dets] for dets in known], tf.int32)

    def detect(self, images, **settings):
        index = tf.cast(tf.round(tf.cast(images[:, 0, 0, 0], tf.float32) / 20.0) - 1, tf.int32)
        count = tf.fill(tf.shape(index), scores.shape[1])
        return dict(boxes=tf.gather(boxes, index), scores=tf.gather(scores, index),
                    classes=tf.gather(classes, index), num_detections=count)

    monkeypatch.setattr(SSD, "detect", detect)


def fixed_recipe(records, **train):
    import runpy

    source = RecordsSource(records, FIXED_CLASSES)
    base = runpy.run_path(str(REPO / "recipes" / "_base_ssd.py"))["recipe"]
    return merge(base, dict(
        model=dict(image_size=64, width_multiplier=0.125, backbone_weights=None),
        data=dict(class_names=FIXED_CLASSES, train=source, val=source, test=source, augment=None,
                  batch_size=8, eval_batch_size=4, max_boxes=4),
        train=dict(dict(epochs=1, optimizer="adamw", learning_rate=1e-3, warmup_epochs=0, lr_schedule="cosine",
                        seed=0), **train),
        eval=dict(every_n_epochs=1, max_detections=20), verbose=0))


def independent_ground_truth(records):
    """COCO GT written here, not by kdet: images numbered 1..N in order (VOC-style string ids),
    category = class + 1, difficult objects as crowd regions (pycocotools' only way to ignore one)."""
    images, annotations = [], []
    for n, record in enumerate(records, start=1):
        images.append(dict(id=n, width=record.width, height=record.height))
        for box, cls, hard in zip(record.boxes.tolist(), record.classes.tolist(), record.difficult.tolist()):
            x0, y0, x1, y1 = box
            annotations.append(dict(id=len(annotations) + 1, image_id=n, category_id=cls + 1,
                                    bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0),
                                    iscrowd=int(hard)))
    return dict(images=images, annotations=annotations,
                categories=[dict(id=k + 1, name=n) for k, n in enumerate(FIXED_CLASSES)])


def expected_results(known):
    return [dict(image_id=n, category_id=cls + 1, bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], score=score)
            for n, dets in enumerate(known, start=1) for b, score, cls in dets]


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    import kdet.engine as engine

    monkeypatch = pytest.MonkeyPatch()
    records, known = fixed_scene()
    patch_detect(monkeypatch, known)
    work_dir = str(tmp_path_factory.mktemp("fixed") / "work")
    try:
        metrics = engine.train(fixed_recipe(records), work_dir)
    finally:
        monkeypatch.undo()
    return records, known, work_dir, metrics


def test_written_detections_and_metrics_equal_independent_truth(fixed_run):
    from test_coco_eval import pycocotools_eval
    from test_voc_metrics import classic_voc_eval

    records, known, work_dir, metrics = fixed_run
    for name in ("last.keras", "log.csv", "metrics.json", "state.json", "saved_model/saved_model.pb"):
        assert os.path.exists(os.path.join(work_dir, name)), name
    written = json.load(open(os.path.join(work_dir, "test_detections.json")))
    expected = expected_results(known)
    key = lambda d: (d["image_id"], -d["score"])  # noqa: E731
    assert [(d["image_id"], d["category_id"]) for d in sorted(written, key=key)] == \
        [(d["image_id"], d["category_id"]) for d in sorted(expected, key=key)]
    np.testing.assert_allclose([d["bbox"] for d in sorted(written, key=key)],
                               [d["bbox"] for d in sorted(expected, key=key)], atol=1e-3)
    np.testing.assert_allclose([d["score"] for d in sorted(written, key=key)],
                               [d["score"] for d in sorted(expected, key=key)], atol=1e-6)

    gt = independent_ground_truth(records)
    ref, _ = pycocotools_eval(gt, written)
    saved = json.load(open(os.path.join(work_dir, "metrics.json")))
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert saved[name] == pytest.approx(ref[name], abs=1e-9), name
        assert metrics[name] == saved[name]
    assert 0.2 < ref["AP50"] < 0.95  # a mixed result: neither all wrong nor all right
    # the difficult objects matter: scored as ordinary objects the (top-scored) detections on them count
    plain = copy.deepcopy(gt)
    for ann in plain["annotations"]:
        ann["iscrowd"] = 0
    assert abs(pycocotools_eval(plain, written)[0]["AP"] - ref["AP"]) > 0.01

    gts = [dict(boxes=r.boxes, classes=r.classes, difficult=r.difficult) for r in records]
    dets = [dict(boxes=np.array([d[0] for d in ds]), scores=np.array([d[1] for d in ds]),
                 classes=np.array([d[2] for d in ds])) for ds in known]
    voc = [classic_voc_eval(gts, dets, c, 0.5, False) for c in range(3)]
    assert saved["VOC_mAP50"] == pytest.approx(float(np.mean(voc)), abs=1e-6)


def test_callback_val_ap_equals_final_coco_evaluate(fixed_run):
    # val and test are the same records; the callback (device engine, on the eval batches) ran after
    # the last epoch, the final evaluation went through predict_records and pycocotools.
    records, _, work_dir, metrics = fixed_run
    assert any(r.difficult.any() for r in records)
    logged = read_log(work_dir)[-1]
    assert metrics["AP"] > 0.1
    for name in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):  # not the area ranges: the callback
        assert float(logged["val_" + name]) == pytest.approx(metrics[name], abs=1e-6), name  # measures areas in input pixels


# ------------------------------------------------------------------ resume (in process)
def tiny_train_records():
    rng = np.random.default_rng(1)
    records = []
    for i in range(8):
        image = rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)
        x, y = rng.uniform(0, 30, 2)
        records.append(Record(image_id=i, image_path=None, width=56, height=48, boxes=[[x, y, x + 20, y + 16]],
                              classes=[i % 3], image=image))
    return records


def resume_recipe(epochs):
    from kdet.data.augment import hflip, resize

    recipe = fixed_recipe(tiny_train_records(), epochs=epochs)
    recipe["data"].update(val=None, test=None, augment=[hflip(), resize()], batch_size=4)
    return recipe


class FitSnapshots:
    """Wraps ``keras.Model.fit``: the model's weights and optimizer variables at its start and end."""

    def __init__(self, monkeypatch):
        import keras

        self.runs = []
        self.stop_after_epochs = None  # set: the next fit ends after that many epochs, as if killed
        original = keras.Model.fit

        def fit(model, *args, **kwargs):
            if self.stop_after_epochs is not None:
                kwargs["epochs"], self.stop_after_epochs = self.stop_after_epochs, None
            run = {"start": self.snapshot(model)}
            self.runs.append(run)
            history = original(model, *args, **kwargs)
            run["end"] = self.snapshot(model)
            return history

        monkeypatch.setattr(keras.Model, "fit", fit)

    @staticmethod
    def snapshot(model):
        return dict(weights={w.path: np.array(w.numpy()) for w in model.weights},
                    optimizer={v.path: np.array(v.numpy()) for v in model.optimizer.variables},
                    iterations=int(model.optimizer.iterations.numpy()),
                    learning_rate=float(model.optimizer.learning_rate.numpy()))


def test_resume_restores_weights_and_optimizer_state_and_continues_as_one_run(tmp_path, monkeypatch):
    import kdet.engine as engine

    snapshots = FitSnapshots(monkeypatch)
    monkeypatch.setattr(engine, "finish", lambda *args, **kwargs: {})  # no test split; the SavedModel export is not at stake
    split = str(tmp_path / "split")
    snapshots.stop_after_epochs = 1  # a 2-epoch run (its cosine schedule spans 2 epochs) stopped after one
    engine.train(resume_recipe(2), split)
    engine.train(resume_recipe(2), split, resume=True)
    engine.train(resume_recipe(2), str(tmp_path / "straight"))
    first, resumed, straight = snapshots.runs

    saved, loaded = first["end"], resumed["start"]
    assert saved["iterations"] == 2 and loaded["iterations"] == 2  # 8 images, batch 4: the LR schedule's position
    assert loaded["learning_rate"] == saved["learning_rate"]
    assert saved["weights"].keys() == loaded["weights"].keys()
    for path, value in saved["weights"].items():
        np.testing.assert_array_equal(loaded["weights"][path], value, err_msg=path)
    moments = [p for p in saved["optimizer"] if "momentum" in p or "velocity" in p]  # AdamW's m and v
    assert sum(np.any(saved["optimizer"][p] != 0) for p in moments) >= 20  # they moved (not all: some get no gradient)
    assert saved["optimizer"].keys() == loaded["optimizer"].keys()
    for path, value in saved["optimizer"].items():  # every optimizer variable: moments, iterations, ...
        np.testing.assert_array_equal(loaded["optimizer"][path], value, err_msg=path)

    # Seeded: one epoch plus a resumed one equals two straight epochs (same data order, augmentation,
    # learning rates and optimizer state). Tolerance: float32 rounding of the CPU kernels only.
    assert resumed["end"]["iterations"] == straight["end"]["iterations"] == 4
    state = json.load(open(os.path.join(split, "state.json")))
    assert state["epochs_done"] == 2
    assert [row["epoch"] for row in read_log(split)] == ["0", "1"]
    worst = max(float(np.abs(resumed["end"]["weights"][p] - v).max()) for p, v in straight["end"]["weights"].items())
    # A repeated or skipped pass (data order, augmentation) or learning rate moves weights by about one AdamW
    # step (measured 1e-3); the reloaded model's recompiled step rounds differently (measured 7.6e-6).
    assert worst <= 1e-4, f"1 + 1 resumed epochs differ from 2 straight by up to {worst:.2g} in a weight"


# ------------------------------------------------------------------ FPN and gradual unfreezing
def test_fpn_recipe_trains_with_gradual_unfreezing(tmp_path, capsys):
    """Also runs the recipe keys for rare-class oversampling and the matching's ignore band."""
    import kdet.engine as engine

    recipe = load_recipe(_write_recipe(tmp_path), [
        "model.backbone=mobilenetv2_fpn", "model.width_multiplier=0.35", "model.fpn_channels=32",
        "model.image_size=72", "train.epochs=3", "train.unfreeze_schedule={0: 0, 1: 2, 2: 'all'}",
        "data.val=None", "data.test=None", "data.repeat_factor_threshold=0.9",
        "loss.negative_iou_threshold=0.4"])
    work_dir = str(tmp_path / "fpn")
    engine.train(recipe, work_dir)
    assert "repeat-factor sampling (threshold 0.9): 24 -> " in capsys.readouterr().out
    stages = [float(row["trainable_stages"]) for row in read_log(work_dir)]
    assert stages == [0, 2, 5]  # frozen, the top 2, then all 5 MobileNetV2 stages
    assert os.path.exists(os.path.join(work_dir, "saved_model", "saved_model.pb"))


# ------------------------------------------------------------------ a trained tiny model
def test_fresh_process_loads_a_trained_model_with_import_kdet(tiny_trained):
    import subprocess
    import sys

    script = ("import kdet; m = kdet.load_model(%r); "
              "print(type(m).__name__, type(m.loss).__name__, int(m.optimizer.iterations.numpy()) > 0)"
              % os.path.join(tiny_trained["work_dir"], "last.keras"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "SSD MultiBoxLoss True"


def test_export_and_infer_tools_give_the_saved_models_detections(tiny_trained, tmp_path):
    import tensorflow as tf
    from PIL import Image

    work_dir, recipe_path = tiny_trained["work_dir"], tiny_trained["recipe_path"]
    out = tmp_path / "exported"
    done = run_tool("export", os.path.join(work_dir, "last.keras"), out, "--recipe", recipe_path)
    assert done.returncode == 0, done.stderr[-2000:]
    records = load_recipe(recipe_path)["data"]["test"].records()[:3]
    images = tmp_path / "images"
    images.mkdir()
    for r in records:
        os.symlink(r.image_path, images / os.path.basename(r.image_path))
    drawn = tmp_path / "drawn"
    done = run_tool("infer", out, images, "--out", drawn, "--score-threshold", "0.3")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.load(open(drawn / "detections.json"))
    assert sorted(os.listdir(drawn)) == sorted([os.path.splitext(os.path.basename(r.image_path))[0] + ".png"
                                                for r in records] + ["detections.json"])

    served = tf.saved_model.load(str(out))
    names = [n.decode() for n in served.class_names.numpy()]
    total = outlined = 0
    for r in records:
        image = np.asarray(Image.open(r.image_path).convert("RGB"))
        o = {k: v.numpy()[0] for k, v in served.signatures["serving_default"](images=tf.constant(image[None])).items()}
        keep = o["detection_scores"][: int(o["num_detections"])] >= 0.3
        got = results[os.path.basename(r.image_path)]
        assert len(got) == int(keep.sum())
        np.testing.assert_allclose([d["box_yxyx"] for d in got], o["detection_boxes"][:len(keep)][keep].reshape(-1, 4),
                                   atol=1e-6)
        np.testing.assert_allclose([d["score"] for d in got], o["detection_scores"][:len(keep)][keep], atol=1e-6)
        assert [d["label"] for d in got] == [names[int(c) - 1] for c in o["detection_classes"][:len(keep)][keep]]
        drawn_image = np.asarray(Image.open(drawn / (os.path.splitext(os.path.basename(r.image_path))[0] + ".png")))
        height, width = image.shape[:2]
        for d in got:  # a box's outline (red) crosses the middle of its left edge, in the image's pixels
            y1, x1, y2, x2 = d["box_yxyx"]
            x, y = int(x1 * width), int((y1 + y2) / 2 * height)
            near = drawn_image[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].reshape(-1, 3)
            outlined += bool(((near == (255, 40, 40)).all(axis=1)).any())
        total += len(got)
    assert total > 0
    # other boxes' yellow labels cover some outlines (measured: 51 of 60 boxes found; unscaled drawing: none)
    assert outlined >= 0.7 * total, f"{outlined} of {total} boxes drawn where detections.json puts them"
    done = run_tool("export", os.path.join(work_dir, "last.keras"), out, "--classes", "a,b")
    assert done.returncode == 2 and "\n" not in done.stderr.strip()
