"""Draw a model's detections on images: python tools/infer.py MODEL IMAGE_OR_FOLDER --out DIR.

MODEL is a SavedModel folder written by kdet's export (no kdet needed to run it)
or a .keras file (then pass --classes or --recipe for the names).
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", help="SavedModel folder or .keras file")
    p.add_argument("images", help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="folder for the drawn images and detections.json")
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--classes", help="comma-separated class names (for a .keras model)")
    return p.parse_args(argv)


def image_paths(path):
    if os.path.isdir(path):
        return sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
    if os.path.isfile(path):
        return [path]
    raise FileNotFoundError(f"no such image or folder: {path}")


def load_detector(path, classes=None):
    """A function uint8 image [H, W, 3] -> (boxes yxyx normalised, scores, 1-based classes), and names."""
    import tensorflow as tf

    if os.path.isdir(path):
        loaded = tf.saved_model.load(path)
        serve = loaded.signatures["serving_default"]
        names = [n.decode() for n in loaded.class_names.numpy()]
    else:
        from kdet.defaults import NMS_DEFAULTS
        from kdet.export import DetectorModule
        from kdet.models.ssd import load_model

        model = load_model(path)
        names = classes.split(",") if classes else [str(i) for i in range(model.num_classes)]
        serve = DetectorModule(model, names, NMS_DEFAULTS).serve

    def detect(image):
        out = serve(images=tf.constant(image[None]))
        n = int(out["num_detections"][0])
        return (out["detection_boxes"][0, :n].numpy(), out["detection_scores"][0, :n].numpy(),
                out["detection_classes"][0, :n].numpy().astype(int))

    return detect, names


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


def main(argv=None):
    import json

    from PIL import Image

    args = parse_args(argv)
    try:
        paths = image_paths(args.images)
        detect, names = load_detector(args.model, args.classes)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        boxes, scores, classes = detect(image)
        draw(image, boxes, scores, classes, names, args.score_threshold).save(
            os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + ".png"))
        keep = scores >= args.score_threshold
        results[os.path.basename(path)] = [
            dict(box_yxyx=[float(v) for v in b], score=float(s), label=names[c - 1])
            for b, s, c in zip(boxes[keep], scores[keep], classes[keep])]
    with open(os.path.join(args.out, "detections.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"{len(paths)} images drawn into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
