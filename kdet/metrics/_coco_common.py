"""COCO evaluation parameters and the summary step, shared by the host and device engines.

The constants are pycocotools' ``Params.setDetParams`` values, built the same way
(``np.linspace``) so that float comparisons against them give identical results;
:class:`EvalParams` holds a set of them (the defaults, or a user's own).
"""

from dataclasses import dataclass

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


@dataclass(frozen=True)
class EvalParams:
    """pycocotools' ``Params`` for bbox evaluation (``iouThrs, maxDets, areaRng, areaRngLbl, useCats``).

    The defaults are pycocotools' (``setDetParams``). ``area_ranges`` is a sequence of
    ``(label, (lo, hi))`` (or a dict ``label: (lo, hi)``); ``max_dets`` ascending.
    Recall thresholds are pycocotools' 101 points (not a parameter).
    """

    iou_thresholds: tuple = tuple(IOU_THRESHOLDS.tolist())
    max_dets: tuple = MAX_DETS
    area_ranges: tuple = tuple(zip(AREA_NAMES, AREA_RANGES))
    use_cats: bool = True

    @classmethod
    def make(cls, iou_thresholds=None, max_dets=None, area_ranges=None, use_cats=True):
        """Checked parameters; ``None`` keeps pycocotools' default."""
        default = cls()
        thr = default.iou_thresholds if iou_thresholds is None else tuple(float(t) for t in np.ravel(iou_thresholds))
        dets = default.max_dets if max_dets is None else tuple(int(m) for m in np.ravel(max_dets))
        areas = default.area_ranges if area_ranges is None else area_ranges
        areas = tuple((str(k), (float(v[0]), float(v[1])))
                      for k, v in (areas.items() if isinstance(areas, dict) else areas))
        if not thr or any(not 0.0 <= t <= 1.0 for t in thr):
            raise ValueError(f"iou_thresholds must be values in [0, 1], got {thr}")
        if not dets or any(m < 1 for m in dets) or list(dets) != sorted(set(dets)):
            raise ValueError(f"max_dets must be ascending positive integers, got {dets}")
        if not areas or any(lo > hi for _, (lo, hi) in areas) or len({k for k, _ in areas}) != len(areas):
            raise ValueError(f"area_ranges must be distinct labels with lo <= hi, got {areas}")
        return cls(thr, dets, areas, bool(use_cats))

    def to_dict(self):
        """JSON-friendly form; ``EvalParams.make(**d)`` reads it back."""
        return dict(iou_thresholds=list(self.iou_thresholds), max_dets=list(self.max_dets),
                    area_ranges=[[k, list(v)] for k, v in self.area_ranges], use_cats=self.use_cats)

    @property
    def thresholds(self):
        return np.asarray(self.iou_thresholds, np.float64)

    @property
    def area_names(self):
        return tuple(k for k, _ in self.area_ranges)

    @property
    def area_bounds(self):
        """``lo [A]``, ``hi [A]`` float64."""
        return (np.asarray([r[0] for _, r in self.area_ranges], np.float64),
                np.asarray([r[1] for _, r in self.area_ranges], np.float64))

    def summary_specs(self):
        """``[(name, is_ap, iou or None, area label, max_dets)]``: pycocotools' 12 lines, generalised.

        The AP and area lines use the largest ``max_dets`` (pycocotools hard-codes 100 for
        the first line and prints -1 when 100 is not among ``maxDets``); one AR line per
        ``max_dets`` value, named by it (``AR1, AR10, AR100`` by default); AP50 / AP75 when
        those thresholds are evaluated; one AP / AR line per area range after the first
        (the first, ``all`` by default, is the range of the overall lines).
        """
        top, main, others = self.max_dets[-1], self.area_names[0], self.area_names[1:]
        specs = [("AP", True, None, main, top)]
        specs += [(f"AP{round(t * 100)}", True, t, main, top) for t in (0.5, 0.75) if t in self.iou_thresholds]
        specs += [(f"AP_{a}", True, None, a, top) for a in others]
        specs += [(f"AR{m}", False, None, main, m) for m in self.max_dets]
        specs += [(f"AR_{a}", False, None, a, top) for a in others]
        return specs

    @property
    def stat_names(self):
        return tuple(spec[0] for spec in self.summary_specs())


DEFAULT_PARAMS = EvalParams()


def summarize(precision, recall, params=DEFAULT_PARAMS):
    """The summary numbers from ``precision [T,R,K,A,M]`` and ``recall [T,K,A,M]``.

    Same selection and ``np.mean`` as ``COCOeval.summarize``: entries of -1
    (categories without ground truth) are left out; -1 when nothing is left.
    """
    precision, recall = np.asarray(precision, np.float64), np.asarray(recall, np.float64)
    stats = {}
    for name, is_ap, iou, area, max_det in params.summary_specs():
        values = precision if is_ap else recall
        if iou is not None:
            values = values[np.where(iou == params.thresholds)[0]]
        values = values[..., params.area_names.index(area), params.max_dets.index(max_det)]
        kept = values[values > -1]
        stats[name] = float(np.mean(kept)) if kept.size else -1.0
    return stats


def per_class(precision, class_names, params=DEFAULT_PARAMS):
    """``{name: {"AP": .., "AP50": ..}}`` at the first area range, most detections; -1 without ground truth.

    AP50 is -1 when 0.5 is not among the IoU thresholds.
    """
    precision = np.asarray(precision, np.float64)
    at_50 = np.flatnonzero(params.thresholds == 0.5)
    table = {}
    for k, name in enumerate(class_names):
        p = precision[:, :, k, 0, -1]
        table[name] = {
            "AP": float(np.mean(p)) if np.all(p > -1) else -1.0,
            "AP50": float(np.mean(p[at_50[0]])) if at_50.size and np.all(p[at_50[0]] > -1) else -1.0,
        }
    return table


def format_summary(stats, params=None):
    """The familiar pycocotools summary, one line per ``params.summary_specs()``, labelled as computed.

    ``params`` default: the ``params`` entry of ``stats`` (``coco_evaluate`` adds it when not
    the defaults), else the defaults.
    """
    if params is None:
        params = EvalParams.make(**stats["params"]) if "params" in stats else DEFAULT_PARAMS
    line = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"
    thr = params.iou_thresholds
    all_ious = f"{thr[0]:0.2f}:{thr[-1]:0.2f}" if len(thr) > 1 else f"{thr[0]:0.2f}"
    lines = []
    for name, is_ap, iou, area, max_det in params.summary_specs():
        title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
        iou_text = all_ious if iou is None else f"{iou:0.2f}"
        lines.append(line.format(title, kind, iou_text, area, max_det, stats[name]))
    return "\n".join(lines)


def format_per_class(table):
    """A per-class AP / AP50 table."""
    width = max([len(str(n)) for n in table] + [5])
    lines = [f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}"]
    for name, row in table.items():
        lines.append(f"{str(name):<{width}}  {row['AP']:6.3f}  {row['AP50']:6.3f}")
    return "\n".join(lines)


def original_hw(meta):
    """``(height, width)`` ``[B]`` of the original images from a batch's ``meta`` dict, else None."""
    if isinstance(meta, dict) and "height" in meta and "width" in meta:
        return meta["height"], meta["width"]
    return None
