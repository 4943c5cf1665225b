"""Audit a detection dataset: counts, imbalance, box statistics, annotation defects.

    python tools/audit_dataset.py RECIPE_OR_VOC_DIR [--split train ...] [--classes a,b,c] [--out DIR]

A VOC directory is read leniently from its XML (so boxes the loader would
reject are reported); a recipe file (``recipe["data"]["train"|"val"|"test"]``
sources) is audited through its sources. Writes audit.txt, audit.json,
box_histograms.png and contact_sheet.png into --out and prints the text report.
Exit status 1 with --strict when there are findings.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdet.cli import ToolError, tool_main  # noqa: E402
from kdet.data.audit import audit_sources, audit_voc_dir, load_recipe, recipe_sources  # noqa: E402


def build_report(target, splits=None, class_names=None, check_images=True, overrides=()):
    path = Path(target)
    if path.is_dir():
        return audit_voc_dir(path, splits or None, class_names, check_images=check_images)
    if path.suffix == ".py" and path.is_file():
        recipe = load_recipe(path, overrides)
        sources = recipe_sources(recipe, splits or ("train", "val", "test"))
        if not sources:
            raise ToolError(f"{path}: the recipe's data section has no train/val/test source")
        class_names = class_names or recipe.get("data", {}).get("class_names")
        return audit_sources(sources, class_names, check_images=check_images)
    if not path.exists():
        raise ToolError(f"{target}: no such file or folder")
    raise ToolError(f"{target}: neither a VOC directory nor a recipe .py file")


@tool_main(needs_tensorflow=False)
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a VOC directory or a recipe .py file")
    parser.add_argument("--split", action="append", default=[],
                        help="split to audit (repeatable); VOC: ImageSets/Main/SPLIT.txt, recipe: train/val/test")
    parser.add_argument("--classes", default=None, help="comma-separated class list (VOC directory)")
    parser.add_argument("--out", default=None, help="output folder (default audit-<name>)")
    parser.add_argument("--crops", type=int, default=8, help="object crops per class on the contact sheet")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--no-image-check", action="store_true", help="do not open the image files")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, e.g. data.root=/data/BCCD (repeatable)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when there are findings")
    args = parser.parse_args(argv)

    class_names = args.classes.split(",") if args.classes else None
    report = build_report(args.target, args.split, class_names, check_images=not args.no_image_check,
                          overrides=args.set)
    out = Path(args.out or f"audit-{Path(args.target).stem}")
    paths = report.save(out, plots=not args.no_plots, crops_per_class=args.crops)
    print(report.to_text())
    print("\nwritten: " + ", ".join(str(p) for p in paths.values()))
    return 1 if args.strict and report.num_findings else 0


if __name__ == "__main__":
    sys.exit(main())
