"""COCO evaluation parameters and the summary step, shared by the host and device engines.

The constants are pycocotools' ``Params.setDetParams`` values, built the same way
(``np.linspace``) so that float comparisons against them give identical results.
"""

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)
AREA_RANGES = ((0**2, 1e5**2), (0**2, 32**2), (32**2, 96**2), (96**2, 1e5**2))
AREA_NAMES = ("all", "small", "medium", "large")

STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)
# (average precision?, IoU threshold or None for 0.50:0.95, area range, maxDets)
_STAT_SPECS = (
    (True, None, "all", 100), (True, 0.5, "all", 100), (True, 0.75, "all", 100),
    (True, None, "small", 100), (True, None, "medium", 100), (True, None, "large", 100),
    (False, None, "all", 1), (False, None, "all", 10), (False, None, "all", 100),
    (False, None, "small", 100), (False, None, "medium", 100), (False, None, "large", 100),
)


def summarize(precision, recall):
    """The 12 COCO numbers from ``precision [T,R,K,A,M]`` and ``recall [T,K,A,M]``.

    Same selection and ``np.mean`` as ``COCOeval.summarize``: entries of -1
    (categories without ground truth) are left out; -1 when nothing is left.
    """
    precision, recall = np.asarray(precision, np.float64), np.asarray(recall, np.float64)
    stats = {}
    for name, (is_ap, iou, area, max_det) in zip(STAT_NAMES, _STAT_SPECS):
        values = precision if is_ap else recall
        if iou is not None:
            values = values[np.where(iou == IOU_THRESHOLDS)[0]]
        values = values[..., AREA_NAMES.index(area), MAX_DETS.index(max_det)]
        kept = values[values > -1]
        stats[name] = float(np.mean(kept)) if kept.size else -1.0
    return stats


def per_class(precision, class_names):
    """``{name: {"AP": .., "AP50": ..}}`` at area ``all``, 100 detections; -1 without ground truth."""
    precision = np.asarray(precision, np.float64)
    table = {}
    for k, name in enumerate(class_names):
        p = precision[:, :, k, 0, -1]
        table[name] = {
            "AP": float(np.mean(p)) if np.all(p > -1) else -1.0,
            "AP50": float(np.mean(p[0])) if np.all(p[0] > -1) else -1.0,
        }
    return table


def format_summary(stats):
    """The familiar 12-line pycocotools summary."""
    line = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"
    lines = []
    for name, (is_ap, iou, area, max_det) in zip(STAT_NAMES, _STAT_SPECS):
        title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
        iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        lines.append(line.format(title, kind, iou_text, area, max_det, stats[name]))
    return "\n".join(lines)


def format_per_class(table):
    """A per-class AP / AP50 table."""
    width = max([len(str(n)) for n in table] + [5])
    lines = [f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}"]
    for name, row in table.items():
        lines.append(f"{str(name):<{width}}  {row['AP']:6.3f}  {row['AP50']:6.3f}")
    return "\n".join(lines)
