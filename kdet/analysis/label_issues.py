"""Model-assisted label review: rank the annotations that are probably wrong.

A model scores its own training labels as right, so every training image is
predicted by a model that did not see it: K-fold cross-prediction (seeded folds
over the training images; each fold's model is trained with the recipe through
``kdet.build``'s building blocks, or given as a trained ``.keras`` file). The
labels are then compared with those out-of-fold predictions (pixel boxes,
scores, classes per image, as ``kdet.inference.predict_records`` returns them).

Notation for one image: labelled boxes ``b_i`` with class ``c_i``; detections
``d_j`` with score ``s_j`` and class ``k_j``; ``IoU_ij`` their overlap.
``MATCH`` = 0.5 (``match_iou``), ``LOOSE`` = 0.1. ``s_j`` is the model's score
*calibrated* per class (:func:`score_calibration`): the share of that class's
out-of-fold detections at that score that a label matches, so a model that
detects a class everywhere at 0.8 counts for less than one that is right when
sure (classes with fewer than 50 detections keep the raw score).

* ``support(i)`` = max ``s_j`` over same-class detections with ``IoU_ij >= MATCH``:
  how sure the models are that label ``i`` is right as drawn.
* ``wrong_class``: ``max s_j`` over other-class detections with ``IoU_ij >= MATCH``,
  times ``1 - support(i)``. ``suggested_class`` is that detection's class.
* ``bad_box``: ``max s_j`` over same-class detections with
  ``LOOSE <= IoU_ij < MATCH`` that no other label of that class matches at
  ``MATCH`` and that overlaps label ``i`` more than any other label of its
  class (a neighbour's detection is not a better box for this one), times
  ``1 - support(i)``. ``suggested_box`` is that detection.
* ``spurious``: ``(1 - seen(i)) * recall(c_i)``, where ``seen(i)`` is the best
  score of any detection with ``IoU_ij >= LOOSE`` whatever its class, leaving
  out those another label matches (class and IoU >= MATCH) unless they match
  ``i`` too: the models see nothing there; and ``recall(c)`` is the share of class-``c``
  labels in the data with ``support >= 0.5``: a class the models rarely find
  makes "not found" weak evidence.
* ``missing``: a detection that no label (of any class, ignored ones included)
  overlaps at ``MATCH`` and that is not the suggested box of a ``bad_box``
  overlapping it at ``MATCH / 2`` or more: ``s_j * (1 - max_i IoU_ij)``.
  Such detections are de-duplicated across classes (IoU >= MATCH keeps the
  highest score). ``box`` is the detection.

Each label gets one entry, of its highest-scoring kind; labels marked
difficult / iscrowd are not judged (they still explain detections). Scores lie
in [0, 1]. The geometric findings of :mod:`kdet.data.audit` join the same list:
``degenerate`` and ``out_of_image`` with score 1 (certain), ``duplicate``
(the later box of a pair) with the pair's IoU.

cleanlab.object_detection (compared on the same predictions by
``tools/benchmark_label_issues.py``) is not a dependency, and the evidence is
mixed: it has no "box on nothing" kind and gives no suggested class or box,
and counts only predictions above ``high_probability_threshold`` (0.95 by
default). On the hand-made cases of ``tests/test_label_issues.py`` it found
only the shifted box; with perfect stand-in predictions on BCCD with injected
noise it recalled 47% of the errors in the top 2N (76% at threshold 0.5)
against 96% here. But with the out-of-fold predictions of weak models
(2 folds, 20 epochs from scratch at 224 px, which found almost no RBC or
Platelets) it recalled 23% against 11% here: its ranking degrades less when
the models are poor, mainly because this module's ``missing`` entries (the
models' false positives) filled the top of the list.

Entries (``label_issues.json``): ``file`` (the annotation file, else the image
file), ``image_id``, ``object`` (0-based index in that file's annotation
order; ``None`` for ``missing``), ``box`` (pixel xyxy of the label, or the
detection for ``missing``), ``class``, ``issue``, ``score``, and
``suggested_class`` / ``suggested_box`` where they apply.
"""

import json
import os
import time
from pathlib import Path

import numpy as np

from kdet.boxes import iou_matrix_np
from kdet.log import fit_verbose, get_logger

logger = get_logger(__name__)

MODEL_KINDS = ("missing", "spurious", "wrong_class", "bad_box")
GEOMETRIC_KINDS = ("degenerate", "out_of_image", "duplicate")
ISSUE_KINDS = GEOMETRIC_KINDS + MODEL_KINDS
MATCH_IOU = 0.5
LOOSE_IOU = 0.1
ENTRY_FIELDS = ("file", "image_id", "object", "box", "class", "issue", "score")
PRIVATE = "_detail"  # entry key with display-only details; never written to json


# ------------------------------------------------------------------ cross-validated predictions
def make_folds(num_images, folds=3, seed=0):
    """``folds`` disjoint lists of image indices covering ``range(num_images)`` (seeded, sorted)."""
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    if num_images < folds:
        raise ValueError(f"{num_images} training images cannot be split into {folds} folds")
    order = np.random.default_rng(seed).permutation(num_images)
    return [sorted(int(i) for i in part) for part in np.array_split(order, folds)]


def train_fold_model(recipe, class_names, records, seed=0, on_epoch_end=None, verbose=0):
    """A fresh model of the recipe trained on ``records`` (the recipe's optimizer, loss, augmentation)."""
    import keras
    import tensorflow as tf

    from kdet import build
    from kdet.errors import UserError
    from kdet.training.callbacks import StopOnNonFiniteLoss

    if recipe["train"].get("time_budget"):  # a fold trains train.epochs; the budget is the main run's
        recipe = dict(recipe, train=dict(recipe["train"], time_budget=None))
    batch_size = recipe["data"]["batch_size"]
    records = build.oversampled(recipe, records, class_names)
    steps = len(records) // batch_size
    if steps < 1:
        raise UserError(f"a fold has {len(records)} training images, fewer than one batch ({batch_size}); "
                        f"use fewer folds or a smaller data.batch_size")
    keras.utils.set_random_seed(int(seed))
    dataset = build.build_train_dataset(recipe, records, seed=seed).apply(
        tf.data.experimental.assert_cardinality(steps))
    model = build.build_model(recipe, class_names)
    build.compile_model(recipe, model, class_names, records, steps, verbose=False, loss_parts=False)
    callbacks = [StopOnNonFiniteLoss(raise_error=True)] + build.freezing_callbacks(recipe["train"])
    if on_epoch_end is not None:
        import keras as _k

        callbacks.append(_k.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: on_epoch_end(epoch)))
    model.fit(dataset, epochs=int(recipe["train"]["epochs"]), callbacks=callbacks, verbose=fit_verbose(verbose),
              shuffle=False)  # the dataset shuffles itself
    return model


def cross_predict(recipe, class_names, records, folds=3, seed=0, models=None, save_dir=None, reuse=False,
                  log=None):
    """Out-of-fold detections for every record: ``(predictions, fold_of_image)``.

    ``models``: None trains one model per fold; one path predicts every image
    with that model (it must not have seen them); K paths are the K folds'
    models (model k predicts fold k, folds as :func:`make_folds` with ``seed``).
    ``save_dir`` keeps the trained fold models as ``fold{k}.keras``; with
    ``reuse`` a fold whose model is already there is not trained again.
    """
    log = log or logger.info  # kdet's logger (kdet.log) unless the caller gives its own
    import keras

    from kdet.inference import predict_records

    if models and len(models) == 1:
        log(f"predicting {len(records)} images with {models[0]} (it must not have been trained on them)")
        model = keras.models.load_model(models[0])
        return predict_records(model, records, recipe), [0] * len(records)
    k = len(models) if models else folds
    parts = make_folds(len(records), k, seed)
    fold_of = [0] * len(records)
    predictions = [None] * len(records)
    epochs = int(recipe["train"]["epochs"])
    if not models:
        if recipe["train"].get("time_budget"):
            log(f"train.time_budget is for the main run: each fold trains train.epochs = {epochs} epochs")
        log(f"cross-prediction: {k} folds, each model trained for {epochs} epochs on about "
            f"{len(records) - len(records) // k} images and predicting the other {len(records) // k}; "
            f"a time estimate follows the second epoch")
    started = time.time()
    for f, part in enumerate(parts):
        held_out = [records[i] for i in part]
        if models:
            model = keras.models.load_model(models[f])
        else:
            held = set(part)
            train_part = [records[i] for i in range(len(records)) if i not in held]
            saved = os.path.join(save_dir, f"fold{f}.keras") if save_dir is not None else None
            if saved and reuse and os.path.isfile(saved):
                log(f"fold {f + 1}/{k}: reusing {saved}")
                model = keras.models.load_model(saved)
            else:
                model = train_fold_model(recipe, class_names, train_part, seed=seed + f,
                                         on_epoch_end=_time_estimator(f, k, epochs, log) if f == 0 else None)
                if saved:
                    model.save(saved)
        for i, pred in zip(part, predict_records(model, held_out, recipe)):
            predictions[i], fold_of[i] = pred, f
        elapsed = time.time() - started
        if not models and f < k - 1:
            log(f"fold {f + 1}/{k} done after {elapsed / 60:.1f} min; about "
                f"{elapsed / (f + 1) * (k - f - 1) / 60:.0f} min to go")
    log(f"cross-prediction of {len(records)} images took {(time.time() - started) / 60:.1f} min")
    return predictions, fold_of


def _time_estimator(fold, folds, epochs, log):
    """An ``on_epoch_end(epoch)`` that prints the folds' expected time once (the first epoch includes compiling)."""
    started = time.time()
    ends = []

    def on_epoch_end(epoch):
        ends.append(time.time() - started)
        if len(ends) == min(2, epochs):
            per_epoch = ends[-1] - ends[0] if len(ends) == 2 else ends[0]
            total = folds * (ends[0] + per_epoch * (epochs - 1))
            log(f"epoch time {per_epoch:.0f} s (first epoch {ends[0]:.0f} s with compiling): "
                f"the {folds} folds will take about {total / 60:.0f} min")

    return on_epoch_end


def save_predictions(path, records, predictions, fold_of=None):
    """Out-of-fold predictions as json (pixel boxes), to rescore without training (``--predictions``)."""
    rows = []
    for n, (record, pred) in enumerate(zip(records, predictions)):
        rows.append(dict(image_id=record.image_id, fold=None if fold_of is None else int(fold_of[n]),
                         boxes=np.round(np.asarray(pred["boxes"], float), 2).tolist(),
                         scores=np.round(np.asarray(pred["scores"], float), 5).tolist(),
                         classes=np.asarray(pred["classes"], int).tolist()))
    Path(path).write_text(json.dumps(rows))


def load_predictions(path, records):
    """Predictions written by :func:`save_predictions`, in the order of ``records``."""
    by_id = {str(row["image_id"]): row for row in json.loads(Path(path).read_text())}
    missing = [r.image_id for r in records if str(r.image_id) not in by_id]
    if missing:
        raise ValueError(f"{path}: no predictions for {len(missing)} images (e.g. {missing[0]!r})")
    return [dict(boxes=np.asarray(by_id[str(r.image_id)]["boxes"], np.float32).reshape(-1, 4),
                 scores=np.asarray(by_id[str(r.image_id)]["scores"], np.float32),
                 classes=np.asarray(by_id[str(r.image_id)]["classes"], np.int32)) for r in records]


# ------------------------------------------------------------------ scoring
def _where(record):
    """``(file, object indices)`` of a record: the annotation file and each box's index in it."""
    file = record.annotation_path or record.image_path or str(record.image_id)
    index = record.object_index if record.object_index is not None else np.arange(len(record.boxes))
    return file, [int(i) for i in index]


def _entry(record, file, obj, box, cls, issue, score, class_names, detail, **suggested):
    entry = {"file": file, "image_id": record.image_id, "object": obj,
             "box": [round(float(v), 2) for v in box], "class": class_names[int(cls)],
             "issue": issue, "score": round(float(np.clip(score, 0.0, 1.0)), 4)}
    if "suggested_class" in suggested:
        entry["suggested_class"] = class_names[int(suggested["suggested_class"])]
    if "suggested_box" in suggested:
        entry["suggested_box"] = [round(float(v), 2) for v in suggested["suggested_box"]]
    entry[PRIVATE] = detail
    return entry


def class_recall(records, predictions, num_classes, match_iou=MATCH_IOU, confident=0.5):
    """Per class, the share of (non-ignored) labels that a same-class detection with score >= ``confident`` matches."""
    found, total = np.zeros(num_classes), np.zeros(num_classes)
    for record, pred in zip(records, predictions):
        keep = ~record.ignore
        if not keep.any():
            continue
        support = _support(record.boxes[keep], record.classes[keep], pred, match_iou)
        np.add.at(total, record.classes[keep], 1)
        np.add.at(found, record.classes[keep], support >= confident)
    return np.where(total > 0, found / np.maximum(total, 1), 1.0)


def score_calibration(records, predictions, num_classes, match_iou=MATCH_IOU, min_detections=50):
    """Per class, a monotone map from a detection's score to how often such detections are labelled objects.

    For every out-of-fold detection of class ``c``: did a (non-ignored)
    class-``c`` label overlap it at ``match_iou``? The share of yes, as a
    non-decreasing function of the score (isotonic regression, pool adjacent
    violators), is that class's precision at that score. Weak or over-eager
    models (a class detected everywhere at 0.8) then weigh less than models
    that are right when confident. Returns ``[(scores, precision) or None]``;
    None (the raw score is used) for a class with fewer than ``min_detections``.
    """
    scores = [[] for _ in range(num_classes)]
    hits = [[] for _ in range(num_classes)]
    for record, pred in zip(records, predictions):
        det_boxes = np.asarray(pred["boxes"], np.float64).reshape(-1, 4)
        det_classes = np.asarray(pred["classes"], int).reshape(-1)
        det_scores = np.asarray(pred["scores"], np.float64).reshape(-1)
        keep = ~np.asarray(record.ignore, bool)
        boxes, classes = np.asarray(record.boxes, np.float64).reshape(-1, 4)[keep], np.asarray(record.classes)[keep]
        iou = iou_matrix_np(boxes, det_boxes) if len(boxes) and len(det_boxes) else np.zeros((len(boxes), len(det_boxes)))
        matched = ((iou >= match_iou) & (classes[:, None] == det_classes[None, :])).any(axis=0)
        for c, s, hit in zip(det_classes, det_scores, matched):
            if 0 <= c < num_classes:
                scores[c].append(s)
                hits[c].append(float(hit))
    return [_isotonic(np.asarray(s), np.asarray(h)) if len(s) >= min_detections else None
            for s, h in zip(scores, hits)]


def _isotonic(x, y):
    """``(knots, values)`` of the non-decreasing least-squares fit of ``y`` on ``x`` (pool adjacent violators)."""
    x, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)  # equal scores: one block
    y = np.bincount(inverse.reshape(-1), weights=y) / counts
    means, weights, ends = [], [], []
    for xi, yi, wi in zip(x, y, counts):
        means.append(yi)
        weights.append(float(wi))
        ends.append(xi)
        while len(means) > 1 and means[-2] > means[-1]:
            w = weights[-2] + weights[-1]
            means[-2] = (means[-2] * weights[-2] + means[-1] * weights[-1]) / w
            weights[-2] = w
            ends[-2] = ends[-1]
            del means[-1], weights[-1], ends[-1]
    return np.asarray(ends), np.asarray(means)


def calibrated(scores, classes, calibration):
    """Detection scores mapped through :func:`score_calibration` (unchanged where a class has no map)."""
    scores = np.asarray(scores, np.float64).reshape(-1).copy()
    classes = np.asarray(classes, int).reshape(-1)
    for c, fit in enumerate(calibration):
        on = classes == c
        if fit is not None and on.any():
            scores[on] = np.interp(scores[on], fit[0], fit[1])
    return scores


def _support(boxes, classes, pred, match_iou):
    det_boxes = np.asarray(pred["boxes"], np.float64).reshape(-1, 4)
    if len(boxes) == 0 or len(det_boxes) == 0:
        return np.zeros(len(boxes))
    iou = iou_matrix_np(np.asarray(boxes, np.float64), det_boxes)
    same = np.asarray(classes)[:, None] == np.asarray(pred["classes"])[None, :]
    return np.max(np.where(same & (iou >= match_iou), np.asarray(pred["scores"], np.float64)[None, :], 0.0), axis=1)


def score_image(record, pred, class_names, recall=None, match_iou=MATCH_IOU, loose_iou=LOOSE_IOU,
                min_score=0.05):
    """Model-based entries of one image (each label at most once; missing objects), unsorted."""
    file, index = _where(record)
    boxes = np.asarray(record.boxes, np.float64).reshape(-1, 4)
    classes = np.asarray(record.classes, int)
    ignore = np.asarray(record.ignore, bool)
    det_boxes = np.asarray(pred["boxes"], np.float64).reshape(-1, 4)
    det_scores = np.asarray(pred["scores"], np.float64).reshape(-1)
    det_classes = np.asarray(pred["classes"], int).reshape(-1)
    valid = det_classes >= 0
    det_boxes, det_scores, det_classes = det_boxes[valid], det_scores[valid], det_classes[valid]
    recall = np.ones(len(class_names)) if recall is None else np.asarray(recall, float)
    n, m = len(boxes), len(det_boxes)
    iou = iou_matrix_np(boxes, det_boxes) if n and m else np.zeros((n, m))
    same = classes[:, None] == det_classes[None, :]
    matched = iou >= match_iou
    scores = np.broadcast_to(det_scores[None, :], (n, m))
    # a detection "owned" by a label: same class, IoU >= match (it cannot be a better box for another label)
    owners = (same & matched) & ~ignore[:, None]
    # a detection is a candidate better box only for the same-class label it overlaps most
    closest = np.argmax(np.where(same & ~ignore[:, None], iou, -1.0), axis=0) if n else np.zeros(m, int)
    entries, suggestion_of = [], {}
    for i in np.flatnonzero(~ignore):
        support = np.max(np.where(same[i] & matched[i], scores[i], 0.0), initial=0.0)
        kinds = {}
        other = ~same[i] & matched[i]
        if other.any():
            j = int(np.argmax(np.where(other, scores[i], -1)))
            kinds["wrong_class"] = (det_scores[j] * (1 - support), dict(suggested_class=det_classes[j]), j)
        owned_by_other = np.delete(owners, i, axis=0).any(axis=0) if n > 1 else np.zeros(m, bool)
        loose = same[i] & (iou[i] >= loose_iou) & ~matched[i] & ~owned_by_other & (closest == i)
        if loose.any():
            j = int(np.argmax(np.where(loose, scores[i], -1)))
            kinds["bad_box"] = (det_scores[j] * (1 - support), dict(suggested_box=det_boxes[j]), j)
        about_i = (iou[i] >= loose_iou) & (~owned_by_other | matched[i])
        seen = np.max(np.where(about_i, scores[i], 0.0), initial=0.0)
        seen_j = int(np.argmax(np.where(about_i, scores[i], -1))) if seen > 0 else None
        kinds["spurious"] = ((1 - seen) * recall[classes[i]], {}, seen_j)
        issue = max(kinds, key=lambda k: kinds[k][0])
        score, suggested, j = kinds[issue]
        if score < min_score:
            continue
        if issue == "bad_box":
            suggestion_of[j] = iou[i, j]
        detail = dict(support=float(support), seen=float(seen))
        if j is not None:
            detail.update(det_box=det_boxes[j].tolist(), det_class=class_names[det_classes[j]],
                          det_score=float(det_scores[j]))
        entries.append(_entry(record, file, index[i], boxes[i], classes[i], issue, score, class_names, detail,
                              **suggested))
    entries += _missing(record, file, boxes, iou, det_boxes, det_scores, det_classes, suggestion_of,
                        class_names, match_iou, min_score)
    return entries


def _missing(record, file, boxes, iou, det_boxes, det_scores, det_classes, suggestion_of, class_names,
             match_iou, min_score):
    """Confident detections that no label explains, de-duplicated across classes."""
    best_iou = iou.max(axis=0) if len(boxes) else np.zeros(len(det_boxes))
    candidates = []
    for j in np.argsort(-det_scores, kind="stable"):
        if best_iou[j] >= match_iou or suggestion_of.get(int(j), 0.0) >= match_iou / 2:
            continue
        score = det_scores[j] * (1 - best_iou[j])
        if score >= min_score:
            candidates.append(int(j))
    kept = []  # positions in candidates
    overlap = iou_matrix_np(det_boxes[candidates], det_boxes[candidates]) if candidates else None
    for n in range(len(candidates)):  # already sorted by detection score: greedy class-agnostic NMS
        if not kept or overlap[n, kept].max() < match_iou:
            kept.append(n)
    kept = [candidates[n] for n in kept]
    return [_entry(record, file, None, det_boxes[j], det_classes[j], "missing", det_scores[j] * (1 - best_iou[j]),
                   class_names, dict(detection_score=float(det_scores[j]), label_iou=float(best_iou[j]),
                                     det_box=det_boxes[j].tolist(), det_class=class_names[det_classes[j]],
                                     det_score=float(det_scores[j])))
            for j in kept]


def score_label_issues(records, predictions, class_names, min_score=0.05, match_iou=MATCH_IOU, calibrate=True):
    """Model-based entries for all records, sorted by score (highest first).

    ``calibrate``: detection scores become per-class precisions first
    (:func:`score_calibration`; classes with few detections keep raw scores).
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    if calibrate:
        calibration = score_calibration(records, predictions, len(class_names), match_iou)
        predictions = [dict(pred, scores=calibrated(pred["scores"], pred["classes"], calibration))
                       for pred in predictions]
    recall = class_recall(records, predictions, len(class_names), match_iou)
    entries = []
    for record, pred in zip(records, predictions):
        entries += score_image(record, pred, class_names, recall=recall, match_iou=match_iou, min_score=min_score)
    return sort_entries(entries)


def sort_entries(entries):
    order = {k: n for n, k in enumerate(ISSUE_KINDS)}
    return sorted(entries, key=lambda e: (-e["score"], order.get(e["issue"], 99), str(e["file"]),
                                          -1 if e["object"] is None else e["object"]))


# ------------------------------------------------------------------ the audit's geometric findings
def geometric_entries(audit_report, records=None):
    """``degenerate`` / ``out_of_image`` / ``duplicate`` entries from a :class:`kdet.data.audit.AuditReport`.

    VOC sources are audited from their raw XML (indices are the file's); for
    other sources the audit numbers the record's boxes, translated here
    through each record's ``object_index`` / ``annotation_path``.
    """
    by_image = {str(r.image_id): r for r in records or ()}
    findings = audit_report.findings
    entries = []

    def place(item, obj):
        record = by_image.get(str(item["image_id"]))
        if record is not None and item["file"] != record.annotation_path and record.image_path == item["file"]:
            file, index = _where(record)
            return file, index[obj] if obj < len(index) else obj
        return item["file"], obj

    for kind, issue in (("degenerate_boxes", "degenerate"), ("out_of_image_boxes", "out_of_image")):
        for item in findings.get(kind, []):
            file, obj = place(item, item["index"])
            entries.append(_geometric(item, file, obj, item["box"], item["class"], issue, 1.0,
                                      dict(width=item.get("width"), height=item.get("height"),
                                           beyond_px=item.get("beyond_px"))))
    for item in findings.get("duplicate_boxes", []):
        first, second = item["pair"]
        file, obj = place(item, second)
        _, first_obj = place(item, first)
        entries.append(_geometric(item, file, obj, item["boxes"][1], item["class"], "duplicate", item["iou"],
                                  dict(duplicate_of=first_obj, iou=item["iou"])))
    return entries


def _geometric(item, file, obj, box, cls, issue, score, detail):
    return {"file": file, "image_id": item["image_id"], "object": int(obj),
            "box": [round(float(v), 2) for v in box], "class": cls, "issue": issue,
            "score": round(float(score), 4), PRIVATE: detail}


def audit_entries(source, class_names, records):
    """The audit's geometric findings for one data source (raw XML for VOC)."""
    from kdet.data.audit import audit_sources

    report = audit_sources({"train": source}, list(class_names), check_images=False)
    return geometric_entries(report, records)


def merge_entries(*lists):
    """One ranking; a label flagged by the audit is not listed again by the models."""
    geometric = [e for lst in lists for e in lst if e["issue"] in GEOMETRIC_KINDS]
    flagged = {(str(e["file"]), e["object"]) for e in geometric}
    model = [e for lst in lists for e in lst if e["issue"] not in GEOMETRIC_KINDS
             and (e["object"] is None or (str(e["file"]), e["object"]) not in flagged)]
    return sort_entries(geometric + model)


# ------------------------------------------------------------------ outputs
def public_entry(entry):
    return {k: v for k, v in entry.items() if k != PRIVATE}


def describe(entry):
    """One line: why this entry is suspicious."""
    d = entry.get(PRIVATE) or {}
    issue, cls = entry["issue"], entry["class"]
    if issue == "missing":
        return f"missing {cls}: detected at {d.get('detection_score', entry['score']):.2f}, no label overlaps it"
    if issue == "wrong_class":
        return f"labelled {cls}, models see {entry['suggested_class']} (support for {cls} {d.get('support', 0):.2f})"
    if issue == "bad_box":
        return f"{cls} box misplaced: models' box {entry['suggested_box']}"
    if issue == "spurious":
        return f"{cls} never found (best detection overlapping it {d.get('seen', 0):.2f})"
    if issue == "duplicate":
        return f"duplicate of object {d.get('duplicate_of')} (IoU {d.get('iou', entry['score']):.2f})"
    if issue == "degenerate":
        return f"degenerate box ({d.get('width')}x{d.get('height')} px)"
    if issue == "out_of_image":
        return f"box beyond the image by {d.get('beyond_px')} px"
    return issue


def summary_text(entries, num_images, num_labels, top=50, header=()):
    counts = {k: 0 for k in ISSUE_KINDS}
    strong = {k: 0 for k in ISSUE_KINDS}
    for e in entries:
        counts[e["issue"]] = counts.get(e["issue"], 0) + 1
        strong[e["issue"]] = strong.get(e["issue"], 0) + (e["score"] >= 0.5)
    lines = list(header) + [
        f"kdet label review: {num_images} images, {num_labels} labelled objects, {len(entries)} entries "
        f"(sorted by score, highest first)",
        "entries per issue (score >= 0.5 in brackets): "
        + ", ".join(f"{k} {counts[k]} ({strong[k]})" for k in ISSUE_KINDS), "",
        f"top {min(top, len(entries))}:",
        f"{'rank':>4} {'score':>6}  {'issue':<12} {'image':<24} {'obj':>4}  {'class':<10} reason"]
    for n, e in enumerate(entries[:top], 1):
        obj = "-" if e["object"] is None else str(e["object"])
        lines.append(f"{n:>4} {e['score']:>6.3f}  {e['issue']:<12} {str(e['image_id'])[-24:]:<24} {obj:>4}  "
                     f"{e['class']:<10} {describe(e)}")
    return "\n".join(lines)


def contact_sheet(entries, records, predictions, path, top=24, columns=6, min_det_score=0.5, thumb=2.1):
    """The top suspects: each crop with the label (orange) and the models' view (cyan), the reason below.

    Thick orange: the entry's label; thin orange: the image's other labels;
    thick dashed cyan with its class and score: the detection behind the
    entry (the suggested box, the other class, the missing object); thin
    dashed cyan: the other out-of-fold detections with score >= ``min_det_score``.
    """
    from kdet.data.audit import agg_pyplot
    from kdet.data.records import load_image

    plt = agg_pyplot()
    from matplotlib.patches import Rectangle

    by_id = {str(r.image_id): (r, p) for r, p in zip(records, predictions or [None] * len(records))}
    shown = [e for e in entries[:top]]
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * thumb, rows * (thumb + 0.55)), squeeze=False)
    cache = {}
    for ax in axes.ravel():
        ax.axis("off")
    for n, (entry, ax) in enumerate(zip(shown, axes.ravel())):
        record, pred = by_id.get(str(entry["image_id"]), (None, None))
        if record is None:
            continue
        key = str(entry["image_id"])
        if key not in cache:
            try:
                cache[key] = load_image(record)
            except ValueError:
                cache[key] = None
        pixels = cache[key]
        if pixels is None:
            continue
        region = [entry["box"]] + ([entry["suggested_box"]] if "suggested_box" in entry else [])
        x1, y1, x2, y2 = _crop_window(np.asarray(region, float), pixels.shape[1], pixels.shape[0])
        ax.imshow(pixels[y1:y2, x1:x2], extent=(x1, x2, y2, y1))
        ax.set_xlim(x1, x2)
        ax.set_ylim(y2, y1)
        for b in np.asarray(record.boxes):  # the image's other labels, thin
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, edgecolor="orange",
                                   linewidth=0.6, alpha=0.8))
        if pred is not None:
            for b, s, c in zip(np.asarray(pred["boxes"]), np.asarray(pred["scores"]), np.asarray(pred["classes"])):
                if s >= min_det_score and c >= 0:
                    ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False,
                                           edgecolor="cyan", linewidth=0.7, linestyle="--"))
        b = entry["box"]
        colour = "cyan" if entry["issue"] == "missing" else "orange"
        ax.add_patch(Rectangle((b[0], b[1]), max(b[2] - b[0], 1), max(b[3] - b[1], 1), fill=False,
                               edgecolor=colour, linewidth=1.8))
        detail = entry.get(PRIVATE) or {}
        if "det_box" in detail:  # the models' detection behind the entry, drawn over the label
            b = detail["det_box"]
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, edgecolor="cyan",
                                   linewidth=1.4, linestyle=(0, (4, 2))))
            ax.text(b[0], b[1], f"{detail['det_class']} {detail['det_score']:.2f}", color="cyan", fontsize=5.5,
                    va="bottom", clip_on=True, bbox=dict(facecolor="black", alpha=0.6, pad=0.6, linewidth=0))
        obj = "" if entry["object"] is None else f" obj {entry['object']}"
        ax.set_title(f"#{n + 1} {entry['issue']} {entry['score']:.2f}\n{str(entry['image_id'])[-18:]}{obj}",
                     fontsize=6.5)
        ax.text(0.5, -0.04, _wrap(describe(entry), 38), transform=ax.transAxes, ha="center", va="top",
                fontsize=5.5)
    fig.suptitle("label review: orange = labels (thick: this entry's), cyan = the models (thick: the detection "
                 f"behind the entry, thin: other detections >= {min_det_score})", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _crop_window(boxes, width, height, context=1.5, min_size=64):
    x1, y1 = boxes[:, 0].min(), boxes[:, 1].min()
    x2, y2 = boxes[:, 2].max(), boxes[:, 3].max()
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1, min_size / context) * context / 2 + 4
    return (int(max(0, np.floor(cx - half))), int(max(0, np.floor(cy - half))),
            int(min(width, np.ceil(cx + half))), int(min(height, np.ceil(cy + half))))


def _wrap(text, width):
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def write_outputs(out_dir, entries, records, predictions, header=(), top_sheet=24):
    """``label_issues.json``, ``label_issues.txt`` and ``label_issues.png`` in ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(json=out / "label_issues.json", text=out / "label_issues.txt", sheet=out / "label_issues.png")
    paths["json"].write_text(json.dumps([public_entry(e) for e in entries], indent=1, default=_json_default))
    num_labels = int(sum(len(r.boxes) for r in records))
    paths["text"].write_text(summary_text(entries, len(records), num_labels, header=header) + "\n")
    contact_sheet(entries, records, predictions, paths["sheet"], top=top_sheet)
    return paths


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"not json serialisable: {type(value).__name__}")


# ------------------------------------------------------------------ the whole review
def training_data(recipe):
    """``(train source, class names, train records)`` of a recipe."""
    from kdet import build
    from kdet.errors import RecipeError

    sources = build.load_sources(recipe)
    if sources["train"] is None:
        raise RecipeError("the recipe has no data.train source to review")
    class_names = build.class_names_of(recipe, sources)
    records = build.load_records({"train": sources["train"]})["train"]
    return sources["train"], class_names, records


def find_label_issues(recipe, out_dir, folds=3, models=None, predictions_file=None, seed=None, resume=False,
                      log=None):
    """Cross-predict the recipe's training images, score, merge the audit, write the three files.

    Returns ``(entries, paths)``. ``predictions_file`` rescores saved
    out-of-fold predictions (``cross_predictions.json``) without training;
    ``resume`` reuses fold models already in ``out_dir`` (same folds and seed).
    """
    log = log or logger.info  # kdet's logger (kdet.log) unless the caller gives its own
    seed = int(recipe["train"].get("seed") or 0) if seed is None else int(seed)
    source, class_names, records = training_data(recipe)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if predictions_file:
        predictions, fold_of = load_predictions(predictions_file, records), None
        how = f"predictions from {predictions_file}"
    else:
        predictions, fold_of = cross_predict(recipe, class_names, records, folds=folds, seed=seed, models=models,
                                             save_dir=None if models else str(out), reuse=resume, log=log)
        save_predictions(out / "cross_predictions.json", records, predictions, fold_of)
        how = (f"{len(models)} given model(s)" if models else f"{folds}-fold cross-prediction, "
               f"{recipe['train']['epochs']} epochs per fold, seed {seed}")
    entries = merge_entries(audit_entries(source, class_names, records),
                            score_label_issues(records, predictions, class_names))
    header = [f"recipe: {recipe.get('name', '?')}; {how}; {(time.time() - started) / 60:.1f} min", ""]
    paths = write_outputs(out, entries, records, predictions, header=header)
    return entries, paths


def recipe_wants_label_issues(recipe):
    """True when the recipe sets ``data.find_label_issues`` (the run report then calls :func:`report_label_issues`)."""
    return bool(recipe.get("data", {}).get("find_label_issues"))


def after_training(run):
    """The training run's post-training step (``kdet.engine.post_training_steps``): the label review of
    ``run`` (a ``kdet.engine.FinishedRun``) when its recipe asks for it (K extra trainings)."""
    if recipe_wants_label_issues(run.recipe):
        report_label_issues(run.recipe, run.work_dir)


def report_label_issues(recipe, report_dir, folds=3, log=None):
    """For the run report: the label review in ``report_dir/label_issues/``; returns a short dict.

    It trains ``folds`` extra models (the folds' time is printed up front,
    after the first epoch) and returns ``dict(paths=..., counts=..., top=...)``
    with the entry counts per issue and the ten highest entries.
    """
    log = log or logger.info  # kdet's logger (kdet.log) unless the caller gives its own
    log(f"label review: {folds}-fold cross-prediction on the training split "
        f"({folds} extra trainings of {recipe['train']['epochs']} epochs each)")
    entries, paths = find_label_issues(recipe, Path(report_dir) / "label_issues", folds=folds, log=log)
    counts = {k: sum(e["issue"] == k for e in entries) for k in ISSUE_KINDS}
    return dict(paths={k: str(v) for k, v in paths.items()}, counts=counts,
                top=[public_entry(e) for e in entries[:10]])
