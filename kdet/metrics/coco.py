"""Exact COCO bbox evaluation (pycocotools ``COCOeval``, iouType ``bbox``), vectorised.

``coco_evaluate(ground_truth, detections)`` takes the same inputs as pycocotools
(a COCO-format ground-truth dict or json path, a list of result dicts or json path;
or the detections as columns: ``{"image_id": [D], "category_id": [D], "bbox": [D, 4],
"score": [D]}`` arrays, which skips reading D dicts)
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

The numpy engine does no per-detection Python work past reading the result dicts
(one ``itemgetter``/``fromiter`` pass per field; malformed input falls back to a
row-by-row reader that names the bad entry): ids become positions through a lookup
table; each stable sort (by image and category, then score; by category, then
score) is one float sort for the scores' dense ranks and one sort of unique packed
int64 keys; the greedy matching runs only on the detections and
ground truths with IoU >= the lowest threshold (the others cannot change its
choices), groups with one such ground truth in closed form; the accumulation
works from the true positives and the few matches to ignored ground truths, with
the false-positive counts from a cumulative count per area range.
"""

import json
import numbers
import os
import warnings
from dataclasses import dataclass
from itertools import chain
from operator import index, itemgetter
from pathlib import Path

import numpy as np

from kdet.metrics._coco_common import (
    DEFAULT_PARAMS, MAX_DETS, RECALL_THRESHOLDS, STAT_NAMES, EvalParams,
    format_per_class, format_summary, per_class, summarize,
)

__all__ = ["coco_evaluate", "load_coco_arrays", "CocoInputError", "CocoIdWarning", "evaluate_arrays", "CocoArrays",
           "EvalParams", "match_records", "MatchRecords", "OUTCOMES", "format_outcomes",
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
    gt_source: np.ndarray = None   # [G] int, position in the json's annotations list
    det_source: np.ndarray = None  # [D] int, position in the detections list


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
    """Index of each id in ``sorted_ids`` (ascending; the first of equal ids) and whether it is there."""
    ids = np.asarray(ids)
    if len(sorted_ids) == 0 or len(ids) == 0:
        return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
    if sorted_ids.dtype.kind == "i" and ids.dtype.kind == "i":
        lo, hi = int(sorted_ids[0]), int(sorted_ids[-1])
        if hi - lo <= 4 * (len(ids) + len(sorted_ids)):  # then a lookup table beats a binary search per id
            return _table_positions(sorted_ids, ids, lo, hi)
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == ids


def _table_positions(sorted_ids, ids, lo, hi):
    """`_positions` of integer ids within a small range ``[lo, hi]``, through a table indexed by id."""
    table = np.full(hi - lo + 2, -1, np.int32 if len(sorted_ids) < 2 ** 31 else np.int64)  # last: not there
    table[sorted_ids[::-1] - lo] = np.arange(len(sorted_ids) - 1, -1, -1)                  # equal ids: the first
    slot = np.where((ids >= lo) & (ids <= hi), ids - lo, hi - lo + 1)
    pos = table[slot].astype(np.int64)
    found = pos >= 0
    return np.maximum(pos, 0, out=pos), found


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


def _check_finite(d_xywh, d_score, row, det_name):
    """NaN/inf boxes or scores and negative widths/heights are errors naming the detection (``row(i)``: its dict)."""
    if len(d_score) and np.isfinite(d_score.sum()) and np.isfinite(d_xywh.sum()) and d_xywh[:, 2:].min() >= 0:
        return  # (a NaN or inf in a sum makes it NaN or inf; an overflow to inf takes the row-wise check)
    bad_box = ~np.isfinite(d_xywh).all(axis=1)
    bad_size = np.isfinite(d_xywh).all(axis=1) & ((d_xywh[:, 2] < 0) | (d_xywh[:, 3] < 0))
    bad_score = ~np.isfinite(d_score)
    for mask, problem in ((bad_box, "a non-finite bbox"), (bad_size, "a negative width or height"),
                          (bad_score, "a non-finite score")):
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            value = row(i)["score"] if mask is bad_score else row(i)["bbox"]
            raise CocoInputError(f"{det_name}: detection {i} (image id {row(i)['image_id']!r}) has {problem} "
                                 f"{value!r}" + (f" ({int(mask.sum())} detections like it)" if mask.sum() > 1 else ""))


def _detection_arrays(dets, det_name):
    """``(image ids, category ids, boxes [D, 4], scores)`` of a results list, each entry checked."""
    try:
        d_image, d_cat, d_xywh, d_score = _detection_fields(dets)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError):
        d_image, d_cat, d_xywh, d_score = _checked_detection_fields(dets, det_name)  # names the culprit
    _check_finite(d_xywh, d_score, dets.__getitem__, det_name)
    return d_image, d_cat, d_xywh, d_score


DETECTION_COLUMNS = ("image_id", "category_id", "bbox", "score")


def _is_columns(dets):
    return isinstance(dets, dict) and all(key in dets for key in DETECTION_COLUMNS)


def _column_arrays(dets, det_name):
    """``(image ids, category ids, boxes [D, 4], scores)`` of detections given as columns (arrays), checked."""
    columns = {}
    for key in DETECTION_COLUMNS:
        try:
            columns[key] = np.asarray(dets[key], np.float64 if key in ("bbox", "score") else None)
        except (TypeError, ValueError) as err:
            raise CocoInputError(f"{det_name}: column {key!r} is not an array of numbers ({err})") from err
    n = columns["score"].shape[0] if columns["score"].ndim == 1 else -1
    if n < 0 or any(columns[key].shape != (n,) for key in ("image_id", "category_id")):
        shapes = ", ".join(f"{key} {columns[key].shape}" for key in DETECTION_COLUMNS)
        raise CocoInputError(f"{det_name}: image_id, category_id and score must be 1-D of one length; got {shapes}")
    boxes = columns["bbox"].reshape(0, 4) if n == 0 else columns["bbox"]
    if boxes.shape != (n, 4):
        raise CocoInputError(f"{det_name}: bbox must be [{n}, 4] (x, y, w, h per detection); got {boxes.shape}")
    for key in ("image_id", "category_id"):
        if columns[key].dtype.kind not in "iuf":
            raise CocoInputError(f"{det_name}: column {key!r} must hold numbers, not {columns[key].dtype}")
    image, cat, score = columns["image_id"], columns["category_id"], columns["score"]
    xywh = np.ascontiguousarray(boxes)
    _check_finite(xywh, score, lambda i: {"image_id": image[i].item(), "bbox": xywh[i].tolist(),
                                           "score": score[i].item()}, det_name)
    return image, cat, xywh, score


def _detection_fields(dets):
    """The fields of well-formed result dicts, read in one pass each without per-row Python code.

    Raises (KeyError, TypeError, ValueError...) on anything else; `_checked_detection_fields`
    then finds and names the bad entry.
    """
    n = len(dets)
    if n == 0:
        raise ValueError("no detections")  # the checked path gives the empty arrays
    # integer ids (operator.index refuses floats, strings and None: those take the checked path)
    ids = [np.fromiter(map(index, map(itemgetter(field), dets)), np.int64, n) for field in ("image_id", "category_id")]
    boxes = list(map(itemgetter("bbox"), dets))
    if set(map(len, boxes)) != {4}:
        raise ValueError("a bbox is not 4 values")
    xywh = np.fromiter(chain.from_iterable(boxes), np.float64, 4 * n).reshape(n, 4)
    score = np.fromiter(map(itemgetter("score"), dets), np.float64, n)
    return ids[0], ids[1], xywh, score


def _checked_detection_fields(dets, det_name):
    """`_detection_fields` row by row: the first missing field or non-number is a `CocoInputError`."""
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


def _annotation_fields(anns, gt_name):
    """``(boxes [G, 4], area [G], iscrowd [G])``; a missing ``area`` is the box area, a missing ``iscrowd`` 0."""
    n = len(anns)
    try:  # one pass per field when every annotation has them all
        boxes = list(map(itemgetter("bbox"), anns))
        if n and set(map(len, boxes)) == {4}:
            xywh = np.fromiter(chain.from_iterable(boxes), np.float64, 4 * n).reshape(n, 4)
            return (xywh, np.fromiter(map(itemgetter("area"), anns), np.float64, n),
                    np.fromiter(map(bool, map(itemgetter("iscrowd"), anns)), bool, n))
    except (KeyError, TypeError, ValueError):
        pass
    try:
        xywh = _boxes([a["bbox"] for a in anns], gt_name)
    except KeyError as err:
        raise CocoInputError(f"{gt_name}: an annotation lacks the field {err}") from err
    area = np.asarray([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], np.float64)
    return xywh, area, np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool)


def load_coco_arrays(ground_truth, detections, max_dets=MAX_DETS[-1]):
    """Read a COCO ground truth and detection results (dicts / lists / columns or json paths) into `CocoArrays`.

    Stricter than pycocotools (which drops unknown categories silently and accepts NaN
    boxes): see :func:`_check_ids` and :func:`_check_finite`; every error is a
    `CocoInputError` naming the file and the detection. Detections are cut to ``max_dets`` per
    image and category (pycocotools' ``maxDets[-1]``).
    """
    gt_name = str(ground_truth) if isinstance(ground_truth, (str, os.PathLike)) else "ground truth"
    det_name = str(detections) if isinstance(detections, (str, os.PathLike)) else "detections"
    gt = _read_json(ground_truth, "ground truth")
    dets = _read_json(detections, "detections")
    if not isinstance(gt, dict) or "images" not in gt or "categories" not in gt:
        raise CocoInputError(f"{gt_name}: not a COCO ground truth (needs 'images' and 'categories')")
    if not isinstance(dets, list) and not _is_columns(dets):
        hint = " (a COCO ground truth, not results?)" if isinstance(dets, dict) and "annotations" in dets else ""
        raise CocoInputError(f"{det_name}: detections must be a list of result dicts or a dict of columns "
                             f"{', '.join(DETECTION_COLUMNS)}; got {type(dets).__name__}{hint}")

    image_ids = np.unique(_ids_of(gt["images"], "id", gt_name, "image"))
    cats = sorted(gt["categories"], key=lambda c: c["id"] if isinstance(c, dict) and "id" in c else 0)
    category_ids = _ids_of(cats, "id", gt_name, "category")
    class_names = [c.get("name", str(c["id"])) for c in cats]

    anns = gt.get("annotations", [])
    g_img, g_ok_img = _positions(image_ids, _ids_of(anns, "image_id", gt_name, "annotation"))
    g_cls, g_ok_cls = _positions(category_ids, _ids_of(anns, "category_id", gt_name, "annotation"))
    g_xywh, g_area, g_crowd = _annotation_fields(anns, gt_name)
    keep = np.flatnonzero(g_ok_img & g_ok_cls)
    keep = keep[np.lexsort((keep, g_cls[keep], g_img[keep]))]

    if isinstance(dets, list):
        d_image, d_cat, d_xywh, d_score = _detection_arrays(dets, det_name)
    else:
        d_image, d_cat, d_xywh, d_score = _column_arrays(dets, det_name)
    d_img, d_ok_img = _positions(image_ids, d_image)
    d_cls, d_ok_cls = _positions(category_ids, d_cat)
    _check_ids(d_ok_img, image_ids, d_image, "image", det_name, gt_name)
    _check_ids(d_ok_cls, category_ids, d_cat, "category", det_name, gt_name)
    dkeep = np.flatnonzero(d_ok_cls & d_ok_img)
    group = d_img[dkeep] * len(category_ids) + d_cls[dkeep]
    order = _key_score_order(group, len(image_ids) * len(category_ids), d_score[dkeep])  # then json order
    rank = _rank_in_groups(group[order])
    order, rank = order[rank < max_dets], rank[rank < max_dets]
    dkeep = dkeep[order]

    return CocoArrays(
        image_ids=image_ids, category_ids=category_ids, class_names=class_names,
        gt_image=g_img[keep], gt_class=g_cls[keep], gt_xywh=g_xywh[keep].reshape(-1, 4),
        gt_area=g_area[keep], gt_crowd=g_crowd[keep],
        det_image=d_img[dkeep], det_class=d_cls[dkeep], det_xywh=np.take(d_xywh, dkeep, axis=0),
        det_score=d_score[dkeep], det_rank=rank, gt_source=keep, det_source=dkeep,
    )


def single_category(arr, max_dets=MAX_DETS[-1]):
    """`CocoArrays` evaluated as one category (pycocotools' ``useCats=0``).

    As pycocotools: per image, ground truths stay in (category, json) order; detections
    are sorted by score with ties in (category, json) order and cut to ``max_dets``.
    """
    order = _key_score_order(arr.det_image, len(arr.image_ids), arr.det_score)
    rank = _rank_in_groups(arr.det_image[order])
    order, rank = order[rank < max_dets], rank[rank < max_dets]
    pick = lambda x: None if x is None else x[order]  # noqa: E731
    return CocoArrays(
        image_ids=arr.image_ids, category_ids=np.asarray([-1]), class_names=["all classes"],
        gt_image=arr.gt_image, gt_class=np.zeros_like(arr.gt_class), gt_xywh=arr.gt_xywh,
        gt_area=arr.gt_area, gt_crowd=arr.gt_crowd,
        det_image=arr.det_image[order], det_class=np.zeros(len(order), arr.det_class.dtype),
        det_xywh=np.take(arr.det_xywh, order, axis=0), det_score=arr.det_score[order], det_rank=rank,
        gt_source=arr.gt_source, det_source=pick(arr.det_source),
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


def greedy_match(ious, gt_valid, gt_crowd, gt_ignore, det_valid, thresholds=DEFAULT_PARAMS.thresholds,
                 return_index=False):
    """pycocotools' per-image greedy matching, vectorised over groups, thresholds and area ranges.

    ious [P, D, G] (detections in score order), gt_valid / gt_crowd [P, G],
    gt_ignore [P, A, G], det_valid [P, D]. Returns ``matched`` and ``matched_ignored``,
    both [P, D, T, A]: the detection found a ground truth / that ground truth is ignored;
    with ``return_index`` also ``index`` [P, D, T, A], the matched ground truth (-1: none).
    """
    P, D, G = ious.shape
    A = gt_ignore.shape[1]
    T = len(thresholds)
    if G == 1:
        matched, matched_ignored = _greedy_match_one(ious[..., 0], gt_valid[:, 0], gt_crowd[:, 0],
                                                     gt_ignore[..., 0], det_valid, thresholds)
        return (matched, matched_ignored, np.where(matched, 0, -1)) if return_index else (matched, matched_ignored)
    taken = np.zeros((P, T, A, G), bool)
    matched = np.zeros((P, D, T, A), bool)
    matched_ignored = np.zeros((P, D, T, A), bool)
    index = np.full((P, D, T, A), -1, np.int64)
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
        index[:, d] = np.where(has, m, -1)
    if return_index:
        return matched, matched_ignored, index
    return matched, matched_ignored


def _greedy_match_one(ious, gt_valid, gt_crowd, gt_ignore, det_valid, thresholds):
    """`greedy_match` of groups with one ground truth, without the loop: the first detection
    with IoU >= t takes it (every such detection, when it is a crowd); [P, D, T, A] each."""
    A = gt_ignore.shape[1]
    reach = (ious[:, :, None] >= np.asarray(thresholds)) & (det_valid & gt_valid[:, None])[:, :, None]  # [P, D, T]
    first = reach & (np.cumsum(reach, axis=1) == 1)
    matched = np.where(gt_crowd[:, None, None], reach, first)
    matched = np.broadcast_to(matched[..., None], matched.shape + (A,))
    return matched, matched & gt_ignore[:, None, None, :]


def _area_ignore(area, params=DEFAULT_PARAMS):
    """[N, A]: area outside each area range (bounds inclusive)."""
    lo, hi = params.area_bounds
    return (area[:, None] < lo) | (area[:, None] > hi)


def _runs(sorted_keys):
    """Distinct keys of a sorted array with the start and length of each run."""
    n = len(sorted_keys)
    start = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if n else np.zeros(0, np.int64)
    return sorted_keys[start], start, np.diff(np.r_[start, n])


@dataclass
class _SparseMatches:
    """The matches of `CocoArrays`: one entry per (detection, IoU threshold, area range) that found a ground truth.

    Unlisted (detection, threshold, area) triples are unmatched. Rows index the
    `CocoArrays` detection and ground-truth arrays.
    """

    det: np.ndarray          # [E]
    t: np.ndarray            # [E] threshold index
    a: np.ndarray            # [E] area-range index
    gt: np.ndarray           # [E] matched ground truth
    gt_ignored: np.ndarray   # [E] that ground truth is ignored in area a: the detection is neither TP nor FP


def _match_sparse(arr, gt_ignore, params=DEFAULT_PARAMS):
    """pycocotools' ``evaluateImg`` matching for all images at once, as `_SparseMatches`.

    Only detections with IoU >= the lowest threshold against some ground truth of their
    image and category can match, and only ground truths some detection reaches can be
    taken: the greedy step runs on those alone (the others cannot change its choices),
    which leaves it a few rows per group instead of up to ``max_dets``.
    """
    K = len(arr.category_ids)
    det_key, gt_key = arr.det_image * K + arr.det_class, arr.gt_image * K + arr.gt_class
    d, g = _group_pairs(det_key, gt_key)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = iou_xywh(np.take(arr.det_xywh, d, axis=0)[:, None], np.take(arr.gt_xywh, g, axis=0)[:, None],
                       arr.gt_crowd[g, None]).reshape(-1)
    reach = iou >= params.thresholds.min()
    cand_det = d[reach]                                     # non-decreasing
    cand_det = cand_det[np.r_[True, cand_det[1:] != cand_det[:-1]]] if len(cand_det) else cand_det
    reached = np.zeros(len(arr.gt_class), bool)
    reached[g[reach]] = True
    cand_gt = np.flatnonzero(reached)
    parts = []
    for d_idx, d_valid, g_idx, g_valid in _padded_groups(det_key[cand_det], gt_key[cand_gt]):
        d_idx, g_idx = cand_det[d_idx], cand_gt[g_idx]
        crowd = arr.gt_crowd[g_idx] & g_valid
        with np.errstate(divide="ignore", invalid="ignore"):
            ious = iou_xywh(np.take(arr.det_xywh, d_idx, axis=0), np.take(arr.gt_xywh, g_idx, axis=0), crowd)
        if g_idx.shape[1] == 1:
            parts.append(_single_gt_matches(ious[..., 0], d_idx, d_valid, g_idx[:, 0], crowd[:, 0], gt_ignore,
                                            params.thresholds))
            continue
        _, mi, m = greedy_match(ious, g_valid, crowd, np.moveaxis(gt_ignore[g_idx], -1, 1), d_valid,
                                params.thresholds, return_index=True)
        p, row, t, a = np.nonzero(m >= 0)
        parts.append((d_idx[p, row], t, a, g_idx[p, m[p, row, t, a]], mi[p, row, t, a]))
    if not parts:
        none = np.zeros(0, np.int64)
        return _SparseMatches(none, none, none, none, np.zeros(0, bool))
    return _SparseMatches(*(np.concatenate(x) for x in zip(*parts)))


def _single_gt_matches(ious, d_idx, d_valid, g, crowd, gt_ignore, thresholds):
    """`_match_sparse`'s entries for groups with one ground truth (``ious`` [P, D], ``g`` [P]): the first
    detection with IoU >= t takes it (every such detection when it is a crowd), at every area range."""
    reach = (ious[:, :, None] >= thresholds) & d_valid[:, :, None]                  # [P, D, T]
    matched = np.where(crowd[:, None, None], reach, reach & (np.cumsum(reach, axis=1) == 1))
    p, row, t = np.nonzero(matched)
    A = gt_ignore.shape[1]
    return (np.repeat(d_idx[p, row], A), np.repeat(t, A), np.tile(np.arange(A), len(p)), np.repeat(g[p], A),
            gt_ignore[g[p]].ravel())


def _group_pairs(det_keys, gt_keys):
    """Every (detection, ground truth) pair with the same key (both sorted): two index arrays."""
    d_keys, d_start, d_count = _runs(det_keys)
    g_keys, g_start, g_count = _runs(gt_keys)
    _, di, gi = np.intersect1d(d_keys, g_keys, assume_unique=True, return_indices=True)
    d_start, d_count, g_start, g_count = d_start[di], d_count[di], g_start[gi], g_count[gi]
    n_pairs = d_count * g_count
    group = np.repeat(np.arange(len(n_pairs)), n_pairs)
    offset = np.arange(int(n_pairs.sum())) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
    width = g_count[group]
    return d_start[group] + offset // width, g_start[group] + offset % width


@dataclass
class _Matches:
    """Per-detection matching of `CocoArrays`, [D, T, A] each, and the ground-truth counts."""

    gt_index: np.ndarray      # matched ground truth (row of the CocoArrays gt arrays), -1: none
    ignored: np.ndarray       # neither TP nor FP (matched an ignored gt, or unmatched outside the area)
    tp: np.ndarray
    fp: np.ndarray
    gt_ignore: np.ndarray     # [G, A]
    npig: np.ndarray          # [K, A] non-ignored ground truths


def _gt_ignore(arr, params):
    """[G, A]: crowd or annotation area outside the range."""
    return arr.gt_crowd[:, None] | _area_ignore(arr.gt_area, params)


def _npig(arr, gt_ignore):
    """[K, A]: the non-ignored ground truths of each category."""
    K = len(arr.category_ids)
    return np.stack([np.bincount(arr.gt_class, ~ig, minlength=K).astype(np.int64) for ig in gt_ignore.T], 1)


def _match_all(arr, params=DEFAULT_PARAMS):
    """Every detection's match as dense [D, T, A] arrays (pycocotools' ``evalImgs``, for the match records)."""
    T, A = len(params.iou_thresholds), len(params.area_ranges)
    n_det = len(arr.det_score)
    gt_ignore = _gt_ignore(arr, params)
    sm = _match_sparse(arr, gt_ignore, params)
    gt_index = np.full((n_det, T, A), -1, np.int64)
    matched_ignored = np.zeros((n_det, T, A), bool)
    gt_index[sm.det, sm.t, sm.a] = sm.gt
    matched_ignored[sm.det, sm.t, sm.a] = sm.gt_ignored
    matched = gt_index >= 0
    det_out = _area_ignore(arr.det_xywh[:, 2] * arr.det_xywh[:, 3], params)          # [D, A]
    det_ignored = matched_ignored | (~matched & det_out[:, None, :])
    return _Matches(gt_index=gt_index, ignored=det_ignored, tp=matched & ~det_ignored,
                    fp=~matched & ~det_ignored, gt_ignore=gt_ignore, npig=_npig(arr, gt_ignore))


def _padded_groups(det_keys, gt_keys):
    """Detections and ground truths grouped by a shared sorted key, as padded index blocks.

    Yields ``(d_idx, d_valid, g_idx, g_valid)`` per block of groups with the same padded
    sizes (powers of two, to keep padding small); only keys present on both sides.
    """
    d_keys, d_start, d_count = _runs(det_keys)
    g_keys, g_start, g_count = _runs(gt_keys)
    _, di, gi = np.intersect1d(d_keys, g_keys, assume_unique=True, return_indices=True)
    d_start, d_count, g_start, g_count = d_start[di], d_count[di], g_start[gi], g_count[gi]
    d_pad = 2 ** np.ceil(np.log2(d_count)).astype(int)
    g_pad = 2 ** np.ceil(np.log2(g_count)).astype(int)
    for dp, gp in sorted(set(zip(d_pad.tolist(), g_pad.tolist()))):
        sel = np.flatnonzero((d_pad == dp) & (g_pad == gp))
        d_idx, d_valid = _padded_index(d_start[sel], d_count[sel], dp)
        g_idx, g_valid = _padded_index(g_start[sel], g_count[sel], gp)
        yield d_idx, d_valid, g_idx, g_valid


def _padded_index(start, count, size):
    offsets = np.arange(size)
    valid = offsets[None, :] < count[:, None]
    return np.where(valid, start[:, None] + offsets[None, :], 0), valid


# ------------------------------------------------------------------ accumulation
def _stable_argsort(values):
    """``np.argsort(values, kind="stable")`` of finite values, without the slower timsort.

    Integers spanning < 2**16 take numpy's radix sort; other integers become unique keys
    ``value * n + position`` (any sort of them is stable); floats are sorted, then equal
    values put back in input order with the same unique-key trick.
    """
    n = len(values)
    if n < 2:
        return np.arange(n)
    if values.dtype.kind in "iub":
        lo, span = int(values.min()), int(values.max()) - int(values.min()) + 1
        if span <= 2 ** 16:
            return np.argsort((values - lo).astype(np.uint16), kind="stable")
        if span * n < 2 ** 62:
            return np.argsort((values - lo).astype(np.int64) * n + np.arange(n))
        return np.argsort(values, kind="stable")
    order = np.argsort(values)
    in_order = values[order]
    run = np.cumsum(np.r_[0, in_order[1:] != in_order[:-1]])
    return order[np.argsort(run * n + order)]


def _key_score_order(keys, n_keys, scores):
    """Rows by (key ascending, score descending, row): ``np.lexsort((rows, -scores, keys))``, faster.

    ``keys`` are integers in ``[0, n_keys)``, ``scores`` finite. One float sort gives each
    score its dense rank; then ``(key, rank, row)`` packed in one int64 per row is unique,
    and numpy's (vectorised) sort of those values gives the order as ``value % n``.
    """
    n = len(scores)
    if n < 2:
        return np.arange(n)
    by_score = np.argsort(-scores)
    in_order = scores[by_score]
    dense = np.empty(n, np.int64)
    dense[by_score] = np.cumsum(np.r_[0, in_order[1:] != in_order[:-1]])
    n_ranks = int(dense[by_score[-1]]) + 1
    if n_keys * n_ranks * n >= 2 ** 63:
        by_score = _stable_argsort(-scores)
        return by_score[_stable_argsort(np.asarray(keys)[by_score])]
    packed = (np.asarray(keys, np.int64) * n_ranks + dense) * n + np.arange(n)
    packed.sort()
    return packed % n


def _accumulation_order(arr):
    """Detection rows by (category, score descending, image, rank): pycocotools' order in ``accumulate``.

    ``arr`` is in (image, category, rank) order, so a stable sort by score, then by
    category, breaks score ties by image, then rank (pycocotools' mergesort over the
    per-image lists concatenated in image order).
    """
    return _key_score_order(arr.det_class, len(arr.category_ids), arr.det_score)


def accumulate_sparse(arr, sm, npig, params=DEFAULT_PARAMS):
    """``precision [T,R,K,A,M]`` and ``recall [T,K,A,M]`` as ``COCOeval.accumulate``, from `_SparseMatches`.

    Equivalent form of pycocotools' loop, exact in float64: at recall point ``r`` the
    interpolated precision is the largest precision at a true positive whose recall is
    ``>= recThr[r]`` (only true positives raise the envelope), 0 if none. Each true
    positive, with its running counts ``tp`` and ``fp`` in its category's score order
    (same float ops as pycocotools), falls in bin ``searchsorted(recThrs, tp / npig,
    'right')``; a segment max per (column, class, bin) and a suffix max over the bins
    give all 101 points at once. The running counts come from the matches alone: an
    unmatched detection is a false positive unless its box is outside the area range,
    so ``fp`` = (detections up to here not outside the range, a cumulative count per
    area range) - (matched detections up to here not outside the range: the true
    positives inside it and the matches to ignored ground truths inside it).
    """
    K, A = npig.shape
    T, M = len(params.iou_thresholds), len(params.max_dets)
    n = len(arr.det_score)
    precision = np.empty((T, len(RECALL_THRESHOLDS), K, A, M))
    recall = np.empty((T, K, A, M))
    acc = _accumulation_order(arr)
    pos = np.empty(n, np.int64)
    pos[acc] = np.arange(n)
    rank = arr.det_rank[acc]
    cls_sorted = arr.det_class[acc]
    area = arr.det_xywh[:, 2] * arr.det_xywh[:, 3]
    inside = np.ascontiguousarray(~_area_ignore(area[acc], params).T)             # [A, n] in score order
    entries = _counted_entries(sm, pos[sm.det], inside, rank, A)
    class_base = np.searchsorted(cls_sorted, np.arange(K), side="left")          # first row of each class
    counted = np.zeros((A, n + 1), np.int32)  # running count of the detections not outside the range
    for m in reversed(range(M)):    # most detections first: each cut keeps a subset of the previous one
        max_det = params.max_dets[m]
        cut = rank < max_det
        if not cut.all():
            entries = entries.where(entries.rank < max_det)
        for a in range(A):
            np.cumsum(inside[a] & cut, out=counted[a, 1:], dtype=np.int32)
        precision[..., m], recall[..., m] = _precision_recall(entries, cls_sorted, class_base, counted, npig, T)
    return precision, recall


@dataclass
class _Entries:
    """The matches that change the running counts, by (column, score order): one row each."""

    col: np.ndarray      # t * A + a
    p: np.ndarray        # row in the accumulation (category, score) order
    rank: np.ndarray     # the detection's rank in its image and category
    tp: np.ndarray       # bool: a true positive (else a match to an ignored ground truth inside the range)
    inside: np.ndarray   # bool: a match not outside the area range (every such match is not a FP)

    def where(self, keep):
        return _Entries(*(x[keep] for x in (self.col, self.p, self.rank, self.tp, self.inside)))


def _counted_entries(sm, e_pos, inside, rank, A):
    """`_Entries` of `_SparseMatches`: true positives and matches to ignored ground truths inside the
    range (a match to an ignored ground truth outside it changes no count), by (column, position)."""
    n = inside.shape[1]
    tp = ~sm.gt_ignored
    packed = ((sm.t * A + sm.a) * n + e_pos) * 2 + tp           # unique per entry
    packed = packed[tp | inside.ravel()[sm.a * n + e_pos]]
    packed.sort()
    tp = (packed & 1).astype(bool)
    packed >>= 1
    col = packed // n
    p = packed - col * n
    return _Entries(col=col, p=p, rank=rank[p], tp=tp, inside=inside.ravel()[(col % A) * n + p])


def _precision_recall(entries, cls_sorted, class_base, counted, npig, T):
    """``precision [T, R, K, A]`` and ``recall [T, K, A]`` at one ``max_dets`` cut, from its `_Entries`.

    A segment is one (column, category): its rows are contiguous; the running counts
    within it are global running sums less their value before the segment.
    """
    K, A = npig.shape
    C, R = T * A, len(RECALL_THRESHOLDS)
    n = len(cls_sorted)
    seg = entries.col * K + cls_sorted[entries.p]                  # non-decreasing
    first = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]]) if len(seg) else np.zeros(0, np.int64)
    n_tp = np.cumsum(entries.tp, dtype=np.int64)
    n_inside = np.cumsum(entries.inside, dtype=np.int64)
    s_first, a_first = seg[first], entries.col[first] % A
    # per segment: the running sums before its first row (fp: also less the count before its category)
    tp_base, fp_base = np.zeros(C * K, np.int64), np.zeros(C * K, np.int64)
    tp_base[s_first] = n_tp[first] - entries.tp[first]
    fp_base[s_first] = (n_inside[first] - entries.inside[first]
                        - counted.ravel()[a_first * (n + 1) + class_base[s_first % K]])
    tp = np.flatnonzero(entries.tp)
    s, col, p = seg[tp], entries.col[tp], entries.p[tp]
    a, k = col % A, s % K
    c = (n_tp[tp] - tp_base[s]).astype(float)
    f = (counted.ravel()[a * (n + 1) + p + 1] - n_inside[tp] + fp_base[s]).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        pr = c / (f + c + np.spacing(1))
        bins = np.searchsorted(RECALL_THRESHOLDS, c / npig.ravel()[k * A + a], side="right")
    table = np.zeros(C * K * (R + 2))
    if len(pr):
        bin_key = s * (R + 2) + bins   # non-decreasing: segments are contiguous
        first = np.flatnonzero(np.r_[True, bin_key[1:] != bin_key[:-1]])
        table[bin_key[first]] = np.maximum.reduceat(pr, first)
    table = np.maximum.accumulate(table.reshape(C, K, R + 2)[..., ::-1], axis=-1)[..., ::-1]
    q = table[..., 1:R + 1].reshape(T, A, K, R).transpose(0, 3, 2, 1)          # [T, R, K, A]
    present = npig > 0
    tp_total = np.bincount(s, minlength=C * K).reshape(T, A, K).transpose(0, 2, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(present[None, None], q, -1), np.where(present[None], tp_total / npig[None], -1)


def evaluate_arrays(arr, params=DEFAULT_PARAMS):
    """``(precision, recall)`` of `CocoArrays` with the numpy engine (``arr`` prepared for ``params``)."""
    gt_ignore = _gt_ignore(arr, params)
    return accumulate_sparse(arr, _match_sparse(arr, gt_ignore, params), _npig(arr, gt_ignore), params)


# ------------------------------------------------------------------ entry point
def eval_params(iou_thresholds=None, max_dets=None, area_ranges=None, use_cats=True):
    """`EvalParams` (pycocotools' ``Params``): ``None`` keeps pycocotools' default.

    Args:
        iou_thresholds: ``iouThrs``, e.g. ``[0.5]``; default 0.50:0.05:0.95.
        max_dets: ``maxDets``, ascending, e.g. ``[1, 10, 1000]``; default ``[1, 10, 100]``.
        area_ranges: ``areaRng`` with labels: ``{"all": (0, 1e10), "small": (0, 1024), ...}``;
            the first range is the one of the overall lines (pycocotools' ``all``).
        use_cats: ``useCats``; False matches detections to ground truth of any category.
    """
    return EvalParams.make(iou_thresholds, max_dets, area_ranges, use_cats)


def _prepared_arrays(ground_truth, detections, params):
    arr = load_coco_arrays(ground_truth, detections, max_dets=params.max_dets[-1])
    return arr if params.use_cats else single_category(arr, params.max_dets[-1])


def coco_evaluate(ground_truth, detections, *, iou_thresholds=None, max_dets=None, area_ranges=None,
                  use_cats: bool = True, use_device: bool = False, dtype: str = "float64",
                  batch_size: int = 64, jit_compile: bool = True, return_arrays: bool = False) -> dict:
    """COCO bbox evaluation of ``detections`` against ``ground_truth``, pycocotools' numbers exactly.

    Args:
        ground_truth: a COCO ground-truth dict (``images``, ``categories``, ``annotations``)
            or the path of its json file.
        detections: a list of COCO result dicts (``image_id``, ``category_id``, ``bbox``
            ``[x, y, w, h]``, ``score``) or the path of its json file; or the same as
            columns, a dict of arrays ``{"image_id": [D], "category_id": [D], "bbox": [D, 4],
            "score": [D]}`` (row ``i`` is detection ``i``; no dicts to read, so faster).
        iou_thresholds, max_dets, area_ranges, use_cats: pycocotools' ``Params``
            (``iouThrs, maxDets, areaRng/areaRngLbl, useCats``); see `eval_params`.
        use_device: run the matching and accumulation with the streaming engine
            (`kdet.metrics.coco_device`: ``keras.ops``, compiled by the Keras backend's
            compiler) in ``dtype``, ``batch_size`` images per update
            (``jit_compile=False``: not compiled).
        return_arrays: add the ``precision`` [T,R,K,A,M] and ``recall`` [T,K,A,M] arrays.

    Returns:
        ``{"AP": .., "AP50": .., ..., "AR_large": .., "per_class": {name: {"AP", "AP50"}}}``:
        the summary numbers of ``EvalParams.summary_specs`` (pycocotools' 12 with the default
        parameters; with other ``max_dets`` the lines use the values asked for, e.g.
        ``AR1000``, where pycocotools prints -1), per-class AP / AP50 (empty with
        ``use_cats=False``), and ``params`` when they are not the defaults.

    Example:
        >>> gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "cat"}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
        ...                        "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0}]}
        >>> dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.9},
        ...         {"image_id": 1, "category_id": 1, "bbox": [12, 10, 50, 50], "score": 0.8}]
        >>> result = coco_evaluate(gt, dets)
        >>> round(result["AP"], 6), result["AP_small"], round(result["per_class"]["cat"]["AP50"], 6)
        (1.0, -1.0, 1.0)
        >>> coco_evaluate(gt, dets, max_dets=[1, 2])["AR2"]
        1.0
    """
    params = eval_params(iou_thresholds, max_dets, area_ranges, use_cats)
    arr = _prepared_arrays(ground_truth, detections, params)
    if use_device:
        from kdet.metrics.coco_device import evaluate_arrays_on_device

        precision, recall = evaluate_arrays_on_device(arr, dtype=dtype, batch_size=batch_size,
                                                      jit_compile=jit_compile, params=params)
    else:
        precision, recall = evaluate_arrays(arr, params)
    result = summarize(precision, recall, params)
    result["per_class"] = per_class(precision, arr.class_names, params) if params.use_cats else {}
    if params != DEFAULT_PARAMS:
        result["params"] = params.to_dict()
    if return_arrays:
        result["precision"], result["recall"] = precision, recall
    return result


# ------------------------------------------------------------------ per-detection match records
# What each detection is at one IoU threshold and area range (pycocotools' evalImgs, explained).
OUTCOMES = (
    "tp",               # matched a ground truth of its class (not ignored)
    "ignored_crowd",    # matched a crowd region (iscrowd / VOC difficult): neither TP nor FP
    "ignored",          # matched a ground truth outside the area range, or is outside it unmatched
    "fp_duplicate",     # overlaps (IoU >= t) a ground truth of its class that a better detection took
    "fp_other_class",   # overlaps (IoU >= t) a ground truth of another class: a confusion
    "fp_localization",  # overlaps a ground truth of its class, but 0.1 <= IoU < t
    "fp_background",    # overlaps no ground truth (IoU < 0.1 with its class, < t with others)
)
LOCALIZATION_IOU = 0.1


@dataclass
class MatchRecords:
    """Per-detection match records (pycocotools' ``evalImgs`` as arrays), one row per evaluated detection.

    Rows are the detections pycocotools evaluates (the best ``max_dets[-1]`` per image and
    category), in (image, category, score) order. ``T`` and ``A`` index
    ``params.iou_thresholds`` and ``params.area_ranges``.
    """

    params: EvalParams
    det_index: np.ndarray    # [D] position of the detection in the detections list
    image_id: np.ndarray     # [D]
    category_id: np.ndarray  # [D] (-1 with use_cats=False)
    score: np.ndarray        # [D]
    gt_index: np.ndarray     # [D, T, A] position of the matched annotation in the ground truth's list, -1: none
    ignored: np.ndarray      # [D, T, A] bool: neither TP nor FP
    outcome: np.ndarray      # [D, T, A] int8: index into OUTCOMES
    category_names: dict = None  # {category_id: name}

    def outcome_names(self, iou=0.5, area=None):
        """The outcome name of each row at IoU threshold ``iou`` and area range ``area`` (default: the first)."""
        return [OUTCOMES[k] for k in self.outcome[:, self._t(iou), self._a(area)]]

    def counts(self, iou=0.5, area=None, by_category=True):
        """``{category_id: {outcome: count}}`` (or one dict over all) at ``iou`` and ``area``."""
        codes = self.outcome[:, self._t(iou), self._a(area)]
        if not by_category:
            return {name: int(np.sum(codes == k)) for k, name in enumerate(OUTCOMES)}
        return {int(c): {name: int(np.sum(codes[self.category_id == c] == k)) for k, name in enumerate(OUTCOMES)}
                for c in np.unique(self.category_id)}

    def _t(self, iou):
        hit = np.flatnonzero(np.isclose(self.params.thresholds, iou, rtol=0, atol=1e-9))
        if not hit.size:
            raise ValueError(f"IoU threshold {iou} was not evaluated (thresholds: {list(self.params.iou_thresholds)})")
        return int(hit[0])

    def _a(self, area):
        names = self.params.area_names
        if area is None:
            return 0
        if area not in names:
            raise ValueError(f"area range {area!r} was not evaluated (ranges: {list(names)})")
        return names.index(area)


def match_records(ground_truth, detections, *, iou_thresholds=None, max_dets=None, area_ranges=None,
                  use_cats=True) -> MatchRecords:
    """Why each detection is a TP, ignored or a false positive, at every IoU threshold and area range.

    Same inputs and parameters as `coco_evaluate` (and the same matching: counting the
    ``"tp"`` and ``fp_*`` outcomes per category reproduces its precision and recall).

    Args:
        ground_truth, detections: as `coco_evaluate` (dicts / lists or json paths).
        iou_thresholds, max_dets, area_ranges, use_cats: pycocotools' ``Params`` (`eval_params`).

    Returns:
        `MatchRecords`; ``records.counts(iou=0.5)`` gives ``{category_id: {outcome: n}}``.

    Example:
        >>> gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40]}]}
        >>> dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "score": 0.9},
        ...         {"image_id": 1, "category_id": 1, "bbox": [1, 0, 40, 40], "score": 0.8},
        ...         {"image_id": 1, "category_id": 2, "bbox": [0, 0, 40, 40], "score": 0.7},
        ...         {"image_id": 1, "category_id": 1, "bbox": [200, 200, 9, 9], "score": 0.6}]
        >>> match_records(gt, dets).outcome_names(iou=0.5)
        ['tp', 'fp_duplicate', 'fp_background', 'fp_other_class']
    """
    params = eval_params(iou_thresholds, max_dets, area_ranges, use_cats)
    arr = _prepared_arrays(ground_truth, detections, params)
    m = _match_all(arr, params)
    best_same, best_other = _best_overlaps(arr)
    thr = params.thresholds[None, :, None]
    crowd_match = (m.gt_index >= 0) & arr.gt_crowd[np.maximum(m.gt_index, 0)]
    outcome = np.full(m.tp.shape, OUTCOMES.index("fp_background"), np.int8)
    fp_kinds = [(best_same[:, None, None] >= LOCALIZATION_IOU, "fp_localization"),
                (best_other[:, None, None] >= thr, "fp_other_class"),
                (best_same[:, None, None] >= thr, "fp_duplicate")]
    for cond, name in fp_kinds:  # later ones win
        outcome[m.fp & cond] = OUTCOMES.index(name)
    outcome[m.ignored] = OUTCOMES.index("ignored")
    outcome[m.ignored & crowd_match] = OUTCOMES.index("ignored_crowd")
    outcome[m.tp] = OUTCOMES.index("tp")
    source = arr.gt_source[np.maximum(m.gt_index, 0)]
    return MatchRecords(
        params=params, det_index=arr.det_source, image_id=arr.image_ids[arr.det_image],
        category_id=arr.category_ids[arr.det_class], score=arr.det_score,
        gt_index=np.where(m.gt_index >= 0, source, -1), ignored=m.ignored, outcome=outcome,
        category_names=dict(zip(arr.category_ids.tolist(), arr.class_names)))


def _best_overlaps(arr):
    """Per detection: the best IoU with a non-crowd ground truth of its class / of another class, [D] each."""
    n_det = len(arr.det_score)
    best_same, best_other = np.zeros(n_det), np.zeros(n_det)
    for d_idx, d_valid, g_idx, g_valid in _padded_groups(arr.det_image, arr.gt_image):
        with np.errstate(divide="ignore", invalid="ignore"):
            ious = iou_xywh(arr.det_xywh[d_idx], arr.gt_xywh[g_idx], np.zeros(g_idx.shape, bool))
        usable = (g_valid & ~arr.gt_crowd[g_idx])[:, None, :]
        same = arr.det_class[d_idx][:, :, None] == arr.gt_class[g_idx][:, None, :]
        best_same[d_idx[d_valid]] = np.where(usable & same, ious, 0.0).max(-1)[d_valid]
        best_other[d_idx[d_valid]] = np.where(usable & ~same, ious, 0.0).max(-1)[d_valid]
    return best_same, best_other


def format_outcomes(records, class_names=None, iou=0.5, area=None):
    """A per-category table of the detections' outcomes at ``iou`` (TPs and the kinds of FP).

    ``class_names``: ``{category_id: name}``; default the ground truth's names.
    """
    counts = records.counts(iou=iou, area=area)
    names = dict(class_names or records.category_names or {})
    columns = ["tp", "fp_duplicate", "fp_other_class", "fp_localization", "fp_background", "ignored_crowd", "ignored"]
    heads = ["TP", "dup", "other_cls", "loc", "backgr", "crowd", "ign"]
    labels = {c: str(names.get(c, c)) for c in counts}
    width = max([len(v) for v in labels.values()] + [8])
    lines = [f"detections at IoU {iou:.2f}, area {area or records.params.area_names[0]}: "
             "TP and why the others are false positives (dup: a better detection took the object; "
             "other_cls: overlaps an object of another class; loc: IoU >= 0.1 with its class; "
             "crowd/ign: ignored)",
             f"{'category':<{width}}  " + "  ".join(f"{h:>9}" for h in heads)]
    for c, row in counts.items():
        lines.append(f"{labels[c]:<{width}}  " + "  ".join(f"{row[k]:>9d}" for k in columns))
    return "\n".join(lines)
