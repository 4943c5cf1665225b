"""Pre-flight: what is wrong with the data and the set-up, before the first training step.

Host-side numpy, run by ``kdet.engine.train`` after the records load (printed
briefly, saved in full as ``preflight.txt`` and ``preflight.json`` in the work
dir; the run report reads the json for its evidence). Everything is computed
from the training records and the recipe:

* per class: images, objects, share of objects; the imbalance ratio (most /
  fewest objects); degenerate, out-of-image and near-duplicate boxes
  (``kdet.data.audit``'s checks, on every split);
* object sizes **at the model's input size** (``sqrt(w h)`` after the plain
  resize to ``model.image_size``), with a warning when at least
  ``SMALL_SHARE`` of a class is below ``SMALL_PX`` pixels there (about where
  the first feature map, stride 8, stops resolving objects), naming the
  ``image_size`` that lifts that class's small quantile to ``SMALL_PX``;
* anchor coverage per class under the recipe's matching rule: the share of
  objects whose best anchor reaches ``loss.iou_threshold`` and the mean number
  of positive anchors per object (``kdet.analysis.anchors``), with a warning
  below ``MIN_COVERAGE`` that names the fix (``"auto"`` anchors, with the
  coverage they would give, or the matching IoU that would reach it).
"""

import json
import math
import os

import numpy as np

from kdet.analysis.anchors import coverage_of_boxes, fit_ssd_parameters, training_boxes
from kdet.log import get_logger

logger = get_logger(__name__)

SMALL_PX = 8.0          # objects below this many input pixels (sqrt of area) are "tiny"
SMALL_SHARE = 0.10      # warn when at least this share of a class is tiny
MIN_COVERAGE = 0.90     # warn when fewer objects of a class reach the matching IoU


# ------------------------------------------------------------------ the pieces
def class_table(records, class_names):
    """Per class ``dict(images, objects, share)`` of ``records``, and the imbalance ratio."""
    objects = np.zeros(len(class_names), np.int64)
    images = np.zeros(len(class_names), np.int64)
    for record in records:
        classes = np.asarray(record.classes, np.int64)
        objects += np.bincount(classes, minlength=len(class_names))[:len(class_names)]
        images[np.unique(classes)] += 1
    total = max(int(objects.sum()), 1)
    table = {name: dict(images=int(images[k]), objects=int(objects[k]), share=float(objects[k] / total))
             for k, name in enumerate(class_names)}
    present = objects[objects > 0]
    ratio = float(present.max() / present.min()) if len(present) else None
    return table, ratio


def box_problems(records_by_split, class_names):
    """The audit's degenerate / out-of-image / near-duplicate findings over the splits."""
    from kdet.data.audit import audit_records

    report = audit_records({s: r for s, r in records_by_split.items() if r}, class_names, source="recipe",
                           check_images=False)
    return {kind: report.findings[kind] for kind in ("degenerate_boxes", "out_of_image_boxes", "duplicate_boxes")}


def sizes_at_input(records, class_names, image_size):
    """Per class ``sqrt(w h)`` of each object at the input size (``size``) and in the original (``original``)."""
    height, width = (image_size, image_size) if isinstance(image_size, (int, float)) else image_size
    at_input, original, classes = [], [], []
    for record in records:
        b = np.asarray(record.boxes, np.float64).reshape(-1, 4)[~record.ignore]
        w, h = np.clip(b[:, 2] - b[:, 0], 0, None), np.clip(b[:, 3] - b[:, 1], 0, None)
        original.append(np.sqrt(w * h))
        at_input.append(np.sqrt(w * width / record.width * h * height / record.height))
        classes.append(np.asarray(record.classes)[~record.ignore])
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)
    at_input, original, classes = cat(at_input), cat(original), cat(classes)
    return {name: dict(size=at_input[classes == k], original=original[classes == k])
            for k, name in enumerate(class_names)}


def size_summary(sizes, image_size, small_px=SMALL_PX, small_share=SMALL_SHARE):
    """Per class percentiles at input, the tiny share and the ``image_size`` that would fix it."""
    side = image_size if isinstance(image_size, (int, float)) else min(image_size)
    out = {}
    for name, entry in sizes.items():
        s = entry["size"]
        if len(s) == 0:
            out[name] = dict(objects=0)
            continue
        quantile = float(np.quantile(s, small_share))
        tiny = float(np.mean(s < small_px))
        row = dict(objects=int(len(s)), p5=float(np.percentile(s, 5)), p50=float(np.median(s)),
                   p95=float(np.percentile(s, 95)), tiny_share=tiny, small_quantile=quantile)
        if tiny >= small_share:
            row["fix_image_size"] = _round_up(side * small_px / max(quantile, 1e-6), 32)
            row["tiny_in_original"] = bool(np.quantile(entry["original"], small_share) < small_px)
        out[name] = row
    return out


def _round_up(value, multiple):
    return int(math.ceil(value / multiple) * multiple)


def anchor_summary(records, class_names, anchors, image_size, match_iou):
    """Coverage at the matching IoU (share with best IoU >= it, positives per object) per class."""
    boxes, classes = training_boxes(records)
    coverage = coverage_of_boxes(boxes, classes, anchors, image_size, class_names,
                                 iou_threshold=match_iou, match_iou=match_iou)
    best = coverage.pop("best_iou")
    for k, name in enumerate(class_names):
        mine = best[classes == k]
        # The matching IoU at which MIN_COVERAGE of this class would reach a positive by the threshold rule.
        coverage["per_class"][name]["iou_for_target"] = (
            float(np.quantile(mine, 1 - MIN_COVERAGE)) if len(mine) else None)
    return coverage


# ------------------------------------------------------------------ warnings
def size_warnings(summary, image_size, small_px=SMALL_PX, fine_map_hint=False):
    """One warning per class with many tiny objects; ``fine_map_hint`` also names ``model.fine_map``."""
    warnings = []
    for name, row in summary.items():
        if "fix_image_size" not in row:
            continue
        text = (f"{name}: {100 * row['tiny_share']:.0f}% of its objects are under {small_px:g} px at the input size "
                f"{image_size} (median {row['p50']:.1f} px); the first feature map cannot resolve them. "
                f"model.image_size={row['fix_image_size']} would bring {100 * SMALL_SHARE:.0f}% of them to {small_px:g} px")
        if row.get("tiny_in_original"):
            text += " (they are that small in the original images too: upsampling helps the anchors, not the detail)"
        if fine_map_hint:
            text += "; or model.fine_map=True, a stride-4 first map (VGG16 backbones)"
        warnings.append(text)
    return warnings


def coverage_warnings(coverage, auto_fit=None, assigner="max_iou"):
    warnings = []
    match = coverage["match_iou"]
    for name, row in coverage["per_class"].items():
        if row["covered"] is None or row["covered"] >= MIN_COVERAGE:
            continue
        fixes = []
        fitted = auto_fit["per_class"][name]["covered"] if auto_fit is not None else None
        if fitted is not None and fitted >= row["covered"] + 0.1:   # only when the fit helps
            fixes.append(f"model.anchor_scales='auto' and model.aspect_ratios='auto' "
                         f"(fitted anchors: {100 * auto_fit['per_class'][name]['covered']:.0f}%)")
        if row["iou_for_target"] is not None and row["iou_for_target"] < match:
            fixes.append(f"loss.iou_threshold={math.floor(100 * row['iou_for_target']) / 100:g} "
                         f"(reaches {100 * MIN_COVERAGE:.0f}% with these anchors)")
        text = (f"{name}: only {100 * row['covered']:.0f}% of its objects have an anchor at IoU >= {match:g} "
                f"(mean best IoU {row['mean_best_iou']:.2f}, {row['positives_per_box']:.1f} positive anchors "
                f"per object): the loss trains it on few, poorly fitting anchors")
        if fixes:
            text += "; fix: " + " or ".join(fixes)
        if assigner != "max_iou":
            text += f" (coverage is modelled with the max-IoU rule; the recipe uses assigner={assigner!r})"
        warnings.append(text)
    return warnings


# ------------------------------------------------------------------ the whole check
def run_preflight(recipe, records_by_split, class_names, anchor_setup=None, auto_text=None):
    """All checks on the recipe's records; returns ``dict(brief, full, data)``.

    ``anchor_setup``: ``kdet.analysis.anchors.AnchorSetup`` of the model to train
    (built from the recipe when ``None``); ``auto_text``: what the "auto" anchor fit printed.
    """
    from kdet.analysis.anchors import model_anchor_setup
    from kdet.models.backbones import VGG16_BACKBONES

    train = records_by_split["train"]
    image_size = recipe["model"].get("image_size", 300)
    loss_cfg = recipe.get("loss", {})
    match_iou = float(loss_cfg.get("iou_threshold", 0.5))
    table, ratio = class_table(train, class_names)
    problems = box_problems(records_by_split, class_names)
    sizes = size_summary(sizes_at_input(train, class_names, image_size), image_size)
    setup = anchor_setup or model_anchor_setup(recipe["model"], len(class_names))
    coverage = anchor_summary(train, class_names, setup.boxes(), image_size, match_iou)
    auto_fit = None
    if any(r["covered"] is not None and r["covered"] < MIN_COVERAGE for r in coverage["per_class"].values()):
        auto_fit = _auto_fit_coverage(train, class_names, setup, match_iou)
    fine_map_hint = recipe["model"].get("backbone") in VGG16_BACKBONES and not recipe["model"].get("fine_map")
    warnings = size_warnings(sizes, image_size, fine_map_hint=fine_map_hint) + coverage_warnings(coverage, auto_fit, loss_cfg.get("assigner", "max_iou"))
    warnings += _problem_warnings(problems)
    reweighted = loss_cfg.get("class_weights") is not None or recipe["data"].get("repeat_factor_threshold")
    if ratio is not None and ratio >= 10 and not reweighted:
        least = min((n for n in table if table[n]["objects"]), key=lambda n: table[n]["objects"])
        warnings.append(f"class imbalance {ratio:.1f}x (fewest: {least}, {table[least]['objects']} objects): "
                        "loss.class_weights='auto' or data.repeat_factor_threshold=0.3 reweight it")
    data = dict(image_size=image_size, match_iou=match_iou, classes=table, imbalance_ratio=ratio,
                box_problems={k: len(v) for k, v in problems.items()}, sizes_at_input=sizes,
                anchor_coverage=coverage, auto_anchor_coverage=auto_fit, warnings=warnings,
                num_train_images=len(train))
    full = format_preflight(data, problems, auto_text)
    brief = "\n".join([f"pre-flight: {len(train)} training images, {sum(r['objects'] for r in table.values())} objects, "
                       f"{len(warnings)} warning(s) (full: preflight.txt)"] + [f"  WARNING {w}" for w in warnings])
    return dict(brief=brief, full=full, data=data)


def _auto_fit_coverage(train, class_names, setup, match_iou):
    """Coverage that the k-means ("auto") anchors would give, for the warning's fix."""
    boxes, classes = training_boxes(train)
    try:
        scales, ratios, _ = fit_ssd_parameters(boxes, setup)
    except ValueError:   # no boxes to fit
        return None
    after = coverage_of_boxes(boxes, classes, setup.boxes(scales, ratios), setup.image_size,
                              class_names, iou_threshold=match_iou, match_iou=match_iou)
    after.pop("best_iou")
    return after


def _problem_warnings(problems):
    names = dict(degenerate_boxes="degenerate boxes (width or height <= 1 px)",
                 out_of_image_boxes="boxes beyond the image", duplicate_boxes="near-duplicate box pairs (IoU > 0.9)")
    out = []
    for kind, items in problems.items():
        if items:
            where = ", ".join(sorted({str(i.get("image_id")) for i in items})[:5])
            out.append(f"{len(items)} {names[kind]}, e.g. in {where} (tools/audit_dataset.py lists them)")
    return out


def format_preflight(data, problems, auto_text=None):
    names = list(data["classes"])
    width = max([len(n) for n in names] + [10]) + 2
    cov = data["anchor_coverage"]
    lines = [f"pre-flight check: {data['num_train_images']} training images, input size {data['image_size']}, "
             f"matching IoU {data['match_iou']:g}", "",
             f"{'class':<{width}}{'images':>8}{'objects':>9}{'share':>8}   {'size at input p5/p50/p95':<24}"
             f"{'< 8px':>7}   {'anchor IoU>=' + format(data['match_iou'], 'g'):>14}{'mean IoU':>9}{'pos/obj':>8}"]
    for name in names:
        c, s, a = data["classes"][name], data["sizes_at_input"][name], cov["per_class"][name]
        size = (f"{s['p5']:6.1f} /{s['p50']:6.1f} /{s['p95']:6.1f}" if s.get("objects") else f"{'-':>22}")
        tiny = f"{100 * s['tiny_share']:.0f}%" if s.get("objects") else "-"
        covered = "-" if a["covered"] is None else f"{100 * a['covered']:.1f}%"
        lines.append(f"{name:<{width}}{c['images']:>8}{c['objects']:>9}{100 * c['share']:>7.1f}%   {size:<24}"
                     f"{tiny:>7}   {covered:>14}{_num(a['mean_best_iou']):>9}{_num(a['positives_per_box'], '.1f'):>8}")
    ratio = data["imbalance_ratio"]
    lines += ["", f"imbalance ratio (most / fewest objects): {'-' if ratio is None else f'{ratio:.2f}'}",
              f"anchors: {cov['num_anchors']}", ""]
    lines.append("box problems (kdet.data.audit, all splits):")
    for kind, items in problems.items():
        lines.append(f"  {kind.replace('_', ' ')}: {len(items)}")
        for item in items[:20]:
            lines.append(f"    {item.get('file', '')}: {item.get('class', '')} {item.get('box', item.get('boxes', ''))}")
    if auto_text:
        lines += ["", auto_text]
    lines += ["", f"warnings ({len(data['warnings'])}):"] + [f"  {w}" for w in data["warnings"]]
    return "\n".join(lines)


def _num(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def save_preflight(result, work_dir):
    """``preflight.txt`` (the full text) and ``preflight.json`` (the numbers) in ``work_dir``."""
    os.makedirs(work_dir, exist_ok=True)
    with open(os.path.join(work_dir, "preflight.txt"), "w") as f:
        f.write(result["full"] + "\n")
    with open(os.path.join(work_dir, "preflight.json"), "w") as f:
        json.dump(result["data"], f, indent=1, default=float)
    return os.path.join(work_dir, "preflight.txt")


def preflight_for_training(recipe, records_by_split, class_names, work_dir, verbose=True):
    """What ``engine.train`` runs after loading the records; returns the recipe to train.

    ``"auto"`` anchors are fitted first (their before/after coverage printed),
    so the checks see the anchors the model will have; the full text goes to
    ``preflight.txt``, the numbers to ``preflight.json``.
    """
    from kdet.analysis.anchors import model_anchor_setup, resolve_auto_anchors

    recipe, auto_text = resolve_auto_anchors(recipe, class_names, records_by_split["train"],
                                             seed=int(recipe.get("train", {}).get("seed") or 0))
    if auto_text and verbose:
        logger.info(auto_text)
    setup = model_anchor_setup(recipe["model"], len(class_names))
    result = run_preflight(recipe, records_by_split, class_names, anchor_setup=setup, auto_text=auto_text)
    save_preflight(result, work_dir)
    if verbose:
        logger.info(result["brief"])
    return recipe
