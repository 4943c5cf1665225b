"""Export a trained model as a SavedModel that serves raw uint8 images.

    python tools/export.py WORK_DIR/last.keras OUT_DIR --classes RBC,WBC,Platelets
    python tools/export.py WORK_DIR/best.keras OUT_DIR --recipe recipes/ssd300_bccd.py
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdet.cli import ToolError, load_keras_model, tool_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a .keras file written by training")
    p.add_argument("out", help="SavedModel folder to write")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", help="comma-separated class names, in class-id order")
    names.add_argument("--recipe", help="take class names (and NMS settings) from this recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--score-threshold", type=float, help="default: the recipe's, else kdet.defaults.NMS_DEFAULTS")
    p.add_argument("--iou-threshold", type=float, help="default: the recipe's, else kdet.defaults.NMS_DEFAULTS")
    p.add_argument("--max-detections", type=int, help="default: the recipe's, else kdet.defaults.NMS_DEFAULTS")
    return p.parse_args(argv)


def export_settings(args):
    """Class names and NMS settings (all of them: the recipe's eval section, else kdet's defaults)."""
    from kdet.defaults import NMS_DEFAULTS

    settings = dict(NMS_DEFAULTS)
    if args.recipe:
        from kdet.config import load_recipe
        from kdet.engine import class_names_of, eval_settings, load_sources

        recipe = load_recipe(args.recipe, args.overrides)
        settings = eval_settings(recipe)
        class_names = class_names_of(recipe, load_sources(recipe))
    else:
        class_names = [c.strip() for c in args.classes.split(",") if c.strip()]
    for key in ("score_threshold", "iou_threshold", "max_detections"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return class_names, settings


@tool_main
def main(argv=None):
    args = parse_args(argv)
    from kdet.export import export_saved_model

    class_names, settings = export_settings(args)
    if not class_names:
        raise ToolError("--classes names no class")
    model = load_keras_model(args.model)
    if len(class_names) != model.num_classes:
        raise ToolError(f"{len(class_names)} class names for {args.model}, a model with {model.num_classes} classes")
    export_saved_model(model, args.out, class_names, **settings)
    print(f"SavedModel written to {args.out} (signature serving_default: uint8 images -> detections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
