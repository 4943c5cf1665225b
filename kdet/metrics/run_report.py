"""The run report: what a training run's score is made of, and why, from its work dir.

Written by every ``kdet.engine`` training run after the final evaluation
(:func:`after_training`, one of the run's post-training steps; :func:`report_after_training`) and rebuilt from the files alone by
``tools/report.py WORK_DIR`` (:func:`write_run_report`). Host-side numpy and
matplotlib (Agg). One function per artefact:

* ``ground_truth.json`` (:func:`save_ground_truth`): the evaluated split in COCO
  form, beside ``test_detections.json``; each image also carries
  ``kdet_image_path`` for the gallery. ``train_ground_truth.json`` /
  ``train_detections.json``: the same for a seeded sample of training images
  (``eval.report_train_images``), the evidence for a train / held-out gap.
* ``report_config.json``: class names, input size, thresholds (what a rebuild needs).
* :func:`per_class_table` -> ``report.txt`` / ``report.json``: images, instances,
  P / R / F1 at the report's score threshold, COCO AP50 and AP50-95, and the
  F1-optimal threshold with P / R / F1 there.
* :func:`plot_confidence_curve` -> ``F1_curve.png``, ``P_curve.png``, ``R_curve.png``
  (against the confidence threshold, per class and all); ``PR_curve.png``;
  ``confusion_matrix.png`` and ``confusion_matrix_normalized.png`` (rows: ground
  truth with a background row of false positives; columns: predictions with a
  background column of misses; the normalised one divides each row by its sum);
  :func:`plot_results` -> ``results.png`` (training loss and its parts, val_AP /
  val_AP50 against epochs, from ``log.csv``); :func:`plot_error_gallery` ->
  ``errors_gallery.png`` (the images with most errors, ground truth green,
  predictions red).
* :func:`findings`: sentences computed from the numbers (each only when the
  numbers show it): a pre-NMS candidate cap that cuts detections, over-detection,
  the weakest class and why, confusion pairs that look like label mistakes, small
  objects, over- and under-fitting.

Matching is VOC's (``kdet.metrics.voc``) at IoU 0.5 for P / R / F1, curves and
confusion; the AP columns are exact COCO (``kdet.metrics.coco``).
"""

import csv
import json
import math
import os

import numpy as np

from kdet.log import get_logger
from kdet.metrics import reports, voc

logger = get_logger(__name__)

GT_FILE, DETS_FILE = "ground_truth.json", "test_detections.json"
TRAIN_GT_FILE, TRAIN_DETS_FILE = "train_ground_truth.json", "train_detections.json"
CONFIG_FILE = "report_config.json"
ARTEFACTS = ("report.txt", "report.json", "PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png",
             "confusion_matrix.png", "confusion_matrix_normalized.png", "results.png", "errors_gallery.png")
SIZE_EDGES = (8, 16, 32)        # size-at-input buckets (px, sqrt of area) for the small-object finding
CONFIDENCE_GRID = np.linspace(0.0, 1.0, 201)


# ------------------------------------------------------------------ files in the work dir
def save_ground_truth(path, records, class_names, ground_truth=None):
    """COCO ground truth of ``records`` at ``path``, each image with ``kdet_image_path``."""
    from kdet.data.coco import records_to_coco_json

    ground_truth = ground_truth or records_to_coco_json(records, class_names)
    for image, record in zip(ground_truth["images"], records):
        if record.image_path:
            image["kdet_image_path"] = os.path.abspath(record.image_path)
    _write_json(path, ground_truth)
    return path


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(reports.jsonable(value), f)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError as err:
        raise ValueError(f"{path}: not valid json ({err})") from None


def load_coco(gt, results, gt_name="ground truth", results_name="results"):
    """COCO GT dict and results list (or json paths) -> ``(gts, dets, class_names, image_paths)``.

    Categories sorted by id become classes 0..C-1; ``difficult`` / ``iscrowd``
    objects are ignored; ``image_paths`` holds ``kdet_image_path`` (or None) per image.
    """
    from kdet.boxes import coco_to_xyxy

    if isinstance(gt, (str, os.PathLike)):
        gt, gt_name = _read_json(gt), str(gt)
    if isinstance(results, (str, os.PathLike)):
        results, results_name = _read_json(results), str(results)
    if not isinstance(gt, dict) or not {"images", "annotations", "categories"} <= set(gt):
        raise ValueError(f"{gt_name}: not a COCO detection file (needs images, annotations, categories)")
    categories = sorted(gt["categories"], key=lambda c: c["id"])
    class_names = [str(c["name"]) for c in categories]
    class_of = {c["id"]: k for k, c in enumerate(categories)}
    row_of = {image["id"]: i for i, image in enumerate(gt["images"])}
    objects = [[] for _ in row_of]
    for ann in gt["annotations"]:
        if ann.get("image_id") not in row_of or ann.get("category_id") not in class_of:
            raise ValueError(f"{gt_name}: annotation {ann.get('id')!r} has unknown image_id "
                             f"{ann.get('image_id')!r} or category_id {ann.get('category_id')!r}")
        if not _is_box(ann.get("bbox")):
            raise ValueError(f"{gt_name}: annotation {ann.get('id')!r} has malformed bbox {ann.get('bbox')!r}")
        ignored = bool(ann.get("difficult", 0)) or bool(ann.get("iscrowd", 0))
        objects[row_of[ann["image_id"]]].append((ann["bbox"], class_of[ann["category_id"]], ignored))
    gts = [_image_dict(rows, coco_to_xyxy, "difficult") for rows in objects]
    if isinstance(results, dict) and "annotations" in results:
        results = results["annotations"]
    if not isinstance(results, list):
        raise ValueError(f"{results_name}: expected a list of detections [{{image_id, category_id, bbox, score}}]")
    found = [[] for _ in row_of]
    for n, r in enumerate(results):
        try:
            image_id, category, bbox, score = r["image_id"], r["category_id"], r["bbox"], float(r["score"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{results_name}: entry {n} is not {{image_id, category_id, bbox, score}}: {r!r}") from None
        if image_id not in row_of:
            raise ValueError(f"{results_name}: entry {n} has image_id {image_id!r}, not an image of {gt_name}")
        if category not in class_of:
            raise ValueError(f"{results_name}: entry {n} has category_id {category!r}, not a category of {gt_name}")
        if not _is_box(bbox):
            raise ValueError(f"{results_name}: entry {n} has malformed bbox {bbox!r}")
        found[row_of[image_id]].append((bbox, class_of[category], score))
    dets = [_image_dict(rows, coco_to_xyxy, "scores") for rows in found]
    paths = [image.get("kdet_image_path") for image in gt["images"]]
    return gts, dets, class_names, paths


def _is_box(bbox):
    try:
        return np.shape(np.asarray(bbox, np.float64)) == (4,)
    except (TypeError, ValueError):
        return False


def _image_dict(rows, coco_to_xyxy, third):
    boxes, classes, values = zip(*rows) if rows else ([], [], [])
    return {"boxes": coco_to_xyxy(np.reshape(np.asarray(boxes, np.float64), (-1, 4))),
            "classes": np.asarray(classes, np.int64), third: np.asarray(values, np.float64 if third == "scores" else bool)}


# ------------------------------------------------------------------ the per-class table
def per_class_table(gts, dets, class_names, coco, score_threshold):
    """Rows per class and ``all``: images, instances, P/R/F1 at the threshold, AP50, AP50-95, F1 optimum."""
    prf = reports.precision_recall_f1(gts, dets, class_names, score_threshold=score_threshold)
    rows = {}
    for k, name in enumerate(class_names):
        r = prf["per_class"][name]
        images = sum(1 for g in gts if np.any((g["classes"] == k) & ~g["difficult"]))
        rows[name] = _row(images, r, coco["per_class"].get(name, {}).get("AP50", -1),
                          coco["per_class"].get(name, {}).get("AP", -1))
    rows["all"] = _row(len(gts), prf["overall"], coco["AP50"], coco["AP"])
    return rows


def _row(images, r, ap50, ap):
    none_if_missing = lambda v: None if v is None or v < 0 or (isinstance(v, float) and math.isnan(v)) else float(v)
    return dict(images=int(images), instances=int(r["num_positives"]), detections=int(r["num_detections"]),
                precision=r["precision"], recall=none_if_missing(r["recall"]), f1=r["f1"],
                AP50=none_if_missing(ap50), AP50_95=none_if_missing(ap),
                best_threshold=none_if_missing(r["best_threshold"]), best_precision=r["best_precision"],
                best_recall=r["best_recall"], best_f1=r["best_f1"])


def format_table(rows, score_threshold):
    width = max([len(n) for n in rows] + [8]) + 2
    head = (f"{'class':<{width}}{'images':>7}{'inst':>7}{'P':>7}{'R':>7}{'F1':>7}{'AP50':>7}{'AP50-95':>8}"
            f" | {'F1-opt thr':>10}{'P':>7}{'R':>7}{'F1':>7}")
    lines = [f"at score >= {score_threshold:g} (left) and at each row's F1-optimal threshold (right); "
             "P/R/F1 with VOC matching at IoU 0.5, AP columns exact COCO", head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name[:width - 1]:<{width}}{r['images']:>7}{r['instances']:>7}{_f(r['precision'])}{_f(r['recall'])}"
                     f"{_f(r['f1'])}{_f(r['AP50'])}{_f(r['AP50_95'], 8)} | {_f(r['best_threshold'], 10)}"
                     f"{_f(r['best_precision'])}{_f(r['best_recall'])}{_f(r['best_f1'])}")
    return "\n".join(lines)


def _f(value, width=7):
    return f"{'-':>{width}}" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:>{width}.3f}"


# ------------------------------------------------------------------ P, R, F1 against confidence
def confidence_curves(gts, dets, class_names, iou_threshold=0.5, grid=CONFIDENCE_GRID):
    """``{name or "all": dict(precision, recall, f1)}`` at each confidence of ``grid``.

    At threshold t the detections scoring >= t count; precision is NaN where none does.
    """
    gts, dets = voc.prepare_inputs(gts, dets, class_names)
    curves, pooled = {}, ([], [], 0)
    for c, name in enumerate(class_names):
        match = voc.match_class(gts, dets, c, iou_threshold)
        curves[name] = _curve_at(match["scores"], match["tp"], match["num_positives"], grid)
        pooled = (pooled[0] + [match["scores"]], pooled[1] + [match["tp"]], pooled[2] + match["num_positives"])
    curves["all"] = _curve_at(np.concatenate(pooled[0]), np.concatenate(pooled[1]), pooled[2], grid)
    return curves


def _curve_at(scores, tp, num_positives, grid):
    order = np.argsort(-scores, kind="stable")
    scores, cum_tp = scores[order], np.r_[0, np.cumsum(tp[order])]
    kept = len(scores) - np.searchsorted(scores[::-1], grid, side="left")   # detections with score >= t
    found = cum_tp[kept].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(kept > 0, found / np.maximum(kept, 1), np.nan)
        recall = found / num_positives if num_positives else np.full(len(grid), np.nan)
    f1 = np.nan_to_num(reports.f1_of(np.nan_to_num(precision), np.nan_to_num(recall)))
    return dict(precision=precision, recall=recall, f1=f1)


def plot_confidence_curve(curves, kind, path, grid=CONFIDENCE_GRID):
    """``kind`` in precision / recall / f1 against the confidence threshold, per class and all (bold)."""
    plt = reports.agg_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    label = dict(precision="Precision", recall="Recall", f1="F1")[kind]
    for name, curve in curves.items():
        values = curve[kind]
        if name == "all":
            best = int(np.nanargmax(values)) if np.any(np.isfinite(values)) else 0
            text = (f"all classes {np.nanmax(values):.2f} at {grid[best]:.2f}" if kind == "f1"
                    else "all classes")
            ax.plot(grid, values, color="k", lw=2.5, label=text)
        else:
            ax.plot(grid, values, lw=1, label=name)
    ax.set(xlabel="confidence threshold", ylabel=label, xlim=(0, 1), ylim=(0, 1.02),
           title=f"{label} against confidence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ confusion
def plot_confusion(matrix, class_names, path, normalized, score_threshold):
    """The confusion matrix (counts), or each row divided by its sum (``normalized``)."""
    if normalized:
        sums = matrix.sum(axis=1, keepdims=True)
        values = np.where(sums > 0, matrix / np.maximum(sums, 1), 0.0)
        title = f"Confusion, each row / its total (score >= {score_threshold:.2f})"
        return reports.plot_confusion_matrix(values, class_names, path, title=title, fmt=".2f")
    return reports.plot_confusion_matrix(matrix, class_names, path,
                                         title=f"Confusion at IoU 0.5, score >= {score_threshold:.2f}")


# ------------------------------------------------------------------ results.png from log.csv
def read_log(path):
    """``log.csv`` as ``{column: [float or None per row]}``; empty or unparsable cells are None."""
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {}
    for row in rows:
        for key, value in row.items():
            if key is None:
                continue
            columns.setdefault(key, []).append(_float_or_none(value))
    return columns


def _float_or_none(value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


RESULT_PANELS = (("loss", "training loss"), ("loc", "localisation loss"), ("conf", "classification loss"),
                 ("positives_per_image", "positive anchors / image"), ("val_AP", "val AP (50-95)"),
                 ("val_AP50", "val AP50"))


def plot_results(log, path):
    """Training loss, its parts and val_AP / val_AP50 against epochs; panels without data say so."""
    plt = reports.agg_pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(11, 6), dpi=90)
    epochs = log.get("epoch") or []
    for ax, (key, title) in zip(axes.ravel(), RESULT_PANELS):
        values = log.get(key) or []
        points = [(e + 1 if e is not None else i + 1, v) for i, (e, v) in
                  enumerate(zip(epochs or [None] * len(values), values)) if v is not None]
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
        if points:
            x, y = zip(*points)
            ax.plot(x, y, "o-" if len(points) < 30 else "-", ms=3)
        else:
            ax.text(0.5, 0.5, f"no '{key}' in log.csv", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ gallery
def image_errors(gts, dets, class_names, score_threshold):
    """Per image the confusion-matrix errors (false positives, misses, wrong classes) at the threshold."""
    gts, dets = voc.prepare_inputs(gts, dets, class_names)
    errors = []
    for gt, det in zip(gts, dets):
        matrix = np.zeros((len(class_names) + 1,) * 2, np.int64)
        reports.confuse_image(gt, det, matrix, 0.5, score_threshold)
        errors.append(int(matrix.sum() - np.trace(matrix)))
    return errors


def plot_error_gallery(gts, dets, class_names, image_paths, path, score_threshold, count=6):
    """The ``count`` images with most errors: ground truth green, predictions (score >= threshold) red."""
    plt = reports.agg_pyplot()
    errors = image_errors(gts, dets, class_names, score_threshold)
    order = [i for i in np.argsort(-np.asarray(errors), kind="stable") if errors[i] > 0][:count]
    cols = min(3, max(len(order), 1))
    rows = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.9 * rows + 0.5), dpi=90, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), order):
        _draw_image(ax, gts[i], dets[i], class_names, image_paths[i] if image_paths else None, score_threshold)
        name = os.path.basename(image_paths[i]) if image_paths and image_paths[i] else f"image {i}"
        ax.set_title(f"{name}: {errors[i]} errors", fontsize=9)
    if not order:
        axes[0, 0].text(0.5, 0.5, f"no errors at score >= {score_threshold:.2f}", ha="center", va="center")
    from matplotlib.lines import Line2D

    fig.legend(handles=[Line2D([], [], color="lime", lw=2, label="ground truth"),
                        Line2D([], [], color="red", lw=1.5, ls="--", label=f"prediction (score >= {score_threshold:.2f})")],
               loc="lower center", ncol=2, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))   # room for the titles and the legend
    fig.savefig(path)
    plt.close(fig)
    return path


def _draw_image(ax, gt, det, class_names, image_path, score_threshold):
    import matplotlib.patches as patches

    pixels = _load_pixels(image_path)
    if pixels is not None:
        ax.imshow(pixels)
    else:
        extent = np.concatenate([gt["boxes"], det["boxes"], np.zeros((1, 4))]).max(axis=0)
        ax.set_xlim(0, max(extent[2], 1) * 1.05)
        ax.set_ylim(max(extent[3], 1) * 1.05, 0)
        ax.set_facecolor("0.85")
        ax.text(0.02, 0.02, "image file not found", transform=ax.transAxes, fontsize=7)
    for box, c in zip(gt["boxes"], gt["classes"]):
        ax.add_patch(patches.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec="lime", lw=2))
        ax.text(box[0], box[3], class_names[c], color="lime", fontsize=6, va="top",
                bbox=dict(fc="black", alpha=0.5, lw=0, pad=0.5))
    keep = det["scores"] >= score_threshold
    for box, c, s in zip(det["boxes"][keep], det["classes"][keep], det["scores"][keep]):
        ax.add_patch(patches.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec="red",
                                       lw=1.2, ls="--"))
        ax.text(box[0], box[1], f"{class_names[c]} {s:.2f}", color="red", fontsize=6, va="bottom",
                bbox=dict(fc="white", alpha=0.5, lw=0, pad=0.5))


def _load_pixels(image_path):
    """The image as training saw it (EXIF-oriented, docs/CONVENTIONS.md), or None when it is gone."""
    if not image_path or not os.path.exists(image_path):
        return None
    from kdet.data.records import Record, load_image

    return load_image(Record(None, image_path, 0, 0))


# ------------------------------------------------------------------ findings
def object_sizes_and_found(gts, dets, class_names, thresholds, image_size, image_sizes=None):
    """For every non-ignored object: its size at the input (px, sqrt of area) and whether a
    same-class detection scoring >= its class's threshold matched it (VOC rules, IoU 0.5).

    ``image_sizes``: per image ``(width, height)`` of the original (None: boxes are taken as they are).
    """
    height, width = (image_size, image_size) if isinstance(image_size, (int, float)) else image_size
    scales = [1.0 if not size or not size[0] else math.sqrt(width / size[0] * height / size[1])
              for size in (image_sizes or [None] * len(gts))]
    gts, dets = voc.prepare_inputs(gts, dets, class_names)
    sizes, found, classes = [], [], []
    for c, name in enumerate(class_names):
        scores, best_iou, gt_index, gt_ignored, _ = voc.best_overlaps(gts, dets, c)
        labels = voc.voc_labels(best_iou, gt_index, gt_ignored, 0.5)
        hit = set(gt_index[(labels == 1) & (scores >= thresholds[name])].tolist())
        k = 0
        for gt, scale in zip(gts, scales):   # the same numbering as best_overlaps: image by image
            for box, ignored in zip(gt["boxes"][gt["classes"] == c], gt["difficult"][gt["classes"] == c]):
                if not ignored:
                    sizes.append(math.sqrt(max(box[2] - box[0], 0) * max(box[3] - box[1], 0)) * scale)
                    found.append(k in hit)
                    classes.append(c)
                k += 1
    return np.asarray(sizes), np.asarray(found, bool), np.asarray(classes, np.int64)


def finding_over_detection(table, eval_threshold):
    """Low precision at the evaluation's low threshold next to a much better one at the F1 optimum."""
    low, best = table["all"], table["all"]
    if low["instances"] == 0 or low["detections"] == 0:
        return None
    p_low = low["low_precision"]
    if p_low >= 0.5 or best["best_precision"] < max(2 * p_low, p_low + 0.1):
        return None   # precision is fine at the low threshold, or no better anywhere (a weak detector)
    ap50 = low["AP50"] or 0.0
    text = (f"Over-detection: at the evaluation's score threshold {eval_threshold:g} the detector keeps "
            f"{low['detections']} boxes for {low['instances']} objects ({low['detections'] / max(low['images'], 1):.1f} "
            f"per image), so precision there is {p_low:.2f} (recall {low['low_recall']:.2f}). ")
    if ap50 >= 0.5:
        text += (f"This is the 'precision {p_low:.2f} but mAP {ap50:.2f}' situation: AP ranks all detections and "
                 "only asks that true ones score above false ones, so the many low-score false positives cost "
                 "AP little. ")
    text += (f"At the F1-optimal threshold {best['best_threshold']:.2f} precision is {best['best_precision']:.2f} and "
             f"recall {best['best_recall']:.2f}: use a score threshold near {best['best_threshold']:.2f} when you use "
             "the detections (tools/infer.py, the SavedModel's score_threshold).")
    return text


def finding_weakest_class(table, class_names, preflight, confusion, sizes, found, classes):
    """The class with the lowest AP50 and the evidence for why (count, anchors, size, confusion)."""
    scored = [n for n in class_names if table[n]["AP50"] is not None and table[n]["instances"] > 0]
    if not scored:
        return None
    weakest = min(scored, key=lambda n: table[n]["AP50"])
    others = [n for n in scored if n != weakest]
    ap = table[weakest]["AP50"]
    others_ap = float(np.mean([table[n]["AP50"] for n in others])) if others else None
    if (others_ap is not None and ap >= 0.8 * others_ap - 1e-9) or (others_ap is None and ap >= 0.5):
        return None   # no class stands out (or the only class scores well)
    if others_ap is not None and others_ap < NOTHING_AP50:
        return None   # the others are at noise level too: no class is weaker than another
    k = class_names.index(weakest)
    evidence = _class_evidence(weakest, others, preflight)
    row = confusion[k]
    total = int(row.sum())
    if total:
        j = int(np.argmax(np.r_[row[:k], -1, row[k + 1:]]))
        what = "missed (no detection)" if j == len(class_names) else f"detected as {class_names[j]}"
        if row[j] > 0:
            evidence.append(f"at the all-class F1-optimal threshold its objects are most often {what}: "
                            f"{row[j]} of {total}")
    mine = classes == k
    if mine.any():
        evidence.append(f"at its own F1-optimal threshold {100 * found[mine].mean():.0f}% of its held-out objects are found")
    head = (f"Weakest class: {weakest} (AP50 {ap:.2f}" + (f" vs {others_ap:.2f} for the others)" if others else ")"))
    return head + ". Evidence: " + "; ".join(evidence) + "."


def _class_evidence(name, others, preflight):
    """Count, anchor coverage and size at input of ``name`` against the other classes (preflight.json)."""
    if not preflight:
        return ["no preflight.json in the work dir: training counts and anchor coverage unknown"]
    out = []
    counts = preflight["classes"]
    n = counts[name]["objects"]
    if others:
        median = float(np.median([counts[o]["objects"] for o in others]))
        out.append(f"{n} training objects vs a median of {median:.0f} for the others"
                   + (" (few examples)" if n < 0.5 * median else " (not fewer)"))
    else:
        out.append(f"{n} training objects in {counts[name]['images']} images"
                   + (" (few examples)" if n < 100 else ""))
    cov = preflight["anchor_coverage"]["per_class"][name]
    if cov.get("covered") is not None:
        others_cov = [preflight["anchor_coverage"]["per_class"][o]["covered"] for o in others]
        others_cov = [c for c in others_cov if c is not None]
        note = ""
        if cov["covered"] < 0.9:
            note = " (poorly matched: see preflight.txt for the fix)"
        out.append(f"{100 * cov['covered']:.0f}% of its objects reach the matching IoU "
                   f"{preflight['match_iou']:g} with an anchor, {cov['positives_per_box']:.1f} positive anchors each"
                   + (f" (others {100 * np.mean(others_cov):.0f}%)" if others_cov else "") + note)
    size = preflight["sizes_at_input"].get(name, {})
    if size.get("objects"):
        out.append(f"median size at input {size['p50']:.1f} px, {100 * size['tiny_share']:.0f}% under 8 px")
    return out


def finding_confusion_pairs(confusion, class_names, min_count=3, min_share=0.1):
    """Class pairs often swapped: objects of one class detected as another (labels or look-alikes)."""
    out, reported = [], set()
    n = len(class_names)
    for i in range(n):
        total = int(confusion[i].sum())
        for j in range(n):
            if i == j or total == 0 or (j, i) in reported:
                continue
            count = int(confusion[i, j])
            if count >= min_count and count >= min_share * total:
                reported.add((i, j))
                back = int(confusion[j, i])
                text = (f"Confusion: {count} of {total} {class_names[i]} objects ({100 * count / total:.0f}%) are "
                        f"detected as {class_names[j]}")
                text += (f", and {back} {class_names[j]} as {class_names[i]}" if back else "")
                text += (": look at these images (errors_gallery.png); if the boxes are right, the labels may be "
                         "mixed up, or the two classes look alike at this input size")
                out.append(text)
    return out


def finding_small_objects(sizes, found, image_size, edges=SIZE_EDGES, min_share=0.05):
    """Objects below a size at input that are found much less often than larger ones."""
    if len(sizes) < 5 or not np.any(sizes >= edges[-1]):
        large_recall = None
    else:
        large_recall = float(found[sizes >= edges[-1]].mean())
    for edge in edges:
        small = sizes < edge
        if small.sum() < 3 or small.mean() < min_share:
            continue
        rest = ~small
        small_recall = float(found[small].mean())
        reference = large_recall if large_recall is not None else (float(found[rest].mean()) if rest.any() else None)
        side = image_size if isinstance(image_size, (int, float)) else min(image_size)
        fix = _round_up(side * 2 * edge / max(float(np.median(sizes[small])), 1.0), 32)
        if reference is None:   # every object is below the edge: nothing larger to compare with
            if edge <= 16 and small_recall < 0.5:
                return (f"Small objects: every object is under {edge} px at the input size {image_size} (median "
                        f"{np.median(sizes):.1f} px) and {100 * small_recall:.0f}% of them are found; "
                        f"model.image_size={fix} would bring their median to {2 * edge} px")
            continue
        if small_recall < 0.6 * reference:
            return (f"Small objects: {100 * small.mean():.0f}% of the objects are under {edge} px at the input size "
                    f"{image_size} and {100 * small_recall:.0f}% of them are found, against {100 * reference:.0f}% of the "
                    f"objects of {edges[-1]} px and more; model.image_size={fix} would bring their median to "
                    f"{2 * edge} px (see preflight.txt)")
    return None


def _round_up(value, multiple):
    return int(math.ceil(value / multiple) * multiple)


def finding_fit(train_ap50, val_ap50, log):
    """Over-fitting (train far above held-out, or val_AP falling while the loss falls) or under-fitting."""
    out = []
    if train_ap50 is not None and val_ap50 is not None:
        gap = train_ap50 - val_ap50
        if gap >= 0.1 and train_ap50 >= 1.15 * val_ap50:
            out.append(f"Overfitting: AP50 is {train_ap50:.2f} on training images but {val_ap50:.2f} on the held-out "
                       f"split (gap {gap:.2f}): more data or augmentation, fewer epochs, or weight decay help; "
                       "a bigger model does not")
        elif train_ap50 < 0.5 and gap < 0.1:
            out.append(f"Underfitting: AP50 is only {train_ap50:.2f} on the training images themselves (held-out "
                       f"{val_ap50:.2f}): the model has not learnt the training set; train longer, raise the "
                       "learning rate or the model's width before adding data")
    trend = _val_trend(log)
    if trend and not out:
        out.append(trend)
    elif trend and out[0].startswith("Overfitting"):  # one overfitting finding, with both pieces of evidence
        out[0] += "; and " + trend[len("Overfitting: "):]
    return out  # an underfitting run's val_AP wobble is not called overfitting


def _val_trend(log):
    values = [(i, v) for i, v in enumerate(log.get("val_AP") or []) if v is not None]
    loss = log.get("loss") or []
    if len(values) < 3:
        return None
    best_i, best = max(values, key=lambda p: p[1])
    last_i, last = values[-1]
    if best_i == last_i or last > 0.9 * best or best <= 0:
        return None
    loss_at = lambda i: loss[i] if i < len(loss) else None
    if loss_at(best_i) is None or loss_at(last_i) is None or loss_at(last_i) >= loss_at(best_i):
        return None
    return (f"Overfitting: val_AP peaked at {best:.3f} after epoch {best_i + 1} and fell to {last:.3f} by epoch "
            f"{last_i + 1} while the training loss kept falling ({loss_at(best_i):.3f} -> {loss_at(last_i):.3f}): "
            "best.keras holds the peak; early stopping (train.early_stopping_patience) or more augmentation")


def finding_candidate_cap(nms, table, min_gain=0.005):
    """``eval.pre_nms_top_k`` cut candidates on many images, and the same weights with a wider cap score higher.

    ``nms``: the evaluation's NMS settings with ``candidates`` (per evaluated image, what competes for
    the cap: ``kdet.inference.candidate_counts``) and ``wider`` (:func:`wider_cap_check`: AP and AP50
    of the same detector with a wider cap, or None when the cap did not bind).
    """
    wider = (nms or {}).get("wider")
    ap, ap50 = table["all"]["AP50_95"], table["all"]["AP50"]
    if not wider or ap is None or ap50 is None:
        return None
    gain, gain50 = wider["AP"] - ap, wider["AP50"] - ap50
    if max(gain, gain50) < min_gain:
        return None
    counts = np.asarray(nms["candidates"])
    cap, unit = int(nms["pre_nms_top_k"]), "of one class " if nms.get("per_class_top_k") else ""
    return (f"Candidate cap: on {int((counts > cap).sum())} of {counts.size} images more (anchor, class) pairs "
            f"{unit}scored above eval.score_threshold {nms['score_threshold']:g} than eval.pre_nms_top_k={cap} lets "
            f"into NMS, so objects whose boxes rank below the {cap}th candidate are never detected. The same weights "
            f"with eval.pre_nms_top_k={wider['pre_nms_top_k']} score AP {wider['AP']:.3f} ({gain:+.3f}) and AP50 "
            f"{wider['AP50']:.3f} ({gain50:+.3f}) on these images: set it in the recipe (val_AP, the final evaluation "
            "and the SavedModel export all use it; NMS time grows with it).")


def wider_cap_check(model, recipe, records, ground_truth, candidates, min_share=0.1, factor=4):
    """AP and AP50 of ``model`` on ``records`` with ``factor`` x ``eval.pre_nms_top_k``, when more than
    ``min_share`` of the images have more ``candidates`` than the cap (else None)."""
    from kdet.data.coco import coco_image_ids, to_coco_results
    from kdet.inference import eval_settings, predict_records
    from kdet.metrics.coco import coco_evaluate

    counts, cap = np.asarray(candidates), int(eval_settings(recipe)["pre_nms_top_k"])
    if counts.size == 0 or (counts > cap).mean() < min_share:
        return None
    wider = min(cap * factor, int(counts.max()))
    widened = dict(recipe, eval=dict(recipe.get("eval") or {}, pre_nms_top_k=wider))
    detections = predict_records(model, records, widened)
    coco = coco_evaluate(ground_truth, to_coco_results(coco_image_ids(records), detections))
    return dict(pre_nms_top_k=wider, AP=float(coco["AP"]), AP50=float(coco["AP50"]))


NOTHING_AP50 = 0.05   # every class under this held-out AP50: nothing measurable was learnt


def learnt_nothing(table, class_names):
    """True when every class with held-out objects scores AP50 under ``NOTHING_AP50``."""
    scored = [table[n]["AP50"] for n in class_names if table[n]["AP50"] is not None and table[n]["instances"] > 0]
    return bool(scored) and max(scored) < NOTHING_AP50


def finding_learnt_nothing(table, class_names, run, log, preflight, sizes, image_size):
    """The one finding of a run that learnt nothing: the run's own evidence, most telling first, and the fix."""
    if not learnt_nothing(table, class_names):
        return None
    best = max((n for n in class_names if table[n]["AP50"] is not None and table[n]["instances"] > 0),
               key=lambda n: table[n]["AP50"])
    items = [item for item in (_steps_evidence(run), _loss_evidence(log, run), _size_evidence(sizes, image_size),
                               _anchor_evidence(preflight), _width_evidence(run)) if item]
    items.sort(key=lambda item: item[0])  # (rank, evidence, fix or None): stable, so ties keep this order
    fixes = [fix for _, _, fix in items if fix]
    text = (f"Nothing learnt: held-out AP50 is under {NOTHING_AP50:g} for every class (best {best} "
            f"{table[best]['AP50']:.3f}), so per-class, fit and threshold findings would be noise. Evidence, most "
            "telling first: " + "; ".join(f"({k}) {evidence}" for k, (_, evidence, _) in enumerate(items, 1)) + ".")
    return text + (f" Change first: {fixes[0]}." if fixes else "")


def _steps_evidence(run):
    if not run or not run.get("planned_steps"):
        return None
    done, planned = int(run["steps_done"]), int(run["planned_steps"])
    text = f"{done} of {planned} planned optimizer steps ({done / planned:.0%}), stopped by {run['stopped_by']}"
    if done < 0.5 * planned:
        return 0, text, "let the run use its plan (a longer train.time_budget; early stopping waits for learning)"
    if done < 1000:
        return 0, text + "; a detector trained from scratch needs thousands of steps", (
            "train longer (train.epochs, train.time_budget)")
    return 5, text, None


def _loss_evidence(log, run):
    loss = [v for v in (log or {}).get("loss") or [] if v is not None and math.isfinite(v)]
    if len(loss) < 2:
        return None
    rate = (run or {}).get("learning_rate")
    said = f" at learning rate {rate:g}" if rate else ""
    if loss[-1] > 0.8 * loss[0]:
        fix = (f"the learning rate: try train.learning_rate={rate * 3:.2g} and {rate / 3:.2g}" if rate else
               "the learning rate (train.learning_rate)")
        return 1, f"the training loss barely fell ({loss[0]:.3f} -> {loss[-1]:.3f}{said})", fix
    return 5, f"the training loss fell ({loss[0]:.3f} -> {loss[-1]:.3f}{said}): the model fits something, not yet the objects", None


def _size_evidence(sizes, image_size):
    if sizes is None or not len(sizes):
        return None
    median, tiny = float(np.median(sizes)), float(np.mean(np.asarray(sizes) < SIZE_EDGES[0]))
    side = image_size if isinstance(image_size, (int, float)) else max(image_size)
    text = f"median object size at the input {median:.1f} px ({tiny:.0%} under {SIZE_EDGES[0]} px)"
    if median < SIZE_EDGES[1]:
        larger = _round_up(side * SIZE_EDGES[1] / max(median, 1.0), 32)
        return 2, text, f"a larger input: model.image_size={larger} brings the median object to {SIZE_EDGES[1]} px"
    return 5, text, None


def _anchor_evidence(preflight):
    coverage = [((preflight or {}).get(key) or {}).get("overall", {}).get("covered")
                for key in ("anchor_coverage", "auto_anchor_coverage")]
    coverage = [c for c in coverage if c is not None]
    if not coverage:
        return None
    covered, iou = max(coverage), preflight.get("match_iou", 0.5)
    text = f"{covered:.0%} of the training objects have an anchor at the matching IoU {iou:g}"
    if covered < 0.6:
        return 3, text, "anchors that fit the objects (model.anchor_scales / aspect_ratios = 'auto', preflight.txt)"
    return 5, text, None


def _width_evidence(run):
    if not run or run.get("width_multiplier") is None:
        return None
    width = float(run["width_multiplier"])
    text = f"model {run.get('backbone')} at width {width:g}"
    if width <= 0.25:
        return 4, text + " (small)", f"a wider model (model.width_multiplier={min(1.0, 2 * width):g})"
    return 6, text, None


def findings(table, class_names, confusion, sizes, found, classes, preflight, image_size, eval_threshold,
             train_ap50=None, log=None, nms=None, run=None):
    """All findings that the numbers support, in reading order (a list of sentences).

    A run that learnt nothing gets that one finding alone: the others (weakest class, fit,
    over-detection) compare numbers that are all noise then.
    """
    nothing = finding_learnt_nothing(table, class_names, run, log, preflight, sizes, image_size)
    if nothing:
        return [nothing]
    out = [finding_candidate_cap(nms, table),
           finding_over_detection(table, eval_threshold),
           finding_weakest_class(table, class_names, preflight, confusion, sizes, found, classes)]
    out += finding_confusion_pairs(confusion, class_names)
    out.append(finding_small_objects(sizes, found, image_size))
    out += finding_fit(train_ap50, table["all"]["AP50"], log or {})
    return [text for text in out if text]


# ------------------------------------------------------------------ the whole report
def write_run_report(work_dir, score_threshold=None, out_dir=None, verbose=True, plots=True):
    """Every artefact of the run report from the files in ``work_dir``; returns a dict of results.

    Needs ``ground_truth.json`` and ``test_detections.json``; uses
    ``report_config.json``, ``preflight.json``, ``log.csv`` and the
    ``train_*.json`` pair when present.
    """
    from kdet.metrics.coco import coco_evaluate

    out_dir = out_dir or work_dir
    os.makedirs(out_dir, exist_ok=True)
    join = lambda name: os.path.join(work_dir, name)
    config = _read_json(join(CONFIG_FILE)) if os.path.exists(join(CONFIG_FILE)) else {}
    threshold = float(score_threshold if score_threshold is not None else config.get("score_threshold", 0.25))
    eval_threshold = float(config.get("eval_score_threshold", 0.01))
    ground_truth, results = _read_json(join(GT_FILE)), _read_json(join(DETS_FILE))
    gts, dets, class_names, paths = load_coco(ground_truth, results, join(GT_FILE), join(DETS_FILE))
    image_sizes = [(image.get("width"), image.get("height")) for image in ground_truth["images"]]
    image_size = config.get("image_size") or 300
    coco = coco_evaluate(ground_truth, results)
    table = per_class_table(gts, dets, class_names, coco, threshold)
    low = reports.precision_recall_f1(gts, dets, class_names, score_threshold=eval_threshold)["overall"]
    table["all"].update(low_precision=low["precision"], low_recall=low["recall"])
    best_thresholds = {n: (table[n]["best_threshold"] if table[n]["best_threshold"] is not None else 1.0)
                       for n in class_names}
    best_all = table["all"]["best_threshold"] if table["all"]["best_threshold"] is not None else threshold
    confusion = reports.confusion_matrix(gts, dets, class_names, 0.5, threshold)
    confusion_best = reports.confusion_matrix(gts, dets, class_names, 0.5, best_all)
    sizes, found, classes = object_sizes_and_found(gts, dets, class_names, best_thresholds, image_size,
                                                   image_sizes)
    preflight = _read_json(join("preflight.json")) if os.path.exists(join("preflight.json")) else None
    log = read_log(join("log.csv"))
    train_ap50 = _train_ap50(work_dir)
    found_text = findings(table, class_names, confusion_best, sizes, found, classes, preflight, image_size,
                          eval_threshold, train_ap50=train_ap50, log=log, nms=config.get("nms"), run=config.get("run"))

    out = lambda name: os.path.join(out_dir, name)
    if plots:
        write_plots(out, gts, dets, class_names, paths, confusion, log, threshold)

    text = "\n".join([f"run report: {work_dir} ({len(gts)} evaluated images, input size {image_size})",
                      format_table(table, threshold), "",
                      f"confusion at IoU 0.5, score >= {threshold:g}",
                      reports.format_confusion_matrix(confusion, class_names), "",
                      f"training images' AP50: {'-' if train_ap50 is None else f'{train_ap50:.3f}'} "
                      f"(held-out {_f(table['all']['AP50'], 0).strip()})", "",
                      f"findings ({len(found_text)}):"] + [f"  - {t}" for t in found_text]
                     + (["  (none: no candidate cap, over-detection, weak class, confusion pair, small-object or "
                         "fit problem stands out)"] if not found_text else [])) + "\n"
    with open(out("report.txt"), "w") as f:
        f.write(text)
    _write_json(out("report.json"), dict(score_threshold=threshold, table=table, findings=found_text,
                                         confusion_matrix=confusion.tolist(), class_names=class_names,
                                         train_AP50=train_ap50))
    if verbose:
        logger.info(text.removesuffix("\n"))  # text ends with its newline; the log line adds one
    return dict(table=table, findings=found_text, confusion=confusion, text=text,
                paths={name: out(name) for name in ARTEFACTS})


def write_plots(out, gts, dets, class_names, paths, confusion, log, threshold):
    """Every PNG of the report; ``out(name)`` gives a file's path."""
    reports.plot_pr_curves(reports.pr_curves(gts, dets, class_names), out("PR_curve.png"), threshold)
    curves = confidence_curves(gts, dets, class_names)
    for kind, name in (("f1", "F1_curve.png"), ("precision", "P_curve.png"), ("recall", "R_curve.png")):
        plot_confidence_curve(curves, kind, out(name))
    plot_confusion(confusion, class_names, out("confusion_matrix.png"), False, threshold)
    plot_confusion(confusion, class_names, out("confusion_matrix_normalized.png"), True, threshold)
    plot_results(log, out("results.png"))
    plot_error_gallery(gts, dets, class_names, paths, out("errors_gallery.png"), threshold)


def _train_ap50(work_dir):
    gt_path, dets_path = os.path.join(work_dir, TRAIN_GT_FILE), os.path.join(work_dir, TRAIN_DETS_FILE)
    if not (os.path.exists(gt_path) and os.path.exists(dets_path)):
        return None
    from kdet.metrics.coco import coco_evaluate

    return float(coco_evaluate(gt_path, dets_path)["AP50"])


def after_training(run):
    """The training run's post-training step (``kdet.engine.post_training_steps``): the run report of
    ``run`` (a ``kdet.engine.FinishedRun``), written into its work dir."""
    return report_after_training(run.model, run.recipe, run.work_dir, run.class_names, run.test_records,
                                 run.ground_truth, run.results, train_records=run.train_records, run=run.summary)


def report_after_training(model, recipe, work_dir, class_names, test_records, ground_truth, results,
                          train_records=None, run=None):
    """What ``engine.finish`` calls after the final evaluation: store the inputs, then the report.

    ``run``: what the training did against its plan (``kdet.engine``'s run summary), for the findings."""
    from kdet.data.coco import coco_image_ids, records_to_coco_json, to_coco_results
    from kdet.inference import candidate_counts, eval_settings, predict_records

    eval_cfg = recipe.get("eval", {})
    ground_truth = ground_truth or records_to_coco_json(test_records, class_names)
    save_ground_truth(os.path.join(work_dir, GT_FILE), test_records, class_names, ground_truth)
    nms = dict(eval_settings(recipe), candidates=candidate_counts(model, test_records, recipe))
    nms["wider"] = wider_cap_check(model, recipe, test_records, ground_truth, nms["candidates"])
    _write_json(os.path.join(work_dir, CONFIG_FILE), dict(
        class_names=list(class_names), image_size=recipe["model"].get("image_size", 300),
        score_threshold=float(eval_cfg.get("report_score_threshold", 0.25)),
        eval_score_threshold=float(nms["score_threshold"]),
        nms=nms,
        match_iou=float(recipe.get("loss", {}).get("iou_threshold", 0.5)),
        anchor_scales=recipe["model"].get("anchor_scales"), aspect_ratios=recipe["model"].get("aspect_ratios"),
        run=run))
    sample = training_sample(train_records, int(eval_cfg.get("report_train_images", 200)),
                             seed=int(recipe.get("train", {}).get("seed") or 0))
    if sample:
        detections = predict_records(model, sample, recipe)
        save_ground_truth(os.path.join(work_dir, TRAIN_GT_FILE), sample, class_names)
        _write_json(os.path.join(work_dir, TRAIN_DETS_FILE), to_coco_results(coco_image_ids(sample), detections))
    return write_run_report(work_dir)


def training_sample(train_records, count, seed=0):
    """Up to ``count`` distinct training records (repeat-factor copies removed), seeded."""
    if not train_records or count <= 0:
        return []
    unique = list({id(r): r for r in train_records}.values())
    unique = list({(r.image_id, r.image_path): r for r in unique}.values())
    if len(unique) <= count:
        return unique
    rng = np.random.default_rng(seed)
    return [unique[i] for i in sorted(rng.choice(len(unique), count, replace=False))]
