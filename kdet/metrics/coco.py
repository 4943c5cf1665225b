"""Exact COCO bbox evaluation (pycocotools ``COCOeval``, iouType ``bbox``), vectorised.

``coco_evaluate(ground_truth, detections)`` takes the same inputs as pycocotools
(a COCO-format ground-truth dict or json path, a list of result dicts or json path)
and returns the 12 summary numbers (``AP, AP50, AP75, AP_small, AP_medium, AP_large,
AR1, AR10, AR100, AR_small, AR_medium, AR_large``) plus ``per_class`` AP / AP50.

The semantics are pycocotools', quirks included:

* the images are all images of the ground truth, the categories all its categories;
  detections of other categories are dropped;
* per image and category the detections are sorted by score with a stable sort
  (json order breaks ties) and cut to 100;
* IoU is ``maskUtils.iou`` on ``xywh`` boxes (no ``+1``); against a crowd region it is
  intersection over the detection's area, and a crowd can be matched many times;
* a ground truth is ignored when ``iscrowd`` is set (the json ``ignore`` field is not
  read, as in pycocotools) or its annotation ``area`` is outside the area range;
* greedy matching per IoU threshold: the best (last on equal IoU) not-yet-matched
  regular ground truth with ``IoU >= t``, else the best ignored one; matches to ignored
  ground truth and unmatched detections whose box area is outside the range are ignored;
* accumulation per category over all images with a stable sort by score (ties: image id
  order, then per-image order), precision envelope, 101 recall points
  (``searchsorted`` left); categories without ground truth are -1 and left out of means.

Where pycocotools breaks, kdet does the right thing instead:

* an empty detection list gives AP/AR 0 (pycocotools raises IndexError);
* a ground-truth annotation with ``id`` 0 counts as matched (pycocotools uses gt id 0
  as its "unmatched" sentinel, so such a match becomes a false positive);
* detections on images that are not in the ground truth: see the next point
  (pycocotools: a bare AssertionError);
* kdet is stricter than pycocotools about the results file (``CocoInputError``, a
  ``ValueError``, naming the file and the detection): NaN/inf boxes or scores and
  negative widths/heights are errors (pycocotools scores them as if they were boxes);
  when no detection's category id (or image id) is in the ground truth it is an error
  naming the unknown and the known ids (pycocotools silently drops such detections, so
  the classic 0- vs 1-based category mistake scores AP 0.000 without a word); when only
  some are unknown, a ``CocoIdWarning`` with the counts, and those detections are dropped;
* a ground truth without ``area`` uses its box area, one without ``iscrowd`` is not
  crowd (pycocotools raises KeyError).

Two engines give the same numbers: a numpy one (default) and the streaming device
engine of :mod:`kdet.metrics.coco_device` (``use_device=True``).
"""

import json
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdet.metrics._coco_common import (
    AREA_RANGES, IOU_THRESHOLDS, MAX_DETS, RECALL_THRESHOLDS, STAT_NAMES,
    format_per_class, format_summary, per_class, summarize,
)

__all__ = ["coco_evaluate", "load_coco_arrays", "CocoInputError", "CocoIdWarning", "evaluate_arrays", "CocoArrays",
           "format_summary", "format_per_class", "STAT_NAMES"]


# ------------------------------------------------------------------ json -> arrays
@dataclass
class CocoArrays:
    """Ground truth and detections as flat arrays, indexed by image / category position.

    Images and categories are in sorted-id order (as pycocotools). Ground truths are
    sorted by (image, category, json order); detections by (image, category, score
    descending, json order) and cut to 100 per image and category.
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    class_names: list
    gt_image: np.ndarray     # [G] int
    gt_class: np.ndarray     # [G] int
    gt_xywh: np.ndarray      # [G, 4] float64
    gt_area: np.ndarray      # [G] float64 (annotation area)
    gt_crowd: np.ndarray     # [G] bool
    det_image: np.ndarray    # [D] int
    det_class: np.ndarray    # [D] int
    det_xywh: np.ndarray     # [D, 4] float64
    det_score: np.ndarray    # [D] float64
    det_rank: np.ndarray     # [D] int, position within its image and category


class CocoInputError(ValueError):
    """A ground truth or results file kdet cannot evaluate; the message names the file and the problem."""


class CocoIdWarning(UserWarning):
    """Some detections carry image or category ids the ground truth does not have (they are dropped)."""


def _read_json(source, what):
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            with open(path) as f:
                return json.load(f)
        except OSError as err:
            raise CocoInputError(f"cannot read {what} file {path}: {err.strerror or err}") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CocoInputError(f"{what} file {path} is not valid JSON: {err}") from err
    return source


def _boxes(rows, what):
    boxes = np.asarray(rows, dtype=np.float64) if rows else np.zeros((0, 4))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise CocoInputError(f"{what}: every 'bbox' must be [x, y, w, h]")
    return boxes


def _positions(sorted_ids, ids):
    """Index of each id in ``sorted_ids`` and whether it is there."""
    ids = np.asarray(ids)
    if len(sorted_ids) == 0 or len(ids) == 0:
        return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == ids


def _id_list(ids, limit=8):
    ids = sorted(set(ids))
    text = ", ".join(str(i) for i in ids[:limit])
    return text + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _ids_of(rows, field, name, what):
    """``rows[i][field]`` for every row; a missing field or a non-number id is an error naming the row."""
    try:
        ids = np.asarray([row[field] for row in rows])
        if len(rows) == 0 or ids.ndim == 1 and ids.dtype.kind in "iuf":
            return ids if len(rows) else np.zeros(0, np.int64)
    except (KeyError, TypeError, IndexError, ValueError):
        pass
    for i, row in enumerate(rows):  # the slow path only names the culprit
        if not isinstance(row, dict):
            raise CocoInputError(f"{name}: {what} {i} is not a dict but {type(row).__name__}")
        if field not in row:
            raise CocoInputError(f"{name}: {what} {i} lacks the field {field!r}")
        if not _is_number(row[field]):
            raise CocoInputError(f"{name}: {what} {i} has {field} {row[field]!r}, not a number")
    raise CocoInputError(f"{name}: the {what}s' {field} values are not numbers")


def _check_ids(found, known, ids, kind, det_name, gt_name):
    """Detection ids that are not in the ground truth: an error when none is, a warning with counts when some are.

    pycocotools drops detections of unknown categories without a word (an off-by-one
    category id then scores AP 0.000) and asserts on unknown images; kdet names them.
    """
    if found.all():
        return
    unknown = ids[~found].tolist()
    where = f"the ground truth {gt_name}" if gt_name != "ground truth" else "the ground truth"
    has = f"{kind} id {unknown[0]}" if len(set(unknown)) == 1 else f"{kind} ids {_id_list(unknown)}"
    known_text = f"{where} has {kind} ids {_id_list(known.tolist())}"
    if not found.any():
        hint = " (0- vs 1-based ids?)" if kind == "category" else ""
        raise CocoInputError(f"{det_name}: no detection's {kind} id is in {where}{hint}: the detections have "
                             f"{has}, {known_text}")
    warnings.warn(f"{det_name}: {len(unknown)} of {len(ids)} detections have {has}, not in {where}, and are "
                  f"dropped; {known_text}", CocoIdWarning, stacklevel=4)


def _check_finite(d_xywh, d_score, dets, det_name):
    """NaN/inf boxes or scores and negative widths/heights are errors naming the detection."""
    bad_box = ~np.isfinite(d_xywh).all(axis=1)
    bad_size = np.isfinite(d_xywh).all(axis=1) & ((d_xywh[:, 2] < 0) | (d_xywh[:, 3] < 0))
    bad_score = ~np.isfinite(d_score)
    for mask, problem in ((bad_box, "a non-finite bbox"), (bad_size, "a negative width or height"),
                          (bad_score, "a non-finite score")):
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            value = dets[i]["score"] if mask is bad_score else dets[i]["bbox"]
            raise CocoInputError(f"{det_name}: detection {i} (image id {dets[i]['image_id']!r}) has {problem} "
                                 f"{value!r}" + (f" ({int(mask.sum())} detections like it)" if mask.sum() > 1 else ""))


def _detection_arrays(dets, det_name):
    """``(image ids, category ids, boxes [D, 4], scores)`` of a results list, each entry checked."""
    d_image = _ids_of(dets, "image_id", det_name, "detection")
    d_cat = _ids_of(dets, "category_id", det_name, "detection")
    for field in ("bbox", "score"):
        missing = [i for i, d in enumerate(dets) if field not in d]
        if missing:
            raise CocoInputError(f"{det_name}: detection {missing[0]} lacks the field {field!r}")
    try:
        d_xywh = np.asarray([d["bbox"] for d in dets], np.float64).reshape(-1, 4) if dets else np.zeros((0, 4))
        d_score = np.asarray([d["score"] for d in dets], np.float64).reshape(len(dets))
    except (TypeError, ValueError):
        _name_bad_entry(dets, det_name)
        raise
    if d_xywh.shape[0] != len(dets):
        _name_bad_entry(dets, det_name)
    _check_finite(d_xywh, d_score, dets, det_name)
    return d_image, d_cat, d_xywh, d_score


def _name_bad_entry(dets, det_name):
    """Raise for the first detection whose bbox is not 4 numbers or whose score is not a number."""
    for i, d in enumerate(dets):
        bbox = d["bbox"]
        if not isinstance(bbox, (list, tuple, np.ndarray)) or len(bbox) != 4 or not all(map(_is_number, bbox)):
            raise CocoInputError(f"{det_name}: detection {i} has bbox {bbox!r}; it must be 4 numbers [x, y, w, h]")
        if not _is_number(d["score"]):
            raise CocoInputError(f"{det_name}: detection {i} has score {d['score']!r}, not a number")
    raise CocoInputError(f"{det_name}: every 'bbox' must be [x, y, w, h]")


def load_coco_arrays(ground_truth, detections):
    """Read a COCO ground truth and detection results (dicts / lists or json paths) into `CocoArrays`.

    Stricter than pycocotools (which drops unknown categories silently and accepts NaN
    boxes): see :func:`_check_ids` and :func:`_check_finite`; every error is a
    `CocoInputError` naming the file and the detection.
    """
    gt_name = str(ground_truth) if isinstance(ground_truth, (str, os.PathLike)) else "ground truth"
    det_name = str(detections) if isinstance(detections, (str, os.PathLike)) else "detections"
    gt = _read_json(ground_truth, "ground truth")
    dets = _read_json(detections, "detections")
    if not isinstance(gt, dict) or "images" not in gt or "categories" not in gt:
        raise CocoInputError(f"{gt_name}: not a COCO ground truth (needs 'images' and 'categories')")
    if not isinstance(dets, list):
        hint = " (a COCO ground truth, not results?)" if isinstance(dets, dict) and "annotations" in dets else ""
        raise CocoInputError(f"{det_name}: detections must be a list of result dicts, got {type(dets).__name__}{hint}")

    image_ids = np.unique(_ids_of(gt["images"], "id", gt_name, "image"))
    cats = sorted(gt["categories"], key=lambda c: c["id"] if isinstance(c, dict) and "id" in c else 0)
    category_ids = _ids_of(cats, "id", gt_name, "category")
    class_names = [c.get("name", str(c["id"])) for c in cats]

    anns = gt.get("annotations", [])
    g_img, g_ok_img = _positions(image_ids, _ids_of(anns, "image_id", gt_name, "annotation"))
    g_cls, g_ok_cls = _positions(category_ids, _ids_of(anns, "category_id", gt_name, "annotation"))
    try:
        g_xywh = _boxes([a["bbox"] for a in anns], gt_name)
    except KeyError as err:
        raise CocoInputError(f"{gt_name}: an annotation lacks the field {err}") from err
    g_area = np.asarray([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], np.float64)
    g_crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool)
    keep = np.flatnonzero(g_ok_img & g_ok_cls)
    keep = keep[np.lexsort((keep, g_cls[keep], g_img[keep]))]

    d_image, d_cat, d_xywh, d_score = _detection_arrays(dets, det_name)
    d_img, d_ok_img = _positions(image_ids, d_image)
    d_cls, d_ok_cls = _positions(category_ids, d_cat)
    _check_ids(d_ok_img, image_ids, d_image, "image", det_name, gt_name)
    _check_ids(d_ok_cls, category_ids, d_cat, "category", det_name, gt_name)
    dkeep = np.flatnonzero(d_ok_cls & d_ok_img)
    dkeep = dkeep[np.lexsort((dkeep, -d_score[dkeep], d_cls[dkeep], d_img[dkeep]))]
    rank = _rank_in_groups(d_img[dkeep] * len(category_ids) + d_cls[dkeep])
    dkeep, rank = dkeep[rank < MAX_DETS[-1]], rank[rank < MAX_DETS[-1]]

    return CocoArrays(
        image_ids=image_ids, category_ids=category_ids, class_names=class_names,
        gt_image=g_img[keep], gt_class=g_cls[keep], gt_xywh=g_xywh[keep].reshape(-1, 4),
        gt_area=g_area[keep], gt_crowd=g_crowd[keep],
        det_image=d_img[dkeep], det_class=d_cls[dkeep], det_xywh=d_xywh[dkeep].reshape(-1, 4),
        det_score=d_score[dkeep], det_rank=rank,
    )


def _rank_in_groups(sorted_keys):
    """Position of each element within its run of equal keys."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return np.arange(n) - first


# ------------------------------------------------------------------ matching
def iou_xywh(det, gt, crowd):
    """pycocotools' ``maskUtils.iou`` for boxes, same float operations: ``[..., D, G]``."""
    dx, dy, dw, dh = (det[..., :, None, i] for i in range(4))
    gx, gy, gw, gh = (gt[..., None, :, i] for i in range(4))
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    det_area = dw * dh
    union = np.where(crowd[..., None, :], det_area, det_area + gw * gh - inter)
    overlap = (w > 0) & (h > 0)
    return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def _last_argmax(values, mask):
    """Index of the last maximum of ``values`` where ``mask`` (ties -> last), and whether any."""
    masked = np.where(mask, values, -1.0)
    last = masked.shape[-1] - 1 - np.argmax(masked[..., ::-1], axis=-1)
    return last, mask.any(axis=-1)


def greedy_match(ious, gt_valid, gt_crowd, gt_ignore, det_valid, thresholds=IOU_THRESHOLDS):
    """pycocotools' per-image greedy matching, vectorised over groups, thresholds and area ranges.

    ious [P, D, G] (detections in score order), gt_valid / gt_crowd [P, G],
    gt_ignore [P, A, G], det_valid [P, D]. Returns ``matched`` and ``matched_ignored``,
    both [P, D, T, A]: the detection found a ground truth / that ground truth is ignored.
    """
    P, D, G = ious.shape
    A = gt_ignore.shape[1]
    T = len(thresholds)
    taken = np.zeros((P, T, A, G), bool)
    matched = np.zeros((P, D, T, A), bool)
    matched_ignored = np.zeros((P, D, T, A), bool)
    usable = gt_valid[:, None, None, :]
    crowd = gt_crowd[:, None, None, :]
    ignored = gt_ignore[:, None, :, :]
    thr = np.asarray(thresholds)[None, :, None, None]
    g_index = np.arange(G)
    for d in range(D):
        iou = ious[:, d, None, None, :]
        cand = (iou >= thr) & usable & (crowd | ~taken) & det_valid[:, d, None, None, None]
        m_reg, has_reg = _last_argmax(iou, cand & ~ignored)
        m_ign, has_ign = _last_argmax(iou, cand & ignored)
        has = has_reg | has_ign
        m = np.where(has_reg, m_reg, m_ign)
        taken |= has[..., None] & (g_index == m[..., None])
        matched[:, d] = has
        matched_ignored[:, d] = has_ign & ~has_reg
    return matched, matched_ignored


def _area_ignore(area):
    """[N, A]: area outside each COCO area range (bounds inclusive)."""
    lo = np.asarray([r[0] for r in AREA_RANGES], np.float64)
    hi = np.asarray([r[1] for r in AREA_RANGES], np.float64)
    return (area[:, None] < lo) | (area[:, None] > hi)


def _runs(keys):
    """Unique sorted keys with their start and length."""
    uniq, start, count = np.unique(keys, return_index=True, return_counts=True)
    return uniq, start, count


def _match_all(arr):
    """Per-detection ``tp`` and ``fp`` [D, T, A] for every detection of ``arr``."""
    K = len(arr.category_ids)
    T, A = len(IOU_THRESHOLDS), len(AREA_RANGES)
    n_det = len(arr.det_score)
    gt_ignore = arr.gt_crowd[:, None] | _area_ignore(arr.gt_area)                  # [G, A]
    det_out = _area_ignore(arr.det_xywh[:, 2] * arr.det_xywh[:, 3])              # [D, A]
    matched = np.zeros((n_det, T, A), bool)
    matched_ignored = np.zeros((n_det, T, A), bool)

    d_keys, d_start, d_count = _runs(arr.det_image * K + arr.det_class)
    g_keys, g_start, g_count = _runs(arr.gt_image * K + arr.gt_class)
    _, di, gi = np.intersect1d(d_keys, g_keys, assume_unique=True, return_indices=True)
    d_start, d_count, g_start, g_count = d_start[di], d_count[di], g_start[gi], g_count[gi]
    # bucket groups by padded size (powers of two) to keep padding small
    d_pad = 2 ** np.ceil(np.log2(d_count)).astype(int)
    g_pad = 2 ** np.ceil(np.log2(g_count)).astype(int)
    for dp, gp in set(zip(d_pad.tolist(), g_pad.tolist())):
        sel = np.flatnonzero((d_pad == dp) & (g_pad == gp))
        d_idx, d_valid = _padded_index(d_start[sel], d_count[sel], dp)
        g_idx, g_valid = _padded_index(g_start[sel], g_count[sel], gp)
        crowd = arr.gt_crowd[g_idx] & g_valid
        with np.errstate(divide="ignore", invalid="ignore"):
            ious = iou_xywh(arr.det_xywh[d_idx], arr.gt_xywh[g_idx], crowd)
        m, mi = greedy_match(ious, g_valid, crowd, np.moveaxis(gt_ignore[g_idx], -1, 1), d_valid)
        matched[d_idx[d_valid]] = m[d_valid]
        matched_ignored[d_idx[d_valid]] = mi[d_valid]

    det_ignored = matched_ignored | (~matched & det_out[:, None, :])
    tp = matched & ~det_ignored
    fp = ~matched & ~det_ignored
    npig = np.zeros((K, A), np.int64)
    np.add.at(npig, arr.gt_class, (~gt_ignore).astype(np.int64))
    return tp, fp, npig


def _padded_index(start, count, size):
    offsets = np.arange(size)
    valid = offsets[None, :] < count[:, None]
    return np.where(valid, start[:, None] + offsets[None, :], 0), valid


# ------------------------------------------------------------------ accumulation
def accumulate(det_class, det_score, det_image, det_rank, tp, fp, npig):
    """``precision [T,R,K,A,M]`` and ``recall [T,K,A,M]`` as ``COCOeval.accumulate``, vectorised.

    Equivalent form of pycocotools' loop, exact in float64: at recall point ``r`` the
    interpolated precision is the largest precision at a true positive whose recall is
    ``>= recThr[r]`` (only true positives raise the envelope), 0 if none. Each true
    positive, with its running counts ``tp`` and ``fp`` (same float ops as pycocotools),
    falls in bin ``searchsorted(recThrs, tp / npig, 'right')``; a segment max per
    (column, class, bin) and a suffix max over the bins give all 101 points at once.
    """
    K, A = npig.shape
    T, R, M = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(MAX_DETS)
    C = T * A  # columns t * A + a
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    order = np.lexsort((det_rank, det_image, -det_score, det_class))
    cls, rank = det_class[order], det_rank[order]
    n_rows = len(order)
    tp = np.ascontiguousarray(tp[order].reshape(n_rows, C).T)                     # [C, N]
    fp = np.ascontiguousarray(fp[order].reshape(n_rows, C).T)
    class_start = np.searchsorted(cls, cls, side="left")
    present = npig > 0                                                            # [K, A]
    for m, max_det in enumerate(MAX_DETS):
        kept = (rank < max_det)[None, :]
        col, pos = np.nonzero(tp & kept)          # true positives, by column then row (-> class)
        fp_key = np.flatnonzero(fp & kept)        # false positives as col * N + row, sorted
        group_start = col * n_rows + class_start[pos]
        # running counts within (column, class) at each true positive
        first_tp = np.searchsorted(col * n_rows + pos, group_start)
        c = (np.arange(len(pos)) - first_tp + 1).astype(float)
        f = (np.searchsorted(fp_key, col * n_rows + pos) - np.searchsorted(fp_key, group_start)).astype(float)
        k = cls[pos]
        n = npig[k, col % A]
        with np.errstate(divide="ignore", invalid="ignore"):
            pr = c / (f + c + np.spacing(1))
            bins = np.searchsorted(RECALL_THRESHOLDS, c / n, side="right")
        table = np.zeros(C * K * (R + 2))
        if len(pr):
            key = (col * K + k) * (R + 2) + bins   # non-decreasing: segments are contiguous
            first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
            table[key[first]] = np.maximum.reduceat(pr, first)
        table = np.maximum.accumulate(table.reshape(C, K, R + 2)[..., ::-1], axis=-1)[..., ::-1]
        q = table[..., 1:R + 1].reshape(T, A, K, R).transpose(0, 3, 2, 1)          # [T, R, K, A]
        precision[..., m] = np.where(present[None, None], q, -1)
        tp_total = np.bincount(k * C + col, minlength=K * C).reshape(K, T, A).transpose(1, 0, 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall[..., m] = np.where(present[None], tp_total / npig[None], -1)
    return precision, recall


def evaluate_arrays(arr):
    """``(precision, recall)`` of `CocoArrays` with the numpy engine."""
    tp, fp, npig = _match_all(arr)
    return accumulate(arr.det_class, arr.det_score, arr.det_image, arr.det_rank, tp, fp, npig)


# ------------------------------------------------------------------ entry point
def coco_evaluate(ground_truth, detections, *, use_device=False, dtype="float64",
                  batch_size=64, jit_compile=True, return_arrays=False):
    """COCO bbox evaluation of ``detections`` against ``ground_truth`` (dicts/lists or json paths).

    Returns ``{"AP": .., "AP50": .., ..., "AR_large": .., "per_class": {name: {"AP", "AP50"}}}``.
    ``use_device=True`` runs the matching and accumulation with the XLA-compiled
    TensorFlow engine (`kdet.metrics.coco_device`) in ``dtype``, ``batch_size`` images
    per update (``jit_compile=False``: plain graph mode); ``return_arrays``
    adds the ``precision`` [T,R,K,A,M] and ``recall`` [T,K,A,M] arrays.
    """
    arr = load_coco_arrays(ground_truth, detections)
    if use_device:
        from kdet.metrics.coco_device import evaluate_arrays_on_device

        precision, recall = evaluate_arrays_on_device(arr, dtype=dtype, batch_size=batch_size,
                                                      jit_compile=jit_compile)
    else:
        precision, recall = evaluate_arrays(arr)
    result = summarize(precision, recall)
    result["per_class"] = per_class(precision, arr.class_names)
    if return_arrays:
        result["precision"], result["recall"] = precision, recall
    return result
