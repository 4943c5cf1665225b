"""COCO bbox evaluation of a detection-results json against a COCO ground-truth json.

    python tools/eval.py --gt instances_val.json --dets results.json [--json metrics.json] [--device]

Prints the 12-line pycocotools-style summary, a per-class AP / AP50 table and, per class, the
detections at IoU 0.5 that are true positives and why the others are false positives
(duplicate, another class's object, poor localisation, background; kdet.metrics.coco.match_records).
A results file kdet cannot score (not JSON, not a list, missing fields, NaN boxes,
no detection on a ground-truth image or category id) ends in one ``error:`` line
naming the file and the detection, exit status 2.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdet.cli import tool_main  # noqa: E402
from kdet.metrics.coco import CocoIdWarning, coco_evaluate, format_outcomes, format_per_class, format_summary, match_records  # noqa: E402


@tool_main(needs_tensorflow=False)
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True, help="COCO ground-truth json")
    parser.add_argument("--dets", required=True, help="COCO results json (list of image_id, category_id, bbox, score)")
    parser.add_argument("--json", help="also write the numbers (and per-class table) to this json file")
    parser.add_argument("--device", action="store_true", help="use the XLA-compiled TensorFlow engine")
    parser.add_argument("--float32", action="store_true", help="with --device: float32 instead of float64")
    args = parser.parse_args(argv)

    if args.device:
        from kdet.cli import import_tensorflow

        import_tensorflow()
    result = coco_evaluate(args.gt, args.dets, use_device=args.device,
                           dtype="float32" if args.float32 else "float64")
    print(format_summary(result))
    print()
    print(format_per_class(result["per_class"]))
    print()
    with warnings.catch_warnings():  # coco_evaluate has already warned about these inputs
        warnings.simplefilter("ignore", CocoIdWarning)
        records = match_records(args.gt, args.dets)
    print(format_outcomes(records, iou=0.5))  # why the false positives are false
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
