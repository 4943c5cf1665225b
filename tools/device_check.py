"""Check the device COCO engine and COCOEvalCallback on this machine's Keras backend.

    KERAS_BACKEND=jax python tools/device_check.py [--images 5000] [--dtype float64]

1. A COCO-val-sized synthetic workload (``--images`` images, 100 detections each: 500,000 at the
   default 5,000; 80 classes, 1-15 objects per image, small / medium / large, crowds): the 12
   numbers of the device engine (`kdet.metrics.coco_device`) against the host evaluator
   (`kdet.metrics.coco.evaluate_arrays`, pycocotools' semantics), and the engine's seconds.
2. A short training of a tiny SSD (64 px, width 0.125, synthetic shapes, numpy ``PyDataset``
   input) with `COCOEvalCallback`: its logged numbers against ``coco_evaluate`` on the same
   predictions, and the callback's cost next to a plain ``model.predict`` over the same
   validation set.

Needs only Keras, numpy and the backend (no TensorFlow under JAX). Exits 0 only when every
number agrees (float64: 1e-9, float32: 1e-4); the largest difference is printed last.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

TOLERANCE = {"float64": 1e-9, "float32": 1e-4}
IMAGE_W, IMAGE_H, NUM_CATEGORIES, DETS_PER_IMAGE = 640, 480, 80, 100


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="images of the synthetic COCO workload")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float64")
    parser.add_argument("--batch-size", type=int, default=64, help="images per device update")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the tiny training")
    parser.add_argument("--skip-training", action="store_true", help="only the engine workload")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be >= 1")
    return args


# ------------------------------------------------------------------ 1. the engine on a COCO-sized workload
def synthetic_coco(num_images, seed):
    """COCO json ``(ground_truth, detections)``: boxes of all sizes, 100 detections per image.

    Each object gets 0-3 detections of its class near it (jittered), the rest are random boxes
    and classes; scores on a 1/1000 grid, so there are ties.
    """
    rng = np.random.default_rng(seed)
    gt = {"images": [{"id": i + 1, "width": IMAGE_W, "height": IMAGE_H} for i in range(num_images)],
          "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(NUM_CATEGORIES)], "annotations": []}
    dets = []
    for image_id in range(1, num_images + 1):
        n = int(rng.integers(1, 16))
        boxes = random_boxes(rng, n)
        classes = rng.integers(0, NUM_CATEGORIES, n)
        for box, c in zip(boxes, classes):
            ann = {"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": int(c) + 1,
                   "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": int(rng.random() < 0.01)}
            gt["annotations"].append(ann)
        copies = rng.integers(0, 4, n)
        near = np.repeat(boxes, copies, axis=0)[:DETS_PER_IMAGE]
        near_classes = np.repeat(classes, copies)[:DETS_PER_IMAGE]
        near = near + rng.normal(0, 0.08, near.shape) * near[:, [2, 3, 2, 3]]
        rest = DETS_PER_IMAGE - len(near)
        det_boxes = np.concatenate([near, random_boxes(rng, rest)])
        det_classes = np.concatenate([near_classes, rng.integers(0, NUM_CATEGORIES, rest)])
        scores = np.round(np.concatenate([rng.uniform(0.3, 1.0, len(near)), rng.uniform(0.0, 0.6, rest)]), 3)
        det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], 1.0)
        for box, c, s in zip(det_boxes, det_classes, scores):
            dets.append({"image_id": image_id, "category_id": int(c) + 1, "bbox": box.tolist(), "score": float(s)})
    return gt, dets


def random_boxes(rng, n):
    """``n`` xywh boxes, sides log-uniform in 4..400 px, inside the image."""
    w, h = (np.exp(rng.uniform(np.log(4), np.log(400), n)) for _ in range(2))
    w, h = np.minimum(w, IMAGE_W - 1), np.minimum(h, IMAGE_H - 1)
    x, y = rng.uniform(0, IMAGE_W - w), rng.uniform(0, IMAGE_H - h)
    return np.round(np.stack([x, y, w, h], axis=1), 2)


def engine_check(args):
    """The 12 numbers of the device engine and of the host evaluator; the engine's seconds."""
    from kdet.metrics._coco_common import summarize
    from kdet.metrics.coco import evaluate_arrays, load_coco_arrays
    from kdet.metrics.coco_device import COCOAccumulator, padded_batches, to_numpy

    start = time.perf_counter()
    gt, dets = synthetic_coco(args.images, args.seed)
    arr = load_coco_arrays(gt, dets)
    print(f"workload: {args.images} images, {len(gt['annotations'])} objects, {len(dets)} detections "
          f"({time.perf_counter() - start:.1f} s to make and load)")

    start = Clock()
    host = summarize(*evaluate_arrays(arr))
    host_seconds = start.elapsed()

    start = time.perf_counter()
    batches = padded_batches(arr, args.batch_size)
    pad_seconds = time.perf_counter() - start
    acc = COCOAccumulator(len(arr.category_ids), capacity=len(batches) * args.batch_size * batches[0][4].shape[1],
                          dtype=args.dtype, box_format="xywh")
    update, result = acc.compiled(jit_compile=True)
    seconds = []
    for _ in range(2):  # the first pass compiles
        acc.reset()
        start = Clock()
        for batch in batches:
            update(*batch)
        precision, recall = (to_numpy(x).astype(np.float64) for x in result())
        seconds.append(start.elapsed())
    acc.check()
    device = summarize(precision, recall)
    print(f"device engine ({args.dtype}, {args.batch_size} images per update): {seconds[1]} "
          f"(first pass with compilation {seconds[0]}; padding on the host {pad_seconds:.2f} s wall); "
          f"host evaluator {host_seconds}")
    return compare("engine", device, host)


class Clock:
    """Wall and CPU seconds (all threads of this process) since creation."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self):
        return Elapsed(time.perf_counter() - self.wall, time.process_time() - self.cpu)


class Elapsed:
    def __init__(self, wall, cpu):
        self.wall, self.cpu = wall, cpu

    def __str__(self):
        return f"{self.wall:.2f} s wall / {self.cpu:.2f} s CPU"


def compare(what, got, ref):
    print(f"{what}: {'name':<10} {'device':>12} {'host':>12} {'|diff|':>10}")
    worst = 0.0
    for name, value in ref.items():
        if name in ("per_class", "params"):
            continue
        diff = abs(got[name] - value)
        worst = max(worst, diff)
        print(f"{what}: {name:<10} {got[name]:12.8f} {value:12.8f} {diff:10.2e}")
    return worst


# ------------------------------------------------------------------ 2. a tiny training with the callback
def shapes_arrays(num_images, image_size, max_boxes, seed):
    """Synthetic shapes scenes as ``images uint8 [N,S,S,3]`` and targets ``[N, max_boxes, 6]`` (CONVENTIONS)."""
    from kdet.data.shapes import render_scene

    rng = np.random.default_rng(seed)
    images = np.zeros((num_images, image_size, image_size, 3), np.uint8)
    targets = np.zeros((num_images, max_boxes, 6), np.float32)
    targets[..., 4] = -1
    for i in range(num_images):
        images[i], objects = render_scene(rng, image_size=image_size, max_objects=max_boxes)
        for j, obj in enumerate(objects[:max_boxes]):
            targets[i, j] = [*(np.asarray(obj["box"], np.float32) / image_size), obj["class_id"], 0]
    return images, targets


def training_check(args):
    """Train a tiny SSD with the callback; its numbers vs coco_evaluate; its cost vs model.predict."""
    from kdet.data.shapes import SHAPES_CLASSES
    from kdet.losses import MultiBoxLoss
    from kdet.metrics.callback import ArrayBatches, COCOEvalCallback
    from kdet.metrics.coco import coco_evaluate
    from kdet.models.ssd import SSD

    size, max_boxes, batch = 64, 4, 8
    train = ArrayBatches(*shapes_arrays(64, size, max_boxes, args.seed + 1), batch)
    val_images, val_targets = shapes_arrays(48, size, max_boxes, args.seed + 2)
    val = ArrayBatches(val_images, val_targets, 16)
    model = SSD(num_classes=len(SHAPES_CLASSES), image_size=size, width_multiplier=0.125, backbone_weights=None)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=MultiBoxLoss(num_classes=len(SHAPES_CLASSES)))
    callback = COCOEvalCallback(val, class_names=SHAPES_CLASSES, dtype=args.dtype, verbose=0)
    start = time.perf_counter()
    history = model.fit(train, epochs=args.epochs, callbacks=[callback], verbose=0)
    print(f"training: {args.epochs} epochs of {len(train)} steps with the callback in "
          f"{time.perf_counter() - start:.1f} s; val_AP per epoch {np.round(history.history['val_AP'], 4).tolist()}")
    logged = {name: history.history["val_" + name][-1] for name in callback.eval_params.stat_names}
    reference = coco_evaluate(*predictions_as_coco(model, val, SHAPES_CLASSES, size))

    predict = min((timed(lambda: model.predict(val, verbose=0)) for _ in range(2)), key=lambda e: e.cpu)
    evaluation = min((timed(callback.evaluate) for _ in range(2)), key=lambda e: e.cpu)
    print(f"callback cost: {evaluation} per evaluation of {len(val_images)} images; a plain model.predict over "
          f"them {predict}: {evaluation.cpu / predict.cpu:.2f}x in CPU time, {evaluation.wall / predict.wall:.2f}x "
          f"wall (detection decoding + NMS + matching included)")
    return compare("callback", logged, reference)


def timed(fn):
    start = Clock()
    fn()
    return start.elapsed()


def predictions_as_coco(model, val, class_names, size):
    """Ground truth and ``model.detect`` predictions of the validation set as COCO json (input pixels)."""
    from keras import ops

    gt = {"images": [], "categories": [{"id": c + 1, "name": n} for c, n in enumerate(class_names)],
          "annotations": []}
    dets = []
    for b in range(len(val)):
        images, targets = val[b]
        out = {k: ops.convert_to_numpy(v) for k, v in model.detect(images).items()}
        for i in range(len(images)):
            image_id = len(gt["images"]) + 1
            gt["images"].append({"id": image_id, "width": size, "height": size})
            for row in targets[i][targets[i][:, 4] >= 0]:
                x1, y1, x2, y2 = row[:4].astype(np.float64) * size
                gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id,
                                          "category_id": int(row[4]) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                          "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
            for box, score, c in zip(out["boxes"][i], out["scores"][i], out["classes"][i]):
                if c >= 0:
                    x1, y1, x2, y2 = box.astype(np.float64) * size
                    dets.append({"image_id": image_id, "category_id": int(c) + 1,
                                 "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return gt, dets


def main(argv=None):
    args = parse_args(argv)
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, TensorFlow imported: "
          f"{'tensorflow' in sys.modules}")
    worst = {"engine": engine_check(args)}
    if not args.skip_training:
        worst["callback"] = training_check(args)
    tol = TOLERANCE[args.dtype]
    agree = all(w <= tol for w in worst.values())
    print(f"TensorFlow imported: {'tensorflow' in sys.modules}; numbers {'agree' if agree else 'DIFFER'} "
          f"(tolerance {tol:g})")
    print(f"largest difference: {max(worst.values()):.3e} ({', '.join(f'{k} {v:.3e}' for k, v in worst.items())})")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
