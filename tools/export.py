"""Export a trained model: a SavedModel (default), a .tflite or an .onnx file, each with NMS inside.

    python tools/export.py WORK_DIR/last.keras OUT_DIR --classes RBC,WBC,Platelets
    python tools/export.py WORK_DIR/best.keras OUT_DIR --recipe recipes/ssd300_bccd.py
    python tools/export.py WORK_DIR/best.keras model.tflite --format tflite --recipe R [--quantize fp16]
    python tools/export.py WORK_DIR/best.keras model_int8.tflite --format tflite --quantize int8 --recipe R
    python tools/export.py WORK_DIR/best.keras model.onnx --format onnx --recipe R --check

Every format takes uint8 images (TFLite / ONNX: at the model's size) and writes its label map beside
it (labelmap.txt in the SavedModel folder, NAME.labels.txt beside NAME.tflite / NAME.onnx). int8
calibrates on --calibration-images of the recipe's training images. --check runs the artifact on
the recipe's test split and prints its COCO AP / AP50 beside the Keras model's.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdet.cli import ToolError, load_keras_model, tool_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a .keras file written by training")
    p.add_argument("out", help="SavedModel folder, or the .tflite / .onnx file to write")
    p.add_argument("--format", choices=("saved_model", "tflite", "onnx"), default="saved_model")
    p.add_argument("--quantize", choices=("fp16", "int8"), help="tflite only: float16 weights, or full-integer int8")
    p.add_argument("--calibration-images", type=int, default=100, metavar="N",
                   help="int8: calibrate on N of the recipe's training images (default 100)")
    p.add_argument("--check", action="store_true",
                   help="run the artifact on the recipe's test split: its AP / AP50 beside the Keras model's")
    p.add_argument("--num-threads", type=int, help="--check: threads of the TFLite / ONNX runtime")
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
        args.loaded_recipe = recipe
    else:
        class_names = [c.strip() for c in args.classes.split(",") if c.strip()]
    for key in ("score_threshold", "iou_threshold", "max_detections"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return class_names, settings


def calibration_images(recipe, count, seed=0):
    """``count`` of the recipe's training images (uint8, as decoded), drawn at random with ``seed``."""
    import numpy as np

    from kdet.data.records import load_image
    from kdet.engine import load_sources

    train = load_sources(recipe)["train"]
    if train is None:
        raise ToolError("--quantize int8 calibrates on the recipe's training images: its data.train is empty")
    records = train.records()
    if not records:
        raise ToolError("--quantize int8: the recipe's training split has no images to calibrate on")
    picked = np.random.default_rng(seed).permutation(len(records))[:count]
    return [load_image(records[i]) for i in sorted(picked)]


def check_options(args):
    """Argument combinations that cannot work, as one line, before anything is loaded."""
    suffix = {"tflite": ".tflite", "onnx": ".onnx"}.get(args.format)
    if suffix and not args.out.endswith(suffix):
        raise ToolError(f"--format {args.format} writes a {suffix} file: OUT {args.out} does not end in {suffix}")
    if args.quantize and args.format != "tflite":
        raise ToolError(f"--quantize {args.quantize} applies to --format tflite only (not {args.format})")
    if args.quantize == "int8" and not args.recipe:
        raise ToolError("--quantize int8 needs --recipe: it calibrates on the recipe's training images")
    if args.check and not args.recipe:
        raise ToolError("--check needs --recipe: it scores the artifact on the recipe's test split")
    if args.calibration_images < 1:
        raise ToolError(f"--calibration-images {args.calibration_images}: give at least 1")


@tool_main
def main(argv=None):
    args = parse_args(argv)
    check_options(args)
    from kdet.export import ExportError, export

    class_names, settings = export_settings(args)
    if not class_names:
        raise ToolError("--classes names no class")
    model = load_keras_model(args.model)
    if len(class_names) != model.num_classes:
        raise ToolError(f"{len(class_names)} class names for {args.model}, a model with {model.num_classes} classes")
    calibration = None
    if args.quantize == "int8":
        calibration = calibration_images(args.loaded_recipe, args.calibration_images)
    if os.path.dirname(os.path.abspath(args.out)):
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        export(model, args.out, class_names, format=args.format, quantize=args.quantize,
               calibration_images=calibration, **settings)
    except ExportError as err:
        raise ToolError(str(err)) from None
    from kdet.runtime import label_map_path

    if args.format == "saved_model":
        print(f"SavedModel written to {args.out} (signature serving_default: uint8 images -> detections)")
    else:
        kind = f"{args.format}" + (f" {args.quantize}" if args.quantize else "")
        print(f"{kind} written to {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB; labels: "
              f"{label_map_path(args.out)})")
    if args.check:
        from kdet.deploy_check import artifact_check, check_lines

        result = artifact_check(model, args.out, args.loaded_recipe, class_names, settings,
                                num_threads=args.num_threads)
        print("\n".join(check_lines(result, os.path.basename(args.out.rstrip("/")))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
