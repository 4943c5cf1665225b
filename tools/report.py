"""Explain a detection score from COCO json files.

    python tools/report.py --gt instances_val.json --results results.json --out report_dir \
        [--score-threshold 0.25] [--iou-threshold 0.5] [--use-07-metric]

Writes ``report.txt`` (VOC mAP, mAP50-95, precision/recall/F1 at the score
threshold and at the F1-optimal one, confusion matrix), ``metrics.json``,
``pr_curves.png`` and ``confusion_matrix.png`` into the output folder.

Ground truth is a COCO detection json (``images``, ``annotations``,
``categories``); categories sorted by id become classes 0..C-1 (as in
``kdet.data.coco``); annotations with ``difficult`` or ``iscrowd`` set are
ignored. Results are a COCO results list ``[{image_id, category_id, bbox,
score}]`` (kdet writes them with ``kdet.data.coco.to_coco_results``).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gt", required=True, help="COCO ground-truth json")
    p.add_argument("--results", required=True, help="COCO results json (list of detections)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--score-threshold", type=float, default=0.25,
                   help="confidence threshold for P/R/F1 and the confusion matrix (default 0.25)")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="IoU for a match (default 0.5)")
    p.add_argument("--use-07-metric", action="store_true", help="VOC2007 11-point AP instead of all-point")
    return p.parse_args(argv)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError as err:
        raise ValueError(f"{path}: not valid json ({err})") from None


def load_coco(gt_path, results_path):
    """COCO GT and results json -> ``(gts, dets, class_names)`` for kdet.metrics."""
    from kdet.boxes import coco_to_xyxy

    data = _read_json(gt_path)
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise ValueError(f"{gt_path}: not a COCO detection file (needs images, annotations, categories)")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    class_names = [str(c["name"]) for c in categories]
    class_of = {c["id"]: k for k, c in enumerate(categories)}
    row_of = {image["id"]: i for i, image in enumerate(data["images"])}

    objects = [[] for _ in row_of]
    for ann in data["annotations"]:
        if ann.get("image_id") not in row_of or ann.get("category_id") not in class_of:
            raise ValueError(f"{gt_path}: annotation {ann.get('id')!r} has unknown image_id "
                             f"{ann.get('image_id')!r} or category_id {ann.get('category_id')!r}")
        if not _is_box(ann.get("bbox")):
            raise ValueError(f"{gt_path}: annotation {ann.get('id')!r} has malformed bbox {ann.get('bbox')!r}")
        ignored = bool(ann.get("difficult", 0)) or bool(ann.get("iscrowd", 0))
        objects[row_of[ann["image_id"]]].append((ann["bbox"], class_of[ann["category_id"]], ignored))
    gts = [_image_dict(rows, coco_to_xyxy, "difficult") for rows in objects]

    results = _read_json(results_path)
    if isinstance(results, dict) and "annotations" in results:
        results = results["annotations"]
    if not isinstance(results, list):
        raise ValueError(f"{results_path}: expected a list of detections [{{image_id, category_id, bbox, score}}]")
    found = [[] for _ in row_of]
    for n, r in enumerate(results):
        try:
            image_id, category, bbox, score = r["image_id"], r["category_id"], r["bbox"], float(r["score"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{results_path}: entry {n} is not {{image_id, category_id, bbox, score}}: {r!r}") from None
        if image_id not in row_of:
            raise ValueError(f"{results_path}: entry {n} has image_id {image_id!r}, not an image of {gt_path}")
        if category not in class_of:
            raise ValueError(f"{results_path}: entry {n} has category_id {category!r}, not a category of {gt_path}")
        if not _is_box(bbox):
            raise ValueError(f"{results_path}: entry {n} has malformed bbox {bbox!r}")
        found[row_of[image_id]].append((bbox, class_of[category], score))
    dets = [_image_dict(rows, coco_to_xyxy, "scores") for rows in found]
    return gts, dets, class_names


def _is_box(bbox):
    try:
        return np.shape(np.asarray(bbox, np.float64)) == (4,)
    except (TypeError, ValueError):
        return False


def _image_dict(rows, coco_to_xyxy, third):
    boxes, classes, values = zip(*rows) if rows else ([], [], [])
    return {"boxes": coco_to_xyxy(np.reshape(np.asarray(boxes, np.float64), (-1, 4))),
            "classes": np.asarray(classes, np.int64), third: np.asarray(values)}


def main(argv=None):
    args = parse_args(argv)
    from kdet.metrics.reports import write_report

    try:
        gts, dets, class_names = load_coco(args.gt, args.results)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = write_report(gts, dets, class_names, args.out, score_threshold=args.score_threshold,
                       iou_threshold=args.iou_threshold, use_07_metric=args.use_07_metric)
    print(out["text"], end="")
    print("wrote " + ", ".join(out["paths"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
