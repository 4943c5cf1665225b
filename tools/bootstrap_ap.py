"""Bootstrap spread of a finished run's AP: its evaluation images resampled with replacement, 30 times.

    python tools/bootstrap_ap.py WORK_DIR [WORK_DIR ...]

Reads WORK_DIR/ground_truth.json and test_detections.json (written by every training run) and prints
the AP, the standard deviation of the resampled APs and their 5th-95th percentiles: how far two
evaluations of one model on splits of this size may differ by the choice of images alone.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdet.metrics.coco import coco_evaluate  # noqa: E402


def resample(gt, dets, idx):
    """The ground truth and detections of images ``idx`` (repeats get new image ids)."""
    annotations, detections = {}, {}
    for a in gt["annotations"]:
        annotations.setdefault(a["image_id"], []).append(a)
    for d in dets:
        detections.setdefault(d["image_id"], []).append(d)
    images, anns, results = [], [], []
    for new_id, k in enumerate(idx, 1):
        old = gt["images"][k]["id"]
        images.append(dict(gt["images"][k], id=new_id))
        anns += [dict(a, id=len(anns) + j + 1, image_id=new_id) for j, a in enumerate(annotations.get(old, []))]
        results += [dict(d, image_id=new_id) for d in detections.get(old, [])]
    return dict(gt, images=images, annotations=anns), results


def main(work_dirs, resamples=30):
    for work in work_dirs:
        with open(os.path.join(work, "ground_truth.json")) as f:
            gt = json.load(f)
        with open(os.path.join(work, "test_detections.json")) as f:
            dets = json.load(f)
        rng, n = np.random.default_rng(0), len(gt["images"])
        aps = [coco_evaluate(*resample(gt, dets, rng.integers(0, n, n)))["AP"] for _ in range(resamples)]
        p5, p95 = np.percentile(aps, [5, 95])
        print(f"{work}: {n} images, AP {coco_evaluate(gt, dets)['AP']:.4f}, bootstrap std {np.std(aps):.4f}, "
              f"5-95% {p5:.4f}-{p95:.4f}")
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work_dirs", nargs="+", metavar="WORK_DIR", help="finished training runs")
    parser.add_argument("--resamples", type=int, default=30)
    args = parser.parse_args()
    sys.exit(main(args.work_dirs, args.resamples))
