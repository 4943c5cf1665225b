"""Miniature datasets in the official on-disk layouts, and the checks of a finished training run.

* :func:`write_vocdevkit` - ``VOCdevkit/VOC2007`` (trainval + test) and ``VOCdevkit/VOC2012``
  (trainval) as the official tars extract them: ``Annotations/*.xml`` in the devkit's format
  (1-based inclusive corners, ``difficult``, ``pose``, ``truncated``), ``JPEGImages/*.jpg``,
  ``ImageSets/Main/{train,val,trainval,test}.txt`` and the per-class ``<class>_<set>.txt`` files.
* :func:`write_coco2017` - ``annotations/instances_{train,val}2017.json`` (all 80 categories with
  COCO's own, non-contiguous ids; polygon and crowd RLE segmentations; an image without objects)
  plus ``train2017/`` and ``val2017/``.
* :func:`run_train` - ``tools/train.py`` in a fresh process, small.
* :func:`check_run` - metrics.json, the run report and the SavedModel exist, and the AP in
  metrics.json is pycocotools' on the ground truth the test wrote itself (not kdet's conversion).

The truth each writer returns is the test's own: pixel ``xyxy`` boxes (the continuous corners of
docs/CONVENTIONS.md) from which both the files and the pycocotools ground truth are written.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from _helpers import REPO

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# the objects' colours: one per class used, so that a short training has something to learn
COLOURS = {"dog": (220, 60, 40), "person": (40, 200, 60), "car": (50, 80, 230), "cat": (230, 220, 40)}

# small-size training for the tests: a 64 px, width-0.125 model from scratch, one epoch of 24 steps (the
# miniature repeated to 96 images), AdamW 3e-3: enough for an AP above 0, so the comparison is not 0 == 0
SMALL = ["model.image_size=64", "model.width_multiplier=0.125", "model.backbone_weights=None", "train.epochs=1",
         "train.warmup_epochs=0", "train.optimizer=adamw", "train.learning_rate=3e-3", "data.batch_size=4",
         "data.eval_batch_size=4", "data.max_boxes=8", "data.min_images_per_epoch=96", "eval.max_detections=50",
         "eval.report_train_images=4", "verbose=0"]


def _image(path, size, objects, rng):
    """A JPEG of ``size`` (w, h): noise background, each object a filled rectangle in its class colour."""
    width, height = size
    pixels = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
    for (x0, y0, x1, y1), name in objects:
        pixels[int(y0):int(y1), int(x0):int(x1)] = COLOURS.get(name, (200, 200, 200))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def _objects(rng, width, height, names, count):
    """``count`` large boxes (integer pixel corners, 40-90% of each side)."""
    out = []
    for _ in range(count):
        w, h = int(rng.integers(int(0.4 * width), int(0.9 * width))), int(rng.integers(int(0.4 * height), int(0.9 * height)))
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        out.append(((x0, y0, x0 + w, y0 + h), str(rng.choice(names))))
    return out


# ------------------------------------------------------------------ VOCdevkit
def _voc_xml(year, filename, size, objects):
    """The devkit's XML: corners as 1-based inclusive pixel indices (xmin = x0 + 1, xmax = x1)."""
    body = "".join(
        f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>{int(difficult)}</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x0 + 1}</xmin>\n"
        f"\t\t\t<ymin>{y0 + 1}</ymin>\n\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for (x0, y0, x1, y1), name, difficult in objects)
    return (f"<annotation>\n\t<folder>VOC{year}</folder>\n\t<filename>{filename}</filename>\n"
            f"\t<source>\n\t\t<database>The VOC{year} Database</database>\n\t\t<annotation>PASCAL VOC{year}</annotation>\n"
            f"\t\t<image>flickr</image>\n\t</source>\n\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n"
            f"\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n{body}</annotation>\n")


def write_vocdevkit(root, per_set=(("2007", "trainval", 6), ("2012", "trainval", 6), ("2007", "test", 4)), seed=0):
    """A miniature ``root/VOCdevkit``; returns ``(devkit, truth)``, ``truth[(year, set)]`` = list of
    ``(image_id, (w, h), [(xyxy, class, difficult), ...])`` in ImageSets order."""
    rng = np.random.default_rng(seed)
    devkit = Path(root) / "VOCdevkit"
    truth, number = {}, 5
    sizes = [(96, 72), (80, 96), (112, 84)]
    names = list(COLOURS)
    for year, image_set, count in per_set:
        folder = devkit / f"VOC{year}"
        items = []
        for k in range(count):
            image_id = f"{number:06d}" if year == "2007" else f"{year}_{number:06d}"
            number += 3
            size = sizes[k % len(sizes)]
            objects = [(box, name, k % 3 == 1 and i == 1) for i, (box, name) in
                       enumerate(_objects(rng, *size, names, 1 + k % 2))]  # every third image: a difficult object
            _image(folder / "JPEGImages" / f"{image_id}.jpg", size, [(b, n) for b, n, _ in objects], rng)
            (folder / "Annotations").mkdir(parents=True, exist_ok=True)
            (folder / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(year, f"{image_id}.jpg", size, objects))
            items.append((image_id, size, objects))
        truth[(year, image_set)] = items
        main = folder / "ImageSets" / "Main"
        main.mkdir(parents=True, exist_ok=True)
        ids = [item[0] for item in items]
        splits = {image_set: ids} if image_set == "test" else {"train": ids[: len(ids) // 2],
                                                                 "val": ids[len(ids) // 2:], "trainval": ids}
        for split, split_ids in splits.items():
            (main / f"{split}.txt").write_text("".join(i + "\n" for i in split_ids))
            for name in VOC_CLASSES:  # the devkit's per-class lists: 1 present, -1 absent, 0 only difficult
                flags = []
                for image_id, _, objects in items:
                    if image_id in split_ids:
                        present = [d for _, n, d in objects if n == name]
                        flags.append(f"{image_id} {(-1 if not present else 0 if all(present) else 1):2d}\n")
                (main / f"{name}_{split}.txt").write_text("".join(flags))
    for year in ("2007", "2012"):  # the other folders the tars hold, empty here
        for extra in ("SegmentationClass", "SegmentationObject", "ImageSets/Segmentation", "ImageSets/Layout"):
            (devkit / f"VOC{year}" / extra).mkdir(parents=True, exist_ok=True)
    return devkit, truth


def voc_ground_truth(items):
    """pycocotools ground truth from the test's truth: images numbered 1..N in ImageSets order (kdet's
    ``coco_image_ids`` for string ids), category = VOC class index + 1, ``difficult`` as an ignored crowd
    (the pycocotools-VOC conversions' rule; pycocotools reads ``iscrowd``)."""
    images, annotations = [], []
    for number, (image_id, (w, h), objects) in enumerate(items, 1):
        images.append(dict(id=number, file_name=f"{image_id}.jpg", width=w, height=h))
        for (x0, y0, x1, y1), name, difficult in objects:
            annotations.append(dict(id=len(annotations) + 1, image_id=number, category_id=VOC_CLASSES.index(name) + 1,
                                    bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0),
                                    iscrowd=int(difficult)))
    categories = [dict(id=k + 1, name=n) for k, n in enumerate(VOC_CLASSES)]
    return dict(images=images, annotations=annotations, categories=categories)


# ------------------------------------------------------------------ COCO 2017
COCO_CATEGORIES = (  # (id, name, supercategory) of instances_*2017.json
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
    (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"), (16, "bird", "animal"),
    (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"), (20, "sheep", "animal"),
    (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
    (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"), (34, "frisbee", "sports"),
    (35, "skis", "sports"), (36, "snowboard", "sports"), (37, "sports ball", "sports"), (38, "kite", "sports"),
    (39, "baseball bat", "sports"), (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"), (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"),
    (54, "sandwich", "food"), (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"), (78, "microwave", "appliance"),
    (79, "oven", "appliance"), (80, "toaster", "appliance"), (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"), (84, "book", "indoor"), (85, "clock", "indoor"), (86, "vase", "indoor"),
    (87, "scissors", "indoor"), (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
)
_COCO_NAME_OF = {"dog": 18, "person": 1, "car": 3, "cat": 17}  # the colours' classes -> COCO category ids


def write_coco2017(root, counts=(("train2017", 10), ("val2017", 5)), seed=1):
    """A miniature COCO 2017 folder at ``root``; returns ``{split: instances dict}`` (what was written).

    Each split has one image without objects; val2017 has a crowd region (RLE) over one image's object.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    written, ann_id, image_id = {}, 900100, 139
    sizes = [(96, 72), (72, 96), (100, 80)]
    for split, count in counts:
        images, annotations = [], []
        for k in range(count):
            image_id += 146
            w, h = sizes[k % len(sizes)]
            objects = [] if k == count - 1 else _objects(rng, w, h, list(COLOURS), 1 + k % 2)
            _image(root / split / f"{image_id:012d}.jpg", (w, h), objects, rng)
            images.append(dict(license=1, file_name=f"{image_id:012d}.jpg", coco_url="", height=h, width=w,
                               date_captured="2013-11-14 17:02:52", flickr_url="", id=image_id))
            for (x0, y0, x1, y1), name in objects:
                ann_id += 1
                polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
                annotations.append(dict(segmentation=[[float(v) for v in polygon]],
                                        area=float((x1 - x0) * (y1 - y0)) - 0.5,  # COCO's area: the mask's, not the box's
                                        iscrowd=0, image_id=image_id, bbox=[float(x0), float(y0), float(x1 - x0),
                                                                            float(y1 - y0)],
                                        category_id=_COCO_NAME_OF[name], id=ann_id))
            if split == "val2017" and k == 0:  # a crowd region: pycocotools ignores detections on it
                ann_id += 1
                annotations.append(dict(segmentation=dict(counts=[0, w * h], size=[h, w]), area=float(w * h // 2),
                                        iscrowd=1, image_id=image_id, bbox=[0.0, 0.0, float(w // 2), float(h)],
                                        category_id=1, id=ann_id))
        data = dict(info=dict(description="COCO 2017 Dataset (kdet test miniature)", version="1.0", year=2017),
                    licenses=[dict(url="", id=1, name="test")], images=images, annotations=annotations,
                    categories=[dict(supercategory=s, id=i, name=n) for i, n, s in COCO_CATEGORIES])
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        written[split] = data
    return written


# ------------------------------------------------------------------ running and checking
def run_train(recipe, work_dir, sets, timeout=900, backend=None):
    """``python tools/train.py RECIPE --work-dir W --set ...`` in a fresh process, as a user runs it
    (``backend``: ``KERAS_BACKEND`` for it; None: the environment's)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if backend:
        env["KERAS_BACKEND"] = backend
    command = [sys.executable, str(REPO / "tools" / "train.py"), str(recipe), "--work-dir", str(work_dir)]
    for item in sets:
        command += ["--set", item]
    return subprocess.run(command, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)


def pycocotools_stats(ground_truth, detections):
    """pycocotools' 12 bbox numbers for a GT dict and a results list."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(ground_truth))
        gt.createIndex()
        dt = gt.loadRes(detections) if detections else COCO()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def check_run(proc, work_dir, ground_truth, map_detection=lambda d: d):
    """The run ended well and wrote what a user gets; the AP is pycocotools' on ``ground_truth``.

    ``map_detection`` turns a ``test_detections.json`` entry into ``ground_truth``'s ids.
    Returns ``(metrics, detections)``.
    """
    assert proc.returncode == 0, proc.stderr[-4000:]
    work_dir = Path(work_dir)
    metrics = json.loads((work_dir / "metrics.json").read_text())
    for name in ("report.txt", "report.json", "ground_truth.json", "test_detections.json"):
        assert (work_dir / name).is_file(), name   # the run report and its inputs
    if metrics["saved_model"] is None:  # another Keras backend: the final model, for tools/export.py
        assert (work_dir / "final.keras").is_file() and "tools/export.py" in proc.stdout
    else:
        assert (work_dir / "saved_model" / "saved_model.pb").is_file()
        assert metrics["saved_model"] == str(work_dir / "saved_model")
    detections = [map_detection(d) for d in json.loads((work_dir / "test_detections.json").read_text())]
    assert detections, "the model wrote no detections (nothing to compare)"
    stats = pycocotools_stats(ground_truth, detections)
    names = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100", "AR_small",
             "AR_medium", "AR_large"]
    for name, value in zip(names, stats):
        assert abs(metrics[name] - value) < 1e-6, (name, metrics[name], value)
    assert metrics["AP50"] > 0, "AP50 0: the comparison with pycocotools says little (train the test model more)"
    return metrics, detections
