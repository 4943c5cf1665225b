"""Recall of injected label errors by the label review (tools/find_label_issues.py) on BCCD.

    python tools/benchmark_label_issues.py [--bccd DIR] [--out DIR] [--recipe R] [--epochs 20] [--image-size 256]

Writes a noisy copy of BCCD's annotations (images linked, not copied): of the
trainval boxes (seeded), ``--noise`` (5%) get another class, 5% are deleted,
5% are shifted by half their size (a random direction: dx = w/2 cos t,
dy = h/2 sin t). Then runs the label review with ``recipes/ssd_bccd_scratch.py``
(width-0.125 VGG16-BN from scratch, fitted anchors, IoU 0.3) on a shorter
schedule (``--recipe`` another), and prints the recall of the injected errors among the top 2N
entries of label_issues.json (N = injected count), overall and per kind, with
the wall and CPU time. A swapped or shifted box counts as found when an entry
names its file and object; a deleted one when a ``missing`` entry in its image
overlaps it at IoU >= 0.5. ``--predictions`` rescores saved cross-predictions.
With cleanlab installed, cleanlab.object_detection's per-box scores are ranked
on the same predictions and measured the same way. Also writes the review of
the *unmodified* labels scored with the same out-of-fold predictions.
"""

import argparse
import json
import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = ["RBC", "WBC", "Platelets"]


# ------------------------------------------------------------------ noise
def inject_noise(src, dst, rate=0.05, seed=0, split="trainval"):
    """A noisy copy of a VOC folder; returns the list of injected errors."""
    src, dst = Path(src).resolve(), Path(dst).resolve()  # absolute: entries name absolute files
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "Annotations").mkdir(parents=True)
    shutil.copytree(src / "ImageSets", dst / "ImageSets")
    os.symlink((src / "JPEGImages").resolve(), dst / "JPEGImages")
    ids = [line.split()[0] for line in (src / "ImageSets/Main" / f"{split}.txt").read_text().splitlines() if line.strip()]
    trees, objects = {}, []
    for xml in sorted((src / "Annotations").glob("*.xml")):
        trees[xml.stem] = ET.parse(xml)
    for image_id in ids:
        for k, obj in enumerate(trees[image_id].getroot().findall("object")):
            b = [float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            if b[2] > b[0] and b[3] > b[1] and obj.findtext("name").strip() in CLASSES:
                objects.append((image_id, k))
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(objects))
    n = int(round(rate * len(objects)))
    plan = {objects[i]: kind for kinds, kind in ((chosen[:n], "wrong_class"), (chosen[n:2 * n], "missing"),
                                                (chosen[2 * n:3 * n], "bad_box")) for i in kinds}
    injected = []
    for image_id, tree in trees.items():
        root = tree.getroot()
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        new_index = 0
        xml_path = dst / "Annotations" / f"{image_id}.xml"
        for k, obj in enumerate(list(root.findall("object"))):
            kind = plan.get((image_id, k))
            box = [float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            pixel_box = [box[0] - 1, box[1] - 1, box[2], box[3]]  # kdet's pixel corners
            name = obj.findtext("name").strip()
            item = dict(kind=kind, image_id=image_id, file=str(xml_path), object=new_index, box=pixel_box,
                        **{"class": name})
            if kind == "missing":
                root.remove(obj)
                injected.append(dict(item, object=None))
                continue
            if kind == "wrong_class":
                other = rng.choice([c for c in CLASSES if c != name])
                obj.find("name").text = str(other)
                injected.append(dict(item, noisy_class=str(other)))
            elif kind == "bad_box":
                shifted = _shift(box, rng, width, height)
                for t, v in zip(("xmin", "ymin", "xmax", "ymax"), shifted):
                    obj.find(f"bndbox/{t}").text = str(int(round(v)))
                injected.append(dict(item, noisy_box=[shifted[0] - 1, shifted[1] - 1, shifted[2], shifted[3]]))
            new_index += 1
        tree.write(xml_path)
    return injected


def _shift(box, rng, width, height):
    """The box moved by half its size in a random direction, kept inside the image."""
    w, h = box[2] - box[0], box[3] - box[1]
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy = 0.5 * w * np.cos(angle), 0.5 * h * np.sin(angle)
    dx = float(np.clip(dx, 1 - box[0], width - box[2]))
    dy = float(np.clip(dy, 1 - box[1], height - box[3]))
    return [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]


# ------------------------------------------------------------------ measuring
def recall_at(entries, injected, top, iou_missing=0.5):
    """``{kind: (found, total)}`` of the injected errors among ``entries[:top]``."""
    from kdet.boxes import iou_matrix_np

    head = entries[:top]
    named = {(str(e["file"]), e["object"]) for e in head if e["object"] is not None}
    missing = {}
    for e in head:
        if e["issue"] == "missing":
            missing.setdefault(str(e["image_id"]), []).append(e["box"])
    out = {}
    for item in injected:
        if item["kind"] == "missing":
            boxes = missing.get(item["image_id"], [])
            hit = bool(boxes) and bool(iou_matrix_np(np.array([item["box"]]), np.array(boxes)).max() >= iou_missing)
        else:
            hit = (item["file"], item["object"]) in named
        found, total = out.get(item["kind"], (0, 0))
        out[item["kind"]] = (found + hit, total + 1)
    found = sum(f for f, _ in out.values())
    out["all"] = (found, len(injected))
    return out


def kind_agreement(entries, injected, top):
    """Of the injected swaps / shifts found in the top entries: right issue, right suggestion."""
    from kdet.boxes import iou_matrix_np

    by_place = {(str(e["file"]), e["object"]): e for e in entries[:top] if e["object"] is not None}
    swaps = [(i, by_place.get((i["file"], i["object"]))) for i in injected if i["kind"] == "wrong_class"]
    swaps = [(i, e) for i, e in swaps if e is not None]
    shifts = [(i, by_place.get((i["file"], i["object"]))) for i in injected if i["kind"] == "bad_box"]
    shifts = [(i, e) for i, e in shifts if e is not None]
    right_class = sum(e.get("suggested_class") == i["class"] for i, e in swaps)
    good_box = sum(bool("suggested_box" in e and iou_matrix_np(np.array([i["box"]]), np.array([e["suggested_box"]]))[0, 0]
                   >= 0.5) for i, e in shifts)
    return dict(swaps_found=len(swaps), swaps_as_wrong_class=sum(e["issue"] == "wrong_class" for _, e in swaps),
                swaps_right_suggestion=right_class, shifts_found=len(shifts),
                shifts_as_bad_box=sum(e["issue"] == "bad_box" for _, e in shifts),
                shifts_suggested_box_iou50=good_box)


def format_recall(label, result):
    cells = [f"{k} {f}/{t} ({f / max(t, 1):.0%})" for k, (f, t) in result.items()]
    return f"{label}: " + ", ".join(cells)


# ------------------------------------------------------------------ cleanlab on the same predictions
def cleanlab_entries(records, predictions, class_names, high_probability_threshold=None):
    """cleanlab.object_detection's per-box scores (overlooked / swap / badloc) as entries, lowest quality first.

    Each label gets its worse score of swap / badloc (score = 1 - quality);
    each predicted box its overlooked score. ``high_probability_threshold``
    None keeps cleanlab's default (0.95) for overlooked and swap.
    """
    from cleanlab.object_detection.rank import (compute_badloc_box_scores, compute_overlooked_box_scores,
                                                compute_swap_box_scores)

    from kdet.analysis.label_issues import _where

    labels, preds = [], []
    for record, pred in zip(records, predictions):
        labels.append(dict(bboxes=np.asarray(record.boxes, np.float32).reshape(-1, 4),
                           labels=np.asarray(record.classes, int)))
        per_class = []
        for c in range(len(class_names)):
            keep = np.asarray(pred["classes"]) == c
            per_class.append(np.concatenate([np.asarray(pred["boxes"], np.float32)[keep],
                                             np.asarray(pred["scores"], np.float32)[keep, None]], 1).reshape(-1, 5))
        preds.append(_object_array(per_class))
    overlooked = compute_overlooked_box_scores(labels=labels, predictions=preds,
                                               high_probability_threshold=high_probability_threshold)
    swap = compute_swap_box_scores(labels=labels, predictions=preds, high_probability_threshold=high_probability_threshold)
    badloc = compute_badloc_box_scores(labels=labels, predictions=preds)
    entries = []
    for n, record in enumerate(records):
        file, index = _where(record)
        for i in range(len(record.boxes)):
            kinds = {"wrong_class": swap[n][i], "bad_box": badloc[n][i]}
            kind = min(kinds, key=lambda k: np.nan_to_num(kinds[k], nan=1.0))
            entries.append(dict(file=file, image_id=record.image_id, object=index[i], box=record.boxes[i].tolist(),
                                issue=kind, score=1 - float(np.nan_to_num(kinds[kind], nan=1.0))))
        boxes = np.concatenate([p[:, :4] for p in preds[n]], 0)
        for j, quality in enumerate(overlooked[n]):
            if not np.isnan(quality):
                entries.append(dict(file=file, image_id=record.image_id, object=None, box=boxes[j].tolist(),
                                    issue="missing", score=1 - float(quality)))
    return sorted(entries, key=lambda e: -e["score"])


def _object_array(items):
    out = np.empty(len(items), dtype=object)
    for k, item in enumerate(items):
        out[k] = item
    return out


# ------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bccd", default=str(REPO.parent / "shared/datasets/BCCD"))
    p.add_argument("--recipe", default=str(REPO / "recipes" / "ssd_bccd_scratch.py"),
                   help="the recipe the folds train (default recipes/ssd_bccd_scratch.py)")
    p.add_argument("--out", default="work_dirs/label_issues_benchmark")
    p.add_argument("--noise", type=float, default=0.05, help="share of boxes per kind of error (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--predictions", default=None, help="rescore a previous run's cross_predictions.json")
    p.add_argument("--resume", action="store_true", help="reuse fold models already in OUT/review")
    args = p.parse_args(argv)

    from kdet.analysis import label_issues as li
    from kdet.config import load_recipe

    out = Path(args.out)
    injected = inject_noise(args.bccd, out / "noisy_bccd", rate=args.noise, seed=args.seed)
    (out / "injected.json").write_text(json.dumps(injected, indent=1))
    counts = {k: sum(i["kind"] == k for i in injected) for k in ("wrong_class", "missing", "bad_box")}
    print(f"injected {len(injected)} errors into {out / 'noisy_bccd'}: {counts}")
    overrides = [f"data.root={(out / 'noisy_bccd').resolve()}", f"train.epochs={args.epochs}",
                 f"model.image_size={args.image_size}"] + args.overrides
    recipe = load_recipe(args.recipe, overrides)
    print(f"recipe: {Path(args.recipe).name} with {overrides}")
    wall, cpu = time.time(), os.times()
    entries, paths = li.find_label_issues(recipe, out / "review", folds=args.folds, predictions_file=args.predictions,
                                          resume=args.resume)
    wall = time.time() - wall
    t = os.times()
    cpu = (t.user - cpu.user) + (t.system - cpu.system)
    top = 2 * len(injected)
    print(f"\nwall time {wall / 60:.1f} min, CPU time {cpu / 60:.1f} min (user+system of this process; "
          f"{os.cpu_count()} cores)")
    print(f"{len(entries)} entries; N = {len(injected)} injected, top 2N = {top}")
    for label, cut in (("top N", len(injected)), ("top 2N", top), ("all entries", len(entries))):
        print(format_recall(f"kdet recall, {label}", recall_at(entries, injected, cut)))
    found, total = recall_at(entries, injected, top, iou_missing=0.3)["missing"]
    print(f"deleted boxes found in the top 2N when a missing entry at IoU >= 0.3 counts: {found}/{total}")
    print(f"found in top 2N: {kind_agreement(entries, injected, top)}")
    kinds_top = {k: sum(e['issue'] == k for e in entries[:top]) for k in li.ISSUE_KINDS}
    print(f"issues among the top 2N entries: {kinds_top}")

    predictions_file = args.predictions or (out / "review" / "cross_predictions.json")
    _, class_names, records = li.training_data(recipe)
    predictions = li.load_predictions(predictions_file, records)
    geometric = [e for e in entries if e["issue"] in li.GEOMETRIC_KINDS]  # the audit's, as in the review above
    raw = li.merge_entries(geometric, li.score_label_issues(records, predictions, class_names, calibrate=False))
    print(format_recall("without score calibration, top 2N", recall_at(raw, injected, top)))
    _clean_review(li, recipe, args.bccd, predictions_file, out / "review_unmodified")
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        print("cleanlab not installed: no comparison")
        return 0
    for threshold in (None, 0.5):
        started = time.time()
        ranked = cleanlab_entries(records, predictions, class_names, high_probability_threshold=threshold)
        print(f"\ncleanlab.object_detection per-box scores, high_probability_threshold "
              f"{threshold or 'default (0.95)'} ({time.time() - started:.1f} s), same predictions:")
        for label, cut in (("top N", len(injected)), ("top 2N", top)):
            print(format_recall(f"cleanlab recall, {label}", recall_at(ranked, injected, cut)))
    return 0


def _clean_review(li, recipe, bccd, predictions_file, out):
    """The unmodified labels scored against the same out-of-fold predictions."""
    import copy

    clean = copy.deepcopy(recipe)
    clean["data"]["root"] = str(Path(bccd).resolve())
    entries, paths = li.find_label_issues(clean, out, predictions_file=predictions_file)
    print(f"\nunmodified BCCD labels, same out-of-fold predictions (models trained on the noisy labels): "
          f"{len(entries)} entries; top 20 in {paths['sheet']}")
    print("\n".join(paths["text"].read_text().splitlines()[:30]))


if __name__ == "__main__":
    sys.exit(main())
