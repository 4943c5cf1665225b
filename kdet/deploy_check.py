"""Accuracy of an exported artifact beside the Keras model's: ``tools/export.py --check``.

Both run on the same images - the recipe's test split as kdet's evaluation feeds it (uint8, resized
to the model's size) - and are scored by kdet's COCO evaluator (pycocotools' numbers exactly).
The artifact runs in its own runtime (:mod:`kdet.runtime`); the Keras model with ``SSD.detect`` and
the NMS settings the artifact was exported with.
"""

import time

import numpy as np


def artifact_check(model, artifact, recipe, class_names, nms, records=None, num_threads=None):
    """``{"keras": {AP, AP50}, "artifact": {AP, AP50}, "images", "max_box_diff", "max_score_diff",
    "count_mismatches", "class_mismatches", "seconds_per_image"}``.

    ``max_box_diff`` (normalised coordinates) and ``max_score_diff`` compare the artifact's detections with
    the Keras model's rank by rank, over the images where both keep the same number of detections;
    ``count_mismatches`` counts the others, ``class_mismatches`` the ranks whose class differs.
    """
    from kdet.data.coco import coco_image_ids, records_to_coco_json, to_coco_results
    from kdet.engine import build_eval_dataset, load_sources
    from kdet.metrics.coco import coco_evaluate
    from kdet.runtime import load_detector

    if records is None:
        test = load_sources(recipe)["test"]
        if test is None:
            from kdet.cli import ToolError

            raise ToolError("--check needs a recipe with a test split (data.test)")
        records = test.records()
    detect, _ = load_detector(artifact, list(class_names), num_threads)
    keras_dets, artifact_dets = [None] * len(records), [None] * len(records)
    box_diff = score_diff = 0.0
    count_mismatches = class_mismatches = 0
    seconds = 0.0
    for images, _, meta in build_eval_dataset(recipe, records, with_meta=True):
        images = images.numpy().astype(np.uint8)
        ref = {k: np.asarray(v) for k, v in model.detect(images, **nms).items()}
        for row, index in enumerate(meta["index"].numpy()):
            scale = np.array([meta["width"][row], meta["height"][row]] * 2, np.float32)
            n = int(ref["num_detections"][row])
            keras_dets[index] = dict(boxes=ref["boxes"][row, :n] * scale, scores=ref["scores"][row, :n],
                                     classes=ref["classes"][row, :n])
            start = time.perf_counter()
            boxes, scores, classes = detect(images[row])
            seconds += time.perf_counter() - start
            xyxy = np.asarray(boxes, np.float32).reshape(-1, 4)[:, [1, 0, 3, 2]]
            artifact_dets[index] = dict(boxes=xyxy * scale, scores=np.asarray(scores), classes=np.asarray(classes) - 1)
            if len(scores) != n:
                count_mismatches += 1
            elif n:
                box_diff = max(box_diff, float(np.abs(xyxy - ref["boxes"][row, :n]).max()))
                score_diff = max(score_diff, float(np.abs(scores - ref["scores"][row, :n]).max()))
                class_mismatches += int(np.sum(np.asarray(classes) - 1 != ref["classes"][row, :n]))
    ground_truth = records_to_coco_json(records, class_names)
    ids = coco_image_ids(records)
    scores = {}
    for name, dets in (("keras", keras_dets), ("artifact", artifact_dets)):
        metrics = coco_evaluate(ground_truth, to_coco_results(ids, dets))
        scores[name] = {"AP": float(metrics["AP"]), "AP50": float(metrics["AP50"])}
    return dict(scores, images=len(records), max_box_diff=box_diff, max_score_diff=score_diff,
                count_mismatches=count_mismatches, class_mismatches=class_mismatches,
                seconds_per_image=seconds / max(len(records), 1))


def check_lines(result, artifact):
    """The report ``--check`` prints."""
    k, a = result["keras"], result["artifact"]
    return [
        f"check on {result['images']} test images (kdet's COCO evaluator, the same uint8 images for both):",
        f"  Keras model  AP {k['AP']:.4f}  AP50 {k['AP50']:.4f}",
        f"  {artifact}  AP {a['AP']:.4f}  AP50 {a['AP50']:.4f}  (AP {a['AP'] - k['AP']:+.4f}, "
        f"AP50 {a['AP50'] - k['AP50']:+.4f})",
        f"  largest difference to the Keras model's detections: box {result['max_box_diff']:.2e} (normalised), "
        f"score {result['max_score_diff']:.2e}; images with another detection count: "
        f"{result['count_mismatches']}; ranks with another class: {result['class_mismatches']}",
    ]
