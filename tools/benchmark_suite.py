#!/usr/bin/env python
"""Train kdet and its peer on a suite of real datasets at one time budget each; one table, scored by pycocotools.

    python tools/benchmark_suite.py --budget 15 --ultralytics-python /work/venv-race/bin/python
    python tools/benchmark_suite.py --split val --budget 5 --set loss.assigner=atss   # choosing a default

For every dataset (default: each folder of ``../shared/datasets``), each system trains from scratch
for ``--budget`` minutes and predicts the evaluation split (``--split test``, or ``val`` when choosing
defaults: a default is never chosen on test):

* ``kdet``: ``python tools/train.py RECIPE --set data.root=DATASET --set train.time_budget=BUDGET``
  in a fresh process (default recipe ``recipes/ssd_custom.py``, the own-data default), plus ``--set``;
  with ``--split val`` the run's final evaluation is its val split (``data.test=None``).
* ``yolov8n``: Ultralytics' YOLOv8n from ``yolov8n.yaml``, 320 px, its defaults, ``time=`` the budget,
  in its own virtual environment (``--ultralytics-python``), on kdet's records of the same splits
  (``tools/benchmark_race.py``'s runner).

Every system is scored against one ground truth per dataset (kdet's records of the evaluation split,
written once as COCO json), by pycocotools. The table: per dataset AP / AP50 / epochs / minutes and the
dataset's licence, then each system's mean AP, mean AP50 and mean rank (by AP; 1 is best) over the
datasets every system finished. ``OUT/suite.md`` holds the table, ``OUT/DATASET.json`` the rows.
``--reuse`` keeps the finished (dataset, system) runs of an earlier call.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATASETS = os.path.join(os.path.dirname(REPO), "shared", "datasets")
DEFAULT_RECIPE = os.path.join(REPO, "recipes", "ssd_custom.py")
SYSTEMS = ("kdet", "yolov8n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=None,
                        help=f"dataset folders or names under {DATASETS} (default: all of them)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: kdet, yolov8n")
    parser.add_argument("--budget", type=float, default=15.0, help="training minutes per system and dataset")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="evaluation split (val: for choosing defaults; never test for that)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="kdet's recipe (default: the own-data default)")
    parser.add_argument("--name", default=None, help="kdet's row label (default: kdet RECIPE_NAME)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more kdet recipe overrides")
    parser.add_argument("--ultralytics-python", default=os.environ.get("KDET_ULTRALYTICS_PYTHON"),
                        help="a Python with ultralytics installed (its own venv); without it YOLOv8n is not run")
    parser.add_argument("--imgsz", type=int, default=320, help="Ultralytics' input size")
    parser.add_argument("--out", default=os.path.join("work_dirs", "suite"), help="output folder")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of an earlier call in OUT")
    return parser.parse_args(argv)


# ------------------------------------------------------------------ datasets
def dataset_folders(names):
    """Absolute dataset folders: ``names`` (paths, or names under DATASETS), else every folder of DATASETS."""
    if not names:
        if not os.path.isdir(DATASETS):
            raise SystemExit(f"benchmark_suite: no datasets folder at {DATASETS}; name them with --datasets")
        names = sorted(n for n in os.listdir(DATASETS) if os.path.isdir(os.path.join(DATASETS, n)))
    folders = []
    for name in names:
        folder = name if os.path.isdir(name) else os.path.join(DATASETS, name)
        if not os.path.isdir(folder):
            raise SystemExit(f"benchmark_suite: dataset {name!r} not found (neither a folder nor in {DATASETS})")
        folders.append(os.path.abspath(folder))
    return folders


def dataset_licence(folder):
    """The licence a dataset states (data.yaml's roboflow licence, README.dataset.txt, LICENSE, or the
    datasets README's table), for the table: figures on a dataset name its licence."""
    import yaml

    yaml_path = os.path.join(folder, "data.yaml")
    if os.path.isfile(yaml_path):
        with open(yaml_path) as f:
            data = yaml.safe_load(f) or {}
        licence = (data.get("roboflow") or {}).get("license") if isinstance(data, dict) else None
        if licence:
            return str(licence)
    for name in ("README.dataset.txt", "README.roboflow.txt"):
        found = _first_match(os.path.join(folder, name), r"^\s*License:\s*(.+?)\s*$")
        if found:
            return found
    found = _first_match(os.path.join(folder, "LICENSE"), r"^\s*(\S.*?)\s*$")
    if found:
        return found
    row = _first_match(os.path.join(os.path.dirname(folder), "README.md"),
                       rf"^\|\s*{re.escape(os.path.basename(folder))}\s*\|.*\|\s*([^|]+?)\s*\|\s*$")
    return row or "unknown (see the dataset's files)"


def _first_match(path, pattern):
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        for line in f:
            match = re.match(pattern, line)
            if match:
                return match.group(1)
    return None


def load_splits(folder, split, recipe_path, overrides):
    """``(records by split, class names)`` as kdet's recipe reads ``folder`` (train, val, and the evaluation split)."""
    from kdet.config import load_recipe, resolve_source

    recipe = load_recipe(recipe_path, [f"data.root={folder}", *overrides])
    data = recipe["data"]
    records, names = {}, None
    for part in ("train", "val", "test"):
        source = resolve_source(data.get(part), data.get("root"), data)
        records[part] = source.records() if source is not None else []
        names = names or (list(source.class_names) if source is not None else None)
    records["eval"] = records[split] or records["val"]
    return records, names


# ------------------------------------------------------------------ systems
def kdet_overrides(args, folder):
    overrides = [f"data.root={folder}", f"train.time_budget={args.budget:g}", "eval.report_train_images=0", *args.set]
    if args.split == "val":
        overrides.append("data.test=None")  # the final evaluation falls back to the val split
    return overrides


def run_kdet(args, folder, work_dir):
    """``tools/train.py`` in a fresh process, as a user runs it; returns (row fields, COCO results by file name)."""
    overrides = kdet_overrides(args, folder)
    command = [sys.executable, os.path.join(REPO, "tools", "train.py"), args.recipe, "--work-dir", work_dir]
    for item in overrides:
        command += ["--set", item]
    print("$ " + " ".join(command), flush=True)
    done = subprocess.run(command, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"benchmark_suite: kdet failed on {folder} (exit {done.returncode}); see its output above")
    with open(os.path.join(work_dir, "state.json")) as f:
        epochs = json.load(f)["epochs_done"]
    with open(os.path.join(work_dir, "metrics.json")) as f:
        seconds = json.load(f)["train_seconds"]
    with open(os.path.join(work_dir, "ground_truth.json")) as f:
        names = {image["id"]: os.path.basename(image["file_name"]) for image in json.load(f)["images"]}
    with open(os.path.join(work_dir, "test_detections.json")) as f:
        results = [dict(r, file_name=names[r["image_id"]]) for r in json.load(f)]
    return dict(epochs=epochs, train_seconds=seconds), results


def run_yolov8n(args, records, class_names, work_dir, max_det, ground_truth):
    """YOLOv8n through ``tools/benchmark_race.py``'s runner; returns (row fields, COCO results on ``ground_truth``)."""
    race = _race()
    peer = race.train_ultralytics(args.ultralytics_python, work_dir, records["train"], records["val"] or records["eval"],
                                  records["eval"], class_names, args.imgsz, args.budget, max_det)
    fields = dict(epochs=peer["epochs"], train_seconds=peer["train_seconds"], version=peer["version"])
    return fields, race.ultralytics_results(peer, ground_truth)


def _race():
    sys.path.insert(0, HERE)
    import benchmark_race

    return benchmark_race


def on_ground_truth(results, ground_truth):
    """Results keyed by ``file_name`` -> the ground truth's image ids (category ids are 1..K in both)."""
    ids = {image["file_name"]: image["id"] for image in ground_truth["images"]}
    return [dict({k: v for k, v in r.items() if k != "file_name"}, image_id=ids[r["file_name"]]) for r in results]


# ------------------------------------------------------------------ the table
def mean_ranks(rows_by_dataset, systems):
    """Each system's mean rank by AP (1 = best, ties share the mean of their places) over the datasets."""
    ranks = {s: [] for s in systems}
    for rows in rows_by_dataset:
        scores = {r["system"]: r["AP"] for r in rows}
        for system in systems:
            better = sum(1 for other in systems if scores[other] > scores[system])
            tied = sum(1 for other in systems if scores[other] == scores[system])
            ranks[system].append(better + (tied + 1) / 2)
    return {s: sum(v) / len(v) for s, v in ranks.items() if v}


def format_suite(results, systems, split, budget):
    """The markdown table: one line per (dataset, system), then the means over complete datasets."""
    lines = [f"| dataset (licence) | {split} images | system | AP | AP50 | epochs | train min |",
             "|---|---|---|---|---|---|---|"]
    complete = []
    for dataset in results:
        rows = {r["system"]: r for r in dataset["rows"]}
        for system in systems:
            if system in rows:
                r = rows[system]
                lines.append(f"| {dataset['dataset']} ({dataset['licence']}) | {dataset['eval_images']} | {system} | "
                             f"{r['AP']:.3f} | {r['AP50']:.3f} | {r['epochs']} | {r['train_seconds'] / 60:.1f} |")
        if all(s in rows for s in systems):
            complete.append([rows[s] for s in systems])
    lines += ["", f"Over {len(complete)} datasets every system finished ({budget:g} min each, {split} split):", "",
              "| system | mean AP | mean AP50 | mean rank (AP) |", "|---|---|---|---|"]
    ranks = mean_ranks(complete, systems)
    for k, system in enumerate(systems):
        if complete:
            ap = sum(rows[k]["AP"] for rows in complete) / len(complete)
            ap50 = sum(rows[k]["AP50"] for rows in complete) / len(complete)
            lines.append(f"| {system} | {ap:.3f} | {ap50:.3f} | {ranks[system]:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    race = _race()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"benchmark_suite: unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if "yolov8n" in systems and not args.ultralytics_python:
        print("note: no --ultralytics-python (or KDET_ULTRALYTICS_PYTHON): YOLOv8n is not run")
        systems.remove("yolov8n")
    labels = {"kdet": args.name or f"kdet {os.path.splitext(os.path.basename(args.recipe))[0]}",
              "yolov8n": f"YOLOv8n {args.imgsz} px"}
    os.makedirs(args.out, exist_ok=True)
    from kdet.data.coco import records_to_coco_json
    from kdet.defaults import nms_settings

    max_det = nms_settings({})["max_detections"]
    results = []
    for folder in dataset_folders(args.datasets):
        name = os.path.basename(folder.rstrip("/"))
        print(f"\n==== {name} ({args.split} split, {args.budget:g} min per system)", flush=True)
        records, class_names = load_splits(folder, args.split, args.recipe, args.set)
        ground_truth = records_to_coco_json(records["eval"], class_names)
        for image in ground_truth["images"]:
            image["file_name"] = os.path.basename(image["file_name"])
        dataset_out = os.path.join(args.out, name)
        os.makedirs(dataset_out, exist_ok=True)
        with open(os.path.join(dataset_out, "ground_truth.json"), "w") as f:
            json.dump(ground_truth, f)
        rows = []
        for system in systems:
            work_dir = os.path.join(dataset_out, system)
            row_path = os.path.join(work_dir, "row.json")
            if args.reuse and os.path.exists(row_path):
                with open(row_path) as f:
                    rows.append(json.load(f))
                print(f"{labels[system]}: reused {row_path}")
                continue
            print(f"== {labels[system]} on {name}", flush=True)
            if system == "kdet":
                fields, found = run_kdet(args, folder, work_dir)
                found = on_ground_truth(found, ground_truth)
            else:
                fields, found = run_yolov8n(args, records, class_names, work_dir, max_det, ground_truth)
            row = dict(system=labels[system], **fields, **race.coco_scores(ground_truth, found))
            os.makedirs(work_dir, exist_ok=True)
            with open(row_path, "w") as f:
                json.dump(row, f, indent=1)
            rows.append(row)
        entry = dict(dataset=name, folder=folder, licence=dataset_licence(folder), split=args.split,
                     eval_images=len(records["eval"]), train_images=len(records["train"]), class_names=class_names,
                     budget_minutes=args.budget, rows=rows)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(entry, f, indent=1)
        results.append(entry)
    table = format_suite(results, [labels[s] for s in systems], args.split, args.budget)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (f"kdet benchmark suite, {stamp}, {os.cpu_count()} CPUs; scored by pycocotools against one ground truth "
            f"per dataset (at most {max_det} detections per image)\n\n{table}\n")
    with open(os.path.join(args.out, "suite.md"), "w") as f:
        f.write(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
