"""Draw a model's detections on images: python tools/infer.py MODEL IMAGE_OR_FOLDER --out DIR.

MODEL is what tools/export.py wrote - a SavedModel folder, a .tflite or an .onnx file (each run with
only its own runtime: TensorFlow, the LiteRT interpreter, onnxruntime; names from the label map
beside it) - or a .keras file (then pass --classes for the names).
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdet.cli import ToolError, import_tensorflow, tool_main  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", help="SavedModel folder, .tflite, .onnx or .keras file")
    p.add_argument("images", help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="folder for the drawn images and detections.json")
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--classes", help="comma-separated class names (for a .keras model)")
    p.add_argument("--num-threads", type=int, help="threads of the TFLite / ONNX runtime (default: its own)")
    return p.parse_args(argv)


def image_paths(path):
    if os.path.isdir(path):
        paths = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if not paths:
            raise ToolError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return paths
    if os.path.isfile(path):
        return [path]
    raise ToolError(f"{path}: no such image or folder")


def load_detector(path, classes=None, num_threads=None):
    """A function uint8 image [H, W, 3] -> (boxes yxyx normalised, scores, 1-based classes), and names."""
    from kdet.runtime import ArtifactError, artifact_kind
    from kdet.runtime import load_detector as load

    try:
        if artifact_kind(path) in ("saved_model", "keras"):
            import_tensorflow()  # only these need TensorFlow: quiet its start-up
        return load(path, classes, num_threads)
    except ArtifactError as err:
        raise ToolError(str(err)) from None


def draw(image, boxes, scores, classes, names, threshold):
    """The image with boxes and labels drawn (PIL), boxes in normalised yxyx."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    canvas = Image.fromarray(image)
    pen = ImageDraw.Draw(canvas)
    for (y1, x1, y2, x2), score, cls in zip(boxes, scores, classes):
        if score < threshold:
            continue
        pen.rectangle([x1 * w, y1 * h, x2 * w, y2 * h], outline=(255, 40, 40), width=2)
        pen.text((x1 * w + 2, y1 * h + 1), f"{names[cls - 1]} {score:.2f}", fill=(255, 255, 0))
    return canvas


def read_image(path):
    """RGB uint8 pixels, EXIF orientation applied; None (with a warning line) when the file is not an image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError, truncated data
        print(f"warning: {path}: not a readable image ({err}); skipped", file=sys.stderr)
        return None


@tool_main(needs_tensorflow=False)
def main(argv=None):
    import json

    args = parse_args(argv)
    paths = image_paths(args.images)
    detect, names = load_detector(args.model, args.classes, args.num_threads)
    os.makedirs(args.out, exist_ok=True)
    results, skipped = {}, []
    for path in paths:
        image = read_image(path)
        if image is None:
            skipped.append(path)
            continue
        boxes, scores, classes = detect(image)
        draw(image, boxes, scores, classes, names, args.score_threshold).save(
            os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + ".png"))
        keep = scores >= args.score_threshold
        results[os.path.basename(path)] = [
            dict(box_yxyx=[float(v) for v in b], score=float(s), label=names[c - 1])
            for b, s, c in zip(boxes[keep], scores[keep], classes[keep])]
    with open(os.path.join(args.out, "detections.json"), "w") as f:
        json.dump(results, f, indent=1)
    if skipped and not results:
        raise ToolError(f"{args.images}: none of the {len(paths)} files is a readable image")
    note = f" ({len(skipped)} unreadable files skipped)" if skipped else ""
    print(f"{len(results)} images drawn into {args.out}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
