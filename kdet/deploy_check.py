"""Accuracy of an exported artifact beside the Keras model's: ``tools/export.py --check``.

Both run on the same images - the recipe's test split as kdet's evaluation feeds it (uint8, resized
to the model's size) - and are scored by kdet's COCO evaluator (pycocotools' numbers exactly).
The artifact runs in its own runtime (:mod:`kdet.runtime`); the Keras model with ``SSD.detect`` and
the NMS settings the artifact was exported with.
"""

import time

import numpy as np


def artifact_check(model, artifact, recipe, class_names, nms, records=None, num_threads=None):
    """``{"keras": {AP, AP50}, "artifact": {AP, AP50}, "images", "agreement_AP50", "max_box_diff",
    "max_score_diff", "count_mismatches", "class_mismatches", "seconds_per_image"}``.

    ``agreement_AP50``: the artifact's AP50 with the Keras model's detections as the ground truth
    (:func:`detections_as_ground_truth`) - how much of the Keras model's output it reproduces, telling
    even where the model's own AP is near zero (int8).

    ``max_box_diff`` (normalised coordinates) and ``max_score_diff`` compare the artifact's detections with
    the Keras model's (:func:`match_detections`) over the images where both keep the same number of
    detections; ``count_mismatches`` counts the others, ``class_mismatches`` the Keras model's detections
    without a partner of their class.
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
                b, s, c = match_detections((ref["boxes"][row, :n], ref["scores"][row, :n], ref["classes"][row, :n]),
                                           (xyxy, np.asarray(scores), np.asarray(classes) - 1))
                box_diff, score_diff, class_mismatches = max(box_diff, b), max(score_diff, s), class_mismatches + c
    ground_truth = records_to_coco_json(records, class_names)
    ids = coco_image_ids(records)
    scores = {}
    for name, dets in (("keras", keras_dets), ("artifact", artifact_dets)):
        metrics = coco_evaluate(ground_truth, to_coco_results(ids, dets))
        scores[name] = {"AP": float(metrics["AP"]), "AP50": float(metrics["AP50"])}
    agreement = coco_evaluate(detections_as_ground_truth(ids, records, keras_dets, class_names),
                              to_coco_results(ids, artifact_dets))
    return dict(scores, images=len(records), agreement_AP50=float(agreement["AP50"]),
                max_box_diff=box_diff, max_score_diff=score_diff,
                count_mismatches=count_mismatches, class_mismatches=class_mismatches,
                seconds_per_image=seconds / max(len(records), 1))


def detections_as_ground_truth(image_ids, records, detections, class_names):
    """A COCO ground truth whose objects are ``detections`` (pixel xyxy, 0-based classes): the reference
    an artifact's ``agreement_AP50`` is scored against (1.0: it finds every detection of the Keras model)."""
    images = [dict(id=int(i), width=int(r.width), height=int(r.height)) for i, r in zip(image_ids, records)]
    annotations = []
    for image_id, det in zip(image_ids, detections):
        for (x0, y0, x1, y1), c in zip(np.asarray(det["boxes"], float), det["classes"]):
            annotations.append(dict(id=len(annotations) + 1, image_id=int(image_id), category_id=int(c) + 1,
                                    bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0), iscrowd=0))
    categories = [dict(id=k + 1, name=name) for k, name in enumerate(class_names)]
    return dict(images=images, annotations=annotations, categories=categories)


def match_detections(reference, other):
    """Largest box and score differences between two detection lists of one image (``(boxes, scores,
    classes)``, same length), each reference detection paired with the other's nearest of the same class
    (so that equal scores ranked the other way round do not count); and the count of reference
    detections with no same-class partner."""
    boxes, scores, classes = (np.asarray(a) for a in reference)
    o_boxes, o_scores, o_classes = (np.asarray(a) for a in other)
    distance = np.abs(boxes[:, None, :] - o_boxes[None, :, :]).max(-1) + np.abs(scores[:, None] - o_scores[None, :])
    distance = np.where(classes[:, None] == o_classes[None, :], distance, np.inf)
    nearest = distance.argmin(1)
    paired = np.isfinite(distance[np.arange(len(scores)), nearest])
    if not paired.any():
        return 0.0, 0.0, int(len(scores))
    box = np.abs(boxes[paired] - o_boxes[nearest[paired]]).max()
    score = np.abs(scores[paired] - o_scores[nearest[paired]]).max()
    return float(box), float(score), int((~paired).sum())


def check_lines(result, artifact):
    """The report ``--check`` prints."""
    k, a = result["keras"], result["artifact"]
    return [
        f"check on {result['images']} test images (kdet's COCO evaluator, the same uint8 images for both):",
        f"  Keras model  AP {k['AP']:.4f}  AP50 {k['AP50']:.4f}",
        f"  {artifact}  AP {a['AP']:.4f}  AP50 {a['AP50']:.4f}  (AP {round(a['AP'] - k['AP'], 4) + 0.0:+.4f}, "
        f"AP50 {round(a['AP50'] - k['AP50'], 4) + 0.0:+.4f})",
        f"  largest difference to the Keras model's detections: box {result['max_box_diff']:.2e} (normalised), "
        f"score {result['max_score_diff']:.2e}; images with another detection count: "
        f"{result['count_mismatches']}; detections without a same-class partner: {result['class_mismatches']}",
        f"  agreement: the artifact's AP50 with the Keras model's detections as ground truth "
        f"{result['agreement_AP50']:.4f} (1: all reproduced)",
        f"  {artifact}: {1000 * result['seconds_per_image']:.1f} ms an image on average (batch 1, first call "
        f"included; not a benchmark)",
    ]
