#!/usr/bin/env python
"""Race kdet against Ultralytics' YOLOv8n: the same data, the same training-time budget, one ground truth.

    python tools/benchmark_race.py --budget 23 --ultralytics-python /work/venv-race/bin/python

1. **kdet** trains the recipe (default ``recipes/ssd_bccd_race.py``, kdet's best from-scratch BCCD
   recipe) in this process with ``--set train.time_budget=BUDGET`` (and ``eval.report_train_images=0``: the run report's
   train/held-out gap would only cost time after training), then writes its test split's
   ``ground_truth.json`` and ``test_detections.json`` (eval settings of the recipe).
2. **Ultralytics** (when ``--ultralytics-python`` names a Python with it installed; a separate venv,
   so that torch's numpy/protobuf never meet TensorFlow's) trains ``yolov8n.yaml`` from scratch
   (no pretrained weights), ``imgsz`` 320, its default hyper-parameters, ``time=BUDGET/60`` hours,
   on kdet's own records of the recipe's train split written out in YOLO layout (images linked,
   labels from kdet's boxes after its checks), validating on the recipe's val split as kdet does.
   Its ``last.pt`` (the last epoch's weights, as kdet's) then predicts the test images with
   ``conf=0.001``, its default NMS (IoU 0.7) and the same ``max_det`` as kdet's
   ``eval.max_detections`` (200 by default; COCO AP counts the top 100 of each image either way).
   It runs offline: ``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=0``, ``plots=False`` (no font download),
   a private ``YOLO_CONFIG_DIR`` with ``sync=False``; AMP checks only run on CUDA.
3. Both are scored by **pycocotools** against kdet's ``ground_truth.json``; the table gives AP,
   AP50, AP50 per class, epochs, training minutes (the budget clock of each: kdet's from ``fit``'s
   start, Ultralytics' ``results.csv`` time) and training images per second.

With ``--keras-cv``, keras-cv's ``YOLOV8Detector`` and ``RetinaNet`` race too, in this process after
kdet, one after the other, each for the same budget. Both stand on the YOLOv8n-sized backbone
(keras-cv's ``yolo_v8_xs_backbone`` architecture, built here: its presets are downloads), ``imgsz``
320, fed by kdet's input pipeline with flip + resize (keras-cv ships no training recipe of its own),
stopped by kdet's ``TimeBudget`` (no schedule to fit: a constant rate), predicting at confidence
0.001 with the same ``max_det``. ``YOLOV8Detector``: ``fpn_depth=1``, the keras-cv YOLOv8 guide's
set-up (Adam 1e-3, ``global_clipnorm=10``, CIoU box loss, binary cross-entropy classes), NMS IoU
0.7. ``RetinaNet``: its own FPN, heads and anchors, the keras-cv RetinaNet guide's set-up (SGD
0.005, momentum 0.9, ``global_clipnorm=10``, focal + smooth L1), NMS IoU 0.5.

``--max-train-images N`` trains both on the first N training images (a quick check of the set-up).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_RECIPE = os.path.join(REPO, "recipes", "ssd_bccd_race.py")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE)
    parser.add_argument("--budget", type=float, default=23.0, help="training minutes for each system")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more kdet recipe overrides")
    parser.add_argument("--work-dir", default=os.path.join("work_dirs", "race"))
    parser.add_argument("--ultralytics-python", default=None,
                        help="a Python with ultralytics installed (say /work/venv-race/bin/python); none: kdet only")
    parser.add_argument("--imgsz", type=int, default=320, help="Ultralytics' input size")
    parser.add_argument("--reuse-kdet", action="store_true", help="score WORK_DIR/kdet as it is (no kdet training)")
    parser.add_argument("--keras-cv", action="store_true", help="race keras-cv's YOLOV8Detector and RetinaNet too")
    parser.add_argument("--max-train-images", type=int, default=None, help="train both on the first N images")
    parser.add_argument("--peer", default=None, help=argparse.SUPPRESS)  # internal: the Ultralytics side
    return parser.parse_args(argv)


# ------------------------------------------------------------------ kdet
def kdet_recipe(args):
    from kdet.config import load_recipe

    overrides = [f"train.time_budget={args.budget}", "eval.report_train_images=0", *args.set]
    recipe = load_recipe(args.recipe, overrides)
    if args.max_train_images:
        recipe["data"]["train"] = FirstImages(recipe, "train", args.max_train_images)
    return recipe


class FirstImages:
    """The first ``count`` records of a recipe's split, as a data source."""

    name = "first images"

    def __init__(self, recipe, split, count):
        from kdet.config import resolve_source

        source = resolve_source(recipe["data"][split], recipe["data"].get("root"), recipe["data"])
        self.class_names = list(source.class_names)
        self._records = source.records()[:count]

    def records(self):
        return self._records


def run_kdet(recipe, work_dir):
    """Train, evaluate on the test split; returns the row's timing fields."""
    import kdet.engine as engine

    before = resource.getrusage(resource.RUSAGE_SELF)
    metrics = engine.train(recipe, work_dir)
    after = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.path.join(work_dir, "state.json")) as f:
        epochs = json.load(f)["epochs_done"]
    return dict(epochs=epochs, train_seconds=metrics["train_seconds"],
                cpu_seconds=round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1))


def kdet_timing(work_dir):
    """The row's timing fields of a finished kdet run (``--reuse-kdet``; its CPU time is not known)."""
    with open(os.path.join(work_dir, "state.json")) as f:
        epochs = json.load(f)["epochs_done"]
    with open(os.path.join(work_dir, "metrics.json")) as f:
        seconds = json.load(f)["train_seconds"]
    return dict(epochs=epochs, train_seconds=seconds, cpu_seconds=float("nan"))


def split_records(recipe, split):
    from kdet.config import resolve_source

    source = resolve_source(recipe["data"][split], recipe["data"].get("root"), recipe["data"])
    return source.records() if source is not None else None


# ------------------------------------------------------------------ Ultralytics (this process: data and scoring)
def write_yolo_dataset(folder, splits, class_names):
    """kdet's records in YOLO layout: ``images/SPLIT`` (links) and ``labels/SPLIT/*.txt``; returns data.yaml."""
    for split, records in splits.items():
        os.makedirs(os.path.join(folder, "images", split), exist_ok=True)
        os.makedirs(os.path.join(folder, "labels", split), exist_ok=True)
        for record in records:
            name = os.path.basename(record.image_path)
            os.symlink(os.path.abspath(record.image_path), os.path.join(folder, "images", split, name))
            with open(os.path.join(folder, "labels", split, os.path.splitext(name)[0] + ".txt"), "w") as f:
                f.write(yolo_label_lines(record))
    data_yaml = os.path.join(folder, "data.yaml")
    names = "".join(f"  {k}: {json.dumps(name)}\n" for k, name in enumerate(class_names))
    with open(data_yaml, "w") as f:
        f.write(f"path: {folder}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return data_yaml


def yolo_label_lines(record):
    """``class cx cy w h`` (normalised) per box; difficult/crowd boxes are left out (YOLO has no ignore flag)."""
    lines = []
    for (x0, y0, x1, y1), cls, ignore in zip(record.boxes.tolist(), record.classes.tolist(), record.ignore.tolist()):
        if ignore:
            continue
        w, h = record.width, record.height
        lines.append(f"{cls} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n")
    return "".join(lines)


def run_ultralytics(args, python, recipe, work_dir, max_det):
    """Train and predict in ``python`` (a subprocess); returns the row's fields and COCO results."""
    train = split_records(recipe, "train") if not args.max_train_images else recipe["data"]["train"].records()
    val = split_records(recipe, "val") or split_records(recipe, "test")
    return train_ultralytics(python, os.path.join(work_dir, "ultralytics"), train, val, split_records(recipe, "test"),
                             recipe["data"]["class_names"], args.imgsz, args.budget, max_det)


def train_ultralytics(python, folder, train, val, test, class_names, imgsz, budget_minutes, max_det):
    """YOLOv8n from its yaml on kdet's ``train`` records (validating on ``val``), for ``budget_minutes``,
    in ``python`` (its own venv); then its predictions on ``test``. Returns the peer's dict."""
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix="yolo-data-", dir=folder)
    data_yaml = write_yolo_dataset(data_dir, dict(train=train, val=val), class_names)
    job = dict(data=data_yaml, imgsz=imgsz, hours=budget_minutes / 60.0, project=folder, max_det=max_det,
               test_images=[os.path.abspath(r.image_path) for r in test], predictions=os.path.join(folder, "predictions.json"))
    config_dir = os.path.join(folder, "config")
    os.makedirs(config_dir, exist_ok=True)
    env = dict(os.environ, YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0", YOLO_CONFIG_DIR=config_dir, MPLBACKEND="Agg")
    env.pop("PYTHONPATH", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([python, os.path.abspath(__file__), "--peer", json.dumps(job)], env=env, cwd=folder)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"benchmark: the Ultralytics run failed (exit {done.returncode}); see its output above")
    with open(job["predictions"]) as f:
        peer = json.load(f)
    peer["cpu_seconds"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
    peer["train_images"] = len(train)
    return peer


def ultralytics_results(peer, ground_truth):
    """The peer's predictions (by file name) as COCO results with the ground truth's image and category ids."""
    image_ids = {image["file_name"]: image["id"] for image in ground_truth["images"]}
    category_ids = [c["id"] for c in sorted(ground_truth["categories"], key=lambda c: c["id"])]
    results = []
    for name, detections in peer["detections"].items():
        for (x0, y0, x1, y1), score, cls in zip(detections["boxes"], detections["scores"], detections["classes"]):
            results.append(dict(image_id=image_ids[name], category_id=category_ids[int(cls)],
                                bbox=[x0, y0, x1 - x0, y1 - y0], score=float(score)))
    return results


# ------------------------------------------------------------------ keras-cv (this process)
def keras_cv_backbone():
    """keras-cv's ``yolo_v8_xs_backbone`` architecture (YOLOv8n-sized), built here: its presets are downloads."""
    import keras_cv

    return keras_cv.models.YOLOV8Backbone(stackwise_channels=[32, 64, 128, 256], stackwise_depth=[1, 2, 2, 1],
                                          include_rescaling=True, activation="swish")


def keras_cv_yolov8(num_classes, max_det):
    """keras-cv's YOLOV8Detector as its guide trains it: Adam 1e-3, clipnorm 10, CIoU + binary cross-entropy."""
    import keras
    import keras_cv

    decoder = keras_cv.layers.NonMaxSuppression(bounding_box_format="xyxy", from_logits=False, iou_threshold=0.7,
                                                confidence_threshold=0.001, max_detections=max_det)
    model = keras_cv.models.YOLOV8Detector(num_classes=num_classes, bounding_box_format="xyxy",
                                           backbone=keras_cv_backbone(), fpn_depth=1, prediction_decoder=decoder)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3, global_clipnorm=10.0),
                  classification_loss="binary_crossentropy", box_loss="ciou")
    return model


def keras_cv_retinanet(num_classes, max_det):
    """keras-cv's RetinaNet (its FPN and 4-conv heads, 9 anchors a cell) on the same YOLOv8-xs backbone (its
    documented ResNet50 would run a few epochs in the budget), as the keras-cv RetinaNet guide trains it:
    SGD 0.005, momentum 0.9, clipnorm 10, focal + smooth L1."""
    import keras
    import keras_cv

    decoder = keras_cv.layers.MultiClassNonMaxSuppression(bounding_box_format="xyxy", from_logits=True,
                                                          iou_threshold=0.5, confidence_threshold=0.001,
                                                          max_detections=max_det)
    model = keras_cv.models.RetinaNet(num_classes=num_classes, bounding_box_format="xyxy",
                                      backbone=keras_cv_backbone(), prediction_decoder=decoder)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.005, momentum=0.9, global_clipnorm=10.0),
                  classification_loss="focal", box_loss="smoothl1")
    return model


KERAS_CV_DETECTORS = {"YOLOV8Detector": keras_cv_yolov8, "RetinaNet": keras_cv_retinanet}


def run_keras_cv(args, build, recipe, train, test, max_det, ground_truth):
    """Train a keras-cv detector (``build(num_classes, max_det)``) for the budget, predict the test split.

    Returns the row's fields and the COCO results."""
    import keras
    import numpy as np
    import tensorflow as tf

    from kdet.data.augment import hflip, resize
    from kdet.data.pipeline import make_dataset
    from kdet.training.time_budget import TimeBudget

    size, class_names = args.imgsz, recipe["data"]["class_names"]
    batch = recipe["data"]["batch_size"]

    def keras_cv_batch(images, targets):
        boxes = targets[..., :4] * float(size)  # normalised xyxy -> pixels of the input
        return tf.cast(images, tf.float32), dict(boxes=boxes, classes=targets[..., 4])

    # repeated: with steps_per_epoch, a finite dataset runs dry in every second epoch (an empty epoch)
    data = make_dataset(train, size, batch, augment=[hflip(), resize()], max_boxes=recipe["data"]["max_boxes"],
                        seed=0, cache_images=True).map(keras_cv_batch).repeat()
    steps = len(train) // batch
    keras.utils.set_random_seed(0)
    model = build(len(class_names), max_det)
    progbar = keras.callbacks.ProgbarLogger()
    budget = TimeBudget(args.budget, 100, steps, progbar=progbar)
    before = resource.getrusage(resource.RUSAGE_SELF)
    history = model.fit(data, epochs=budget.fit_epochs(0), steps_per_epoch=steps, callbacks=[budget, progbar],
                        verbose=2, shuffle=False)  # kdet's pipeline shuffles
    seconds = budget.elapsed()
    after = resource.getrusage(resource.RUSAGE_SELF)
    test_data = make_dataset(test, size, batch, training=False, max_boxes=recipe["data"]["max_boxes"], with_meta=True)
    image_ids = {image["file_name"]: image["id"] for image in ground_truth["images"]}
    results = []
    for images, _, meta in test_data:
        out = model.predict(tf.cast(images, tf.float32), verbose=0)
        scale = np.stack([meta["width"], meta["height"], meta["width"], meta["height"]], -1) / float(size)
        for row, index in enumerate(meta["index"].numpy()):
            image_id = image_ids[os.path.basename(test[index].image_path)]
            for k in range(int(out["num_detections"][row])):
                x0, y0, x1, y1 = (np.asarray(out["boxes"][row, k]) * scale[row]).tolist()
                results.append(dict(image_id=image_id, category_id=int(out["classes"][row, k]) + 1,
                                    bbox=[x0, y0, x1 - x0, y1 - y0], score=float(out["confidence"][row, k])))
    return dict(epochs=len(history.epoch), train_seconds=seconds, train_images=len(train),
                cpu_seconds=round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)), results


# ------------------------------------------------------------------ scoring and the table
def coco_scores(ground_truth, results):
    """pycocotools' AP, AP50 and AP50 per category (in the ground truth's category order)."""
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(results) if results else COCO()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"][0, :, :, 0, 2]  # IoU 0.5, all recalls, each category, all areas, 100 dets
    per_class = [float(np.mean(p[p > -1])) if (p > -1).any() else float("nan") for p in precision.T]
    return dict(AP=float(evaluator.stats[0]), AP50=float(evaluator.stats[1]), AP50_per_class=per_class)


def format_table(rows, class_names):
    head = (f"| system | AP | AP50 | AP50 {' / '.join(class_names)} | epochs | train minutes | images/s | CPU s (whole run) |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for row in rows:
        per_class = " / ".join(f"{v:.3f}" for v in row["AP50_per_class"])
        speed = row["epochs"] * row["train_images"] / max(row["train_seconds"], 1e-9)
        lines.append(f"| {row['system']} | {row['AP']:.3f} | {row['AP50']:.3f} | {per_class} | {row['epochs']} | "
                     f"{row['train_seconds'] / 60:.1f} | {speed:.1f} | {row['cpu_seconds']:.0f} |")
    return head + "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.peer:
        return peer_main(json.loads(args.peer))
    from kdet.defaults import nms_settings

    recipe = kdet_recipe(args)
    os.makedirs(args.work_dir, exist_ok=True)
    max_det = nms_settings(recipe.get("eval"))["max_detections"]
    kdet_dir = os.path.join(args.work_dir, "kdet")
    rows = []
    reused = " (reused: not trained now)" if args.reuse_kdet else ""
    print(f"== kdet: {os.path.relpath(args.recipe, REPO)}, train.time_budget={args.budget:g} min{reused}", flush=True)
    timing = run_kdet(recipe, kdet_dir) if not args.reuse_kdet else kdet_timing(kdet_dir)
    with open(os.path.join(kdet_dir, "ground_truth.json")) as f:
        ground_truth = json.load(f)
    with open(os.path.join(kdet_dir, "test_detections.json")) as f:
        kdet_results = json.load(f)
    train_images = len(recipe["data"]["train"].records()) if args.max_train_images else len(split_records(recipe, "train"))
    rows.append(dict(system=f"kdet {os.path.basename(args.recipe)}", train_images=train_images, **timing,
                     **coco_scores(ground_truth, kdet_results)))
    if args.ultralytics_python:
        print(f"== Ultralytics YOLOv8n (yolov8n.yaml, from scratch), imgsz {args.imgsz}, time={args.budget / 60:.4g} h",
              flush=True)
        peer = run_ultralytics(args, args.ultralytics_python, recipe, args.work_dir, max_det)
        rows.append(dict(system=f"Ultralytics {peer['version']} YOLOv8n {args.imgsz} px", epochs=peer["epochs"],
                         train_seconds=peer["train_seconds"], cpu_seconds=peer["cpu_seconds"],
                         train_images=peer["train_images"],
                         **coco_scores(ground_truth, ultralytics_results(peer, ground_truth))))
    else:
        print("note: no --ultralytics-python: Ultralytics not raced")
    if args.keras_cv:
        train = recipe["data"]["train"].records() if args.max_train_images else split_records(recipe, "train")
        test = split_records(recipe, "test")
        for name, build in KERAS_CV_DETECTORS.items():
            print(f"== keras-cv {name} (YOLOv8-xs backbone, from scratch), imgsz {args.imgsz}", flush=True)
            row, results = run_keras_cv(args, build, recipe, train, test, max_det, ground_truth)
            rows.append(dict(system=f"keras-cv {name} {args.imgsz} px", **row, **coco_scores(ground_truth, results)))
    names = [c["name"] for c in sorted(ground_truth["categories"], key=lambda c: c["id"])]
    table = format_table(rows, names)
    print(f"\nTest split: {len(ground_truth['images'])} images, pycocotools, at most {max_det} detections per image "
          f"(every system); budget {args.budget:g} min each; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n{table}")
    with open(os.path.join(args.work_dir, "race.json"), "w") as f:
        json.dump(dict(budget_minutes=args.budget, max_detections=max_det, rows=rows), f, indent=1)
    return 0


# ------------------------------------------------------------------ the Ultralytics side (its own venv)
def peer_main(job):
    """Runs in the Ultralytics venv (no kdet, no TensorFlow): train, then predict the test images."""
    import csv

    import ultralytics
    from ultralytics import YOLO
    from ultralytics.utils import SETTINGS

    SETTINGS.update(sync=False)  # no analytics events
    model = YOLO("yolov8n.yaml")  # the architecture only: no weights
    model.train(data=job["data"], imgsz=job["imgsz"], time=job["hours"], device="cpu", pretrained=False,
                plots=False, project=job["project"], name="train", exist_ok=True)
    run_dir = os.path.join(job["project"], "train")
    with open(os.path.join(run_dir, "results.csv")) as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    last = YOLO(os.path.join(run_dir, "weights", "last.pt"))
    detections = {}
    for result in last.predict(job["test_images"], imgsz=job["imgsz"], conf=0.001, max_det=job["max_det"],
                               device="cpu", stream=True, verbose=False):
        boxes = result.boxes
        detections[os.path.basename(result.path)] = dict(
            boxes=boxes.xyxy.tolist(), scores=boxes.conf.tolist(), classes=[int(c) for c in boxes.cls.tolist()])
    with open(job["predictions"], "w") as f:
        json.dump(dict(version=ultralytics.__version__, epochs=len(rows), train_seconds=float(rows[-1]["time"]),
                       detections=detections), f)
    return 0


if __name__ == "__main__":
    if "--peer" not in sys.argv:  # the Ultralytics side imports no kdet
        sys.path.insert(0, REPO)
    sys.exit(main())
