"""Time kdet's COCO bbox evaluation against pycocotools and other exact evaluators on one workload.

The synthetic workload is COCO-val sized by default: 5,000 images, about 36,000 ground
truths over 80 classes (about 1% crowd, annotation ``area`` differing from the box
area), 100 detections per image with scores rounded to 3 decimals (so ties occur).
Every evaluator gets the same in-memory ground-truth dict and result list; each
timing covers building its index, evaluating, accumulating and summarising.

The others (each an exact reimplementation of pycocotools): faster-coco-eval (C++),
hotcoco (Rust), ultrafast-pycocotools (numpy); the test extras install them, and a
missing one is left out. The evaluators run in turns (round-robin, ``--repeat``
rounds) so that a change in the machine's load hits them all alike; the table shows
each one's best wall time and the CPU time (user + system of this process) of that run.

    python tools/benchmark_eval.py                           # full size (slow: pycocotools ~1 min)
    python tools/benchmark_eval.py --images 300              # quick check
    python tools/benchmark_eval.py --repeat 5 --skip pycocotools faster-coco-eval
"""

import argparse
import contextlib
import copy
import importlib.util
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdet.metrics.coco import STAT_NAMES, coco_evaluate  # noqa: E402


def make_workload(num_images=5000, num_classes=80, gts_per_image=7.3, dets_per_image=100, seed=0):
    """(ground-truth dict, detection list) of a synthetic COCO-like evaluation."""
    rng = np.random.default_rng(seed)
    class_weights = 1.0 / np.arange(1, num_classes + 1) ** 0.8  # skewed, like COCO
    class_weights /= class_weights.sum()
    images, anns, dets = [], [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.choice([640, 480, 600])), int(rng.choice([480, 427, 640]))
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"})
        n_gt = rng.poisson(gts_per_image)
        gt_cls = rng.choice(num_classes, size=n_gt, p=class_weights)
        side = np.exp(rng.uniform(np.log(8), np.log(400), size=(n_gt, 2)))  # small..large boxes
        w, h = np.minimum(side[:, 0], width - 1), np.minimum(side[:, 1], height - 1)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        gt_xywh = np.round(np.stack([x, y, w, h], 1), 2)
        crowd = rng.random(n_gt) < 0.01
        for box, c, is_crowd in zip(gt_xywh, gt_cls, crowd):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(c) + 1,
                         "bbox": box.tolist(), "area": float(box[2] * box[3] * rng.uniform(0.4, 0.95)),
                         "iscrowd": int(is_crowd)})
        # detections: jittered copies of the ground truth, then random boxes
        copies = rng.integers(0, 5, size=n_gt)
        src = np.repeat(np.arange(n_gt), copies)[:dets_per_image]
        jitter = rng.normal(0, 0.08, size=(len(src), 4)) * np.repeat(gt_xywh[src][:, 2:], 2, axis=1)
        near = gt_xywh[src] + jitter
        near[:, 2:] = np.maximum(near[:, 2:], 1)
        near_cls = np.where(rng.random(len(src)) < 0.85, gt_cls[src], rng.integers(num_classes, size=len(src)))
        n_rand = dets_per_image - len(src)
        rw, rh = rng.uniform(4, width / 2, n_rand), rng.uniform(4, height / 2, n_rand)
        rand = np.stack([rng.uniform(0, width - rw), rng.uniform(0, height - rh), rw, rh], 1)
        boxes = np.round(np.concatenate([near, rand]), 2)
        classes = np.concatenate([near_cls, rng.choice(num_classes, size=n_rand, p=class_weights)])
        scores = np.round(np.concatenate([rng.uniform(0.3, 1.0, len(src)), rng.uniform(0, 0.7, n_rand)]), 3)
        for box, c, s in zip(boxes.tolist(), classes.tolist(), scores.tolist()):
            dets.append({"image_id": image_id, "category_id": int(c) + 1, "bbox": box, "score": s})
    categories = [{"id": c + 1, "name": f"class{c + 1}"} for c in range(num_classes)]
    return {"images": images, "annotations": anns, "categories": categories}, dets


def run_kdet(gt, dets, use_device=False):
    result = coco_evaluate(gt, dets, use_device=use_device)
    return [result[name] for name in STAT_NAMES]


def run_pycocotools(gt, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return _run_pycocotools_api(COCO, COCOeval, gt, dets)


def _run_pycocotools_api(COCO, COCOeval, gt, dets):
    """pycocotools' evaluation calls, for pycocotools and the packages that copy its API."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return list(evaluator.stats[:12])


def run_faster_coco_eval(gt, dets):
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(gt)
    evaluator = COCOeval_faster(coco_gt, coco_gt.loadRes(dets), "bbox", print_function=lambda *a: None)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return list(evaluator.stats[:12])


def run_hotcoco(gt, dets):
    import hotcoco

    coco_gt = hotcoco.COCO(gt)
    evaluator = hotcoco.COCOeval(coco_gt, coco_gt.load_res(dets), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return list(evaluator.stats[:12])


def run_ultrafast(gt, dets):
    from ultrafast_pycocotools import COCO, COCOeval

    return _run_pycocotools_api(COCO, COCOeval, gt, dets)


OTHERS = {  # name: (module, runner)
    "hotcoco": ("hotcoco", run_hotcoco),
    "ultrafast-pycocotools": ("ultrafast_pycocotools", run_ultrafast),
    "faster-coco-eval": ("faster_coco_eval", run_faster_coco_eval),
    "pycocotools": ("pycocotools", run_pycocotools),
}


def timed_once(fn, gt, dets):
    """``(wall seconds, cpu seconds, stats)`` of one run on fresh copies (evaluators may write into them)."""
    gt_copy, dets_copy = copy.deepcopy(gt), copy.deepcopy(dets)
    cpu, start = time.process_time(), time.perf_counter()
    stats = fn(gt_copy, dets_copy)
    return time.perf_counter() - start, time.process_time() - cpu, np.asarray(stats, np.float64)


def timed_round_robin(runners, gt, dets, repeat):
    """``{name: (best wall, cpu of that run, stats)}``, the evaluators taking turns ``repeat`` times."""
    best = {}
    for _ in range(repeat):
        for name, fn in runners.items():
            wall, cpu, stats = timed_once(fn, gt, dets)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu, stats)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="number of images (default 5000)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of runs; each evaluator's best is kept")
    parser.add_argument("--device", action="store_true", help="also time kdet's XLA device engine")
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(OTHERS))
    args = parser.parse_args(argv)

    gt, dets = make_workload(args.images)
    print(f"workload: {len(gt['images'])} images, {len(gt['annotations'])} ground truths "
          f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(dets)} detections, "
          f"{len(gt['categories'])} classes")
    runners = {"kdet": run_kdet}
    if args.device:
        runners["kdet-device"] = lambda g, d: run_kdet(g, d, use_device=True)
    for name, (module, fn) in OTHERS.items():
        if name in args.skip:
            continue
        if importlib.util.find_spec(module) is None:
            print(f"{name}: not installed, left out")
            continue
        runners[name] = fn
    load_before = os.getloadavg()[0]
    results = timed_round_robin(runners, gt, dets, args.repeat)
    print(f"best of {args.repeat} (round-robin); load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs")

    reference = results.get("pycocotools")
    print(f"{'evaluator':<22} {'wall s':>7} {'cpu s':>7}  {'this / kdet':>11}  {'max |diff| vs pycocotools':>26}")
    kdet_time = results["kdet"][0]
    for name, (wall, cpu, stats) in sorted(results.items(), key=lambda item: item[1][0]):
        diff = f"{np.max(np.abs(stats - reference[2])):.3g}" if reference is not None else "n/a"
        print(f"{name:<22} {wall:7.2f} {cpu:7.2f}  {wall / kdet_time:11.2f}  {diff:>26}")
    spread = max(np.max(np.abs(stats - results["kdet"][2])) for _, _, stats in results.values())
    print(f"max |diff| of any evaluator vs kdet: {spread:.3g}")
    print("kdet AP numbers: " + ", ".join(f"{n}={v:.4f}" for n, v in zip(STAT_NAMES, results["kdet"][2])))


if __name__ == "__main__":
    main()
