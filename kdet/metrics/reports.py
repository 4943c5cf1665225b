"""Reports that explain a detection score: P/R/F1 at thresholds, PR curves, confusion.

Host-side numpy (and matplotlib with the Agg backend for PNGs). Inputs are
those of ``kdet.metrics.voc``: ``gts`` one Record or dict per image (``boxes
[N, 4]`` pixel ``xyxy``, ``classes [N]`` 0-based, ``difficult [N]`` bool) and
``dets`` one dict per image in the same order (``boxes [K, 4]`` in the same
units, ``scores [K]``, ``classes [K]``); ``voc.detections_from_padded`` adapts
the model's padded output. Matching is VOC's (see ``kdet.metrics.voc``).

Why "precision 0.01 but mAP 0.95" is no contradiction: AP integrates precision
over the whole ranked list, so it only cares that true detections score above
false ones. Precision and recall are taken at *one* confidence threshold. A
detector that keeps hundreds of low-score boxes per image has near-zero
precision at threshold 0.01 and yet a high AP; its precision at a sensible
threshold (or at the F1-optimal one reported here) is what a user of the
detections will see.
"""

import json
import os

import numpy as np

from kdet.boxes import iou_matrix_np
from kdet.metrics import voc


# ------------------------------------------------------- precision / recall / F1
def f1_of(precision, recall):
    total = precision + recall
    return np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)


def _at_threshold(scores, tp, num_positives, score_threshold):
    """Counts and P/R/F1 of the detections scoring ``>= score_threshold``."""
    kept = scores >= score_threshold
    n_tp = int(tp[kept].sum())
    n_fp = int(kept.sum()) - n_tp
    precision = n_tp / (n_tp + n_fp) if n_tp + n_fp else 0.0
    recall = n_tp / num_positives if num_positives else float("nan")
    return dict(tp=n_tp, fp=n_fp, fn=num_positives - n_tp, precision=precision,
                recall=recall, f1=float(f1_of(precision, np.nan_to_num(recall))))


def _best_f1(scores, tp, num_positives):
    """The threshold (one of the scores) with the highest F1, and its P/R/F1.

    Only the last detection of each run of equal scores is a valid cut: a
    threshold keeps all detections with that score or none.
    """
    if len(scores) == 0 or num_positives == 0:
        return dict(threshold=float("nan"), precision=0.0, recall=0.0, f1=0.0)
    order = np.argsort(-scores, kind="stable")
    scores, tp = scores[order], tp[order]
    cum_tp = np.cumsum(tp)
    precision = cum_tp / np.arange(1, len(tp) + 1)
    recall = cum_tp / num_positives
    cuts = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    f1 = f1_of(precision[cuts], recall[cuts])
    best = cuts[int(np.argmax(f1))]
    return dict(threshold=float(scores[best]), precision=float(precision[best]),
                recall=float(recall[best]), f1=float(f1.max()))


def _summary(scores, tp, num_positives, score_threshold):
    row = dict(num_positives=int(num_positives), num_detections=int(len(scores)))
    row.update(_at_threshold(scores, tp, num_positives, score_threshold))
    row.update({f"best_{k}": v for k, v in _best_f1(scores, tp, num_positives).items()})
    return row


def precision_recall_f1(gts, dets, class_names, score_threshold=0.5, iou_threshold=0.5,
                        use_07_metric=False):
    """Precision, recall and F1 at ``score_threshold`` and at the F1-optimal threshold.

    Returns dict ``per_class`` {name: row} and ``overall`` (micro: counts summed
    over classes, one shared best threshold). A row holds ``num_positives``,
    ``num_detections`` (all scores), ``tp, fp, fn, precision, recall, f1`` at
    the threshold, ``best_threshold, best_precision, best_recall, best_f1``
    and ``AP`` (``overall``: ``mAP``). Recall is NaN for a class without
    positives; precision is 0 when nothing passes the threshold.
    """
    gts, dets = voc.prepare_inputs(gts, dets, class_names)
    per_class, all_scores, all_tp, total_positives = {}, [], [], 0
    for c, name in enumerate(class_names):
        match = voc.match_class(gts, dets, c, iou_threshold)
        row = _summary(match["scores"], match["tp"], match["num_positives"], score_threshold)
        row["AP"] = voc.class_ap(match, use_07_metric)
        per_class[name] = row
        all_scores.append(match["scores"])
        all_tp.append(match["tp"])
        total_positives += match["num_positives"]
    overall = _summary(np.concatenate(all_scores), np.concatenate(all_tp), total_positives,
                       score_threshold)
    overall["mAP"] = voc.mean_ignoring_nan(row["AP"] for row in per_class.values())
    return dict(per_class=per_class, overall=overall, score_threshold=float(score_threshold),
                iou_threshold=float(iou_threshold))


def format_precision_recall(result):
    """Printable table of ``precision_recall_f1``'s result."""
    t = result["score_threshold"]
    header = (f"{'class':<14}{'GT':>6}{'dets':>7}{'AP':>7} | {'TP':>6}{'FP':>7}{'FN':>6}"
              f"{'P':>7}{'R':>7}{'F1':>7} | {'best thr':>9}{'P':>7}{'R':>7}{'F1':>7}")
    lines = [f"IoU {result['iou_threshold']:.2f}; left: at score >= {t:g}; "
             "right: at the F1-optimal score threshold",
             "GT: objects (difficult excluded); dets: all detections, any score", header, "-" * len(header)]
    rows = list(result["per_class"].items()) + [("all (micro)", result["overall"])]
    for name, r in rows:
        ap = r.get("AP", r.get("mAP"))
        lines.append(
            f"{name[:13]:<14}{r['num_positives']:>6}{r['num_detections']:>7}{ap:>7.3f} | "
            f"{r['tp']:>6}{r['fp']:>7}{r['fn']:>6}{r['precision']:>7.3f}{r['recall']:>7.3f}"
            f"{r['f1']:>7.3f} | {r['best_threshold']:>9.3f}{r['best_precision']:>7.3f}"
            f"{r['best_recall']:>7.3f}{r['best_f1']:>7.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ PR curves
def pr_curves(gts, dets, class_names, iou_threshold=0.5, use_07_metric=False):
    """Per class {name: dict(recall, precision, scores, AP)} along the ranked detections."""
    gts, dets = voc.prepare_inputs(gts, dets, class_names)
    curves = {}
    for c, name in enumerate(class_names):
        match = voc.match_class(gts, dets, c, iou_threshold)
        precision, recall = voc.precision_recall(match)
        curves[name] = dict(recall=recall, precision=precision, scores=match["scores"],
                            AP=voc.class_ap(match, use_07_metric))
    return curves


def agg_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(curves, path, score_threshold=None, title=None):
    """Save the PR curves of ``pr_curves`` as a PNG, AP in the legend.

    With ``score_threshold`` each curve gets a dot at that operating point.
    """
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    for name, curve in curves.items():
        recall, precision = curve["recall"], curve["precision"]
        if len(recall) == 0 or np.isnan(curve["AP"]):
            ax.plot([], [], label=f"{name} (no {'positives' if np.isnan(curve['AP']) else 'detections'})")
            continue
        # Solid: the monotone envelope that AP integrates; thin: the raw curve.
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        line, = ax.plot(np.r_[0, recall], np.r_[envelope[0], envelope], drawstyle="steps-pre",
                        label=f"{name} AP={curve['AP']:.3f}")
        ax.plot(recall, precision, lw=0.7, alpha=0.5, color=line.get_color())
        if score_threshold is not None:
            kept = np.flatnonzero(curve["scores"] >= score_threshold)
            if len(kept):
                ax.plot(recall[kept[-1]], precision[kept[-1]], "o", color=line.get_color())
    aps = [c["AP"] for c in curves.values() if not np.isnan(c["AP"])]
    mean_ap = f"mAP={np.mean(aps):.3f}" if aps else "mAP undefined"
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.02),
           title=title or f"Precision-recall ({mean_ap})")
    if score_threshold is not None:
        ax.plot([], [], "ko", label=f"score >= {score_threshold:g}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------- confusion matrix
def confusion_matrix(gts, dets, class_names, iou_threshold=0.5, score_threshold=0.25):
    """Class confusion with a background row and column, as int64 ``[C+1, C+1]``.

    Rows: ground-truth class, last row "background" (detections that match
    no object: false positives). Columns: predicted class, last column
    "background" (objects no detection found: misses). Per image, detections
    with ``score >= score_threshold`` are first matched within their class
    by VOC's rules (the diagonal equals the true positives of
    ``precision_recall_f1``); the leftovers are then paired with leftover
    objects of *other* classes, highest IoU first, at ``IoU >= iou_threshold``.
    Difficult objects, and detections VOC ignores on them, are not counted.
    """
    gts, dets = voc.prepare_inputs(gts, dets, class_names)
    bg = len(class_names)
    matrix = np.zeros((bg + 1, bg + 1), np.int64)
    for gt, det in zip(gts, dets):
        confuse_image(gt, det, matrix, iou_threshold, score_threshold)
    return matrix


def confuse_image(gt, det, matrix, iou_threshold, score_threshold):
    bg = len(matrix) - 1
    keep = det["scores"] >= score_threshold
    order = np.flatnonzero(keep)[np.argsort(-det["scores"][keep], kind="stable")]
    d_boxes, d_classes = det["boxes"][order], det["classes"][order]
    gt_free = ~gt["difficult"]  # objects still to be found
    det_free = np.ones(len(order), bool)  # detections not yet explained
    # 1. Same-class VOC matching (detections in score order).
    for c in np.unique(d_classes):
        d_idx = np.flatnonzero(d_classes == c)
        g_idx = np.flatnonzero(gt["classes"] == c)
        if len(g_idx) == 0:
            continue
        iou = iou_matrix_np(d_boxes[d_idx], gt["boxes"][g_idx])
        j = iou.argmax(axis=1)
        labels = voc.voc_labels(iou[np.arange(len(j)), j], j, gt["difficult"][g_idx][j], iou_threshold)
        det_free[d_idx[labels != 0]] = False  # matched (1) or ignored on a difficult object (-1)
        gt_free[g_idx[j[labels == 1]]] = False
        matrix[c, c] += int((labels == 1).sum())
    # 2. Leftover detections against leftover objects of another class, best IoU first.
    d_idx, g_idx = np.flatnonzero(det_free), np.flatnonzero(gt_free)
    if len(d_idx) and len(g_idx):
        iou = iou_matrix_np(d_boxes[d_idx], gt["boxes"][g_idx])
        iou[d_classes[d_idx][:, None] == gt["classes"][g_idx][None, :]] = -1
        for flat in np.argsort(-iou, axis=None, kind="stable"):
            i, j = np.unravel_index(flat, iou.shape)
            if iou[i, j] < iou_threshold:
                break
            if det_free[d_idx[i]] and gt_free[g_idx[j]]:
                det_free[d_idx[i]] = gt_free[g_idx[j]] = False
                matrix[gt["classes"][g_idx[j]], d_classes[d_idx[i]]] += 1
    # 3. What is left: false positives (background row) and misses (background column).
    np.add.at(matrix, (bg, d_classes[det_free]), 1)
    np.add.at(matrix, (gt["classes"][gt_free], bg), 1)


def format_confusion_matrix(matrix, class_names):
    """Printable confusion matrix (rows: ground truth, columns: prediction)."""
    names = [n[:11] for n in class_names] + ["background"]
    width = max(11, max(len(n) for n in names)) + 1
    lines = ["rows: ground truth, columns: predicted; background row = false positives, "
             "background column = missed objects",
             "GT \\ pred".ljust(width) + "".join(f"{n:>{width}}" for n in names)]
    for name, row in zip(names, matrix):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}d}" for v in row))
    return "\n".join(lines)


def plot_confusion_matrix(matrix, class_names, path, title=None, fmt="d"):
    """Save the confusion matrix as a PNG heat map with the values written in (``fmt``: their format)."""
    plt = agg_pyplot()
    names = list(class_names) + ["background"]
    size = 3.5 + 0.6 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right")
    ax.set_yticks(ticks, names)
    ax.set(xlabel="predicted", ylabel="ground truth", title=title or "Confusion matrix")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                color="white" if v > threshold else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------- the report
def write_report(gts, dets, class_names, out_dir, score_threshold=0.25, iou_threshold=0.5,
                 use_07_metric=False):
    """Write ``report.txt``, ``metrics.json``, ``pr_curves.png`` and
    ``confusion_matrix.png`` into ``out_dir``; return their paths and the metrics."""
    os.makedirs(out_dir, exist_ok=True)
    gts, dets = voc.prepare_inputs(gts, dets, class_names)
    evaluation = voc.voc_evaluate(gts, dets, class_names, iou_threshold, use_07_metric)
    map50_95 = voc.mAP50_95(gts, dets, class_names)
    prf = precision_recall_f1(gts, dets, class_names, score_threshold, iou_threshold, use_07_metric)
    matrix = confusion_matrix(gts, dets, class_names, iou_threshold, score_threshold)
    curves = pr_curves(gts, dets, class_names, iou_threshold, use_07_metric)

    metric = "11-point (VOC2007)" if use_07_metric else "all-point (VOC2010+)"
    text = "\n".join([
        f"images: {len(gts)}   classes: {len(class_names)}",
        f"mAP@{iou_threshold:.2f} ({metric}): {evaluation['mAP']:.4f}",
        f"mAP50-95 (all-point, VOC matching, not COCO AP): {map50_95:.4f}",
        "",
        format_precision_recall(prf),
        "",
        f"confusion at IoU {iou_threshold:.2f}, score >= {score_threshold:g}",
        format_confusion_matrix(matrix, class_names),
        "",
        "AP ranks all detections; P/R/F1 count only those above a threshold: many low-score",
        "false positives give low precision at a low threshold without lowering AP much.",
    ]) + "\n"
    paths = dict(report=os.path.join(out_dir, "report.txt"),
                 metrics=os.path.join(out_dir, "metrics.json"),
                 pr_curves=os.path.join(out_dir, "pr_curves.png"),
                 confusion_matrix=os.path.join(out_dir, "confusion_matrix.png"))
    with open(paths["report"], "w") as f:
        f.write(text)
    metrics = dict(voc=evaluation, mAP50_95=map50_95, precision_recall_f1=prf,
                   confusion_matrix=matrix.tolist(), class_names=list(class_names))
    with open(paths["metrics"], "w") as f:
        json.dump(jsonable(metrics), f, indent=1)
    plot_pr_curves(curves, paths["pr_curves"], score_threshold)
    plot_confusion_matrix(matrix, class_names, paths["confusion_matrix"],
                          f"Confusion at IoU {iou_threshold:.2f}, score >= {score_threshold:g}")
    return dict(paths=paths, text=text, metrics=metrics)


def jsonable(value):
    """NaN -> None and numpy scalars -> Python, so the json is strict."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
