"""Explain a detection score: a training run's work dir, or any COCO json files.

    python tools/report.py WORK_DIR [--score-threshold T] [--out DIR]
    python tools/report.py --gt instances_val.json --results results.json --out report_dir \
        [--score-threshold 0.25] [--iou-threshold 0.5] [--use-07-metric]

With WORK_DIR (what ``tools/train.py`` wrote: ``ground_truth.json``,
``test_detections.json``, and where present ``report_config.json``,
``preflight.json``, ``log.csv``, ``train_*.json``), rebuilds the run report
(``kdet.metrics.run_report``): ``report.txt`` / ``report.json`` (per-class
table and findings), ``PR_curve.png``, ``F1_curve.png``, ``P_curve.png``,
``R_curve.png``, ``confusion_matrix.png``, ``confusion_matrix_normalized.png``,
``results.png`` and ``errors_gallery.png``, into WORK_DIR (or --out).

With --gt / --results, writes ``report.txt`` (VOC mAP, mAP50-95,
precision/recall/F1 at the score threshold and at the F1-optimal one,
confusion matrix), ``metrics.json``, ``pr_curves.png`` and
``confusion_matrix.png`` into --out. Ground truth is a COCO detection json
(``images``, ``annotations``, ``categories``); categories sorted by id become
classes 0..C-1 (as in ``kdet.data.coco``); annotations with ``difficult`` or
``iscrowd`` set are ignored. Results are a COCO results list ``[{image_id,
category_id, bbox, score}]`` (kdet writes them with ``kdet.data.coco.to_coco_results``).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("work_dir", nargs="?", help="a training run's work dir (rebuilds its run report)")
    p.add_argument("--gt", help="COCO ground-truth json")
    p.add_argument("--results", help="COCO results json (list of detections)")
    p.add_argument("--out", help="output folder (with WORK_DIR: default WORK_DIR)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="confidence threshold for P/R/F1 and the confusion matrix (default 0.25, or the "
                        "run's eval.report_score_threshold)")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="IoU for a match (default 0.5)")
    p.add_argument("--use-07-metric", action="store_true", help="VOC2007 11-point AP instead of all-point")
    return p.parse_args(argv)


def load_coco(gt_path, results_path):
    """COCO GT and results json -> ``(gts, dets, class_names)`` for kdet.metrics."""
    from kdet.metrics.run_report import load_coco as load

    return load(gt_path, results_path)[:3]


def main(argv=None):
    args = parse_args(argv)
    if args.work_dir:
        return report_work_dir(args)
    if not (args.gt and args.results and args.out):
        print("error: give a WORK_DIR, or --gt, --results and --out", file=sys.stderr)
        return 2
    from kdet.metrics.reports import write_report

    try:
        gts, dets, class_names = load_coco(args.gt, args.results)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    threshold = 0.25 if args.score_threshold is None else args.score_threshold
    out = write_report(gts, dets, class_names, args.out, score_threshold=threshold,
                       iou_threshold=args.iou_threshold, use_07_metric=args.use_07_metric)
    print(out["text"], end="")
    print("wrote " + ", ".join(out["paths"].values()))
    return 0


def report_work_dir(args):
    from kdet.metrics.run_report import DETS_FILE, GT_FILE, write_run_report

    missing = [name for name in (GT_FILE, DETS_FILE) if not os.path.isfile(os.path.join(args.work_dir, name))]
    if missing:
        print(f"error: {args.work_dir}: no {' or '.join(missing)} (written by a training run's final evaluation)",
              file=sys.stderr)
        return 2
    try:
        out = write_run_report(args.work_dir, score_threshold=args.score_threshold, out_dir=args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(out["paths"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
