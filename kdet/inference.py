"""Detection and evaluation with a built model: the recipe's NMS settings, detections per record,
candidate counts, COCO / VOC metrics. The training run's final evaluation, the run report and
the label review all predict through here.
"""

import keras
import numpy as np

from kdet.build import build_eval_dataset
from kdet.defaults import nms_settings
from kdet.errors import RecipeError


def eval_settings(recipe):
    """The recipe's NMS settings (its ``eval`` section, kdet.defaults.NMS_DEFAULTS elsewhere).

    Training's val_AP, the final evaluation and the SavedModel export all use these.
    """
    settings = nms_settings(recipe.get("eval"))
    if settings["class_agnostic"] and settings["per_class_top_k"]:
        raise RecipeError("eval.class_agnostic=True needs eval.per_class_top_k=False (class-agnostic NMS "
                          "takes the best candidates over all classes)")
    return settings


def predict_records(model, records, recipe):
    """Detections for ``records`` in pixels of each original image (one dict per record)."""
    settings = eval_settings(recipe)
    results = [None] * len(records)
    for det, meta in _over_eval_batches(model, records, recipe, lambda images: model.detect(images, **settings)):
        scale = np.stack([meta["width"], meta["height"], meta["width"], meta["height"]], -1).astype(np.float32)
        for row, index in enumerate(meta["index"].numpy()):
            n = int(det["num_detections"][row])
            results[index] = dict(boxes=det["boxes"][row, :n] * scale[row], scores=det["scores"][row, :n],
                                  classes=det["classes"][row, :n])
    return results


def candidate_counts(model, records, recipe):
    """Per record, the (anchor, class) pairs scoring above ``eval.score_threshold`` (per class with
    ``eval.per_class_top_k``): what competes for ``eval.pre_nms_top_k`` (the run report's cap finding)."""
    from kdet.postprocess import count_candidates

    settings = eval_settings(recipe)
    count = lambda images: count_candidates(model(images, training=False), settings["score_threshold"],  # noqa: E731
                                            model.score_activation, per_class=settings["per_class_top_k"])
    counts = [0] * len(records)
    for numbers, meta in _over_eval_batches(model, records, recipe, count):
        for index, n in zip(meta["index"].numpy(), numbers):
            counts[index] = int(n)
    return counts


def _over_eval_batches(model, records, recipe, fn):
    """``fn(images)``, compiled over ``model``'s weights, on the evaluation batches of ``records``:
    yields its outputs as numpy and the batch's ``meta`` (``index`` is each row's record)."""
    from kdet.metrics.callback import compiled_over_weights

    compiled = compiled_over_weights(model, fn)
    on_tf = keras.backend.backend() == "tensorflow"
    for images, _, meta in build_eval_dataset(recipe, records, with_meta=True):
        yield keras.tree.map_structure(keras.ops.convert_to_numpy, compiled(images if on_tf else images.numpy())), meta


def evaluate_records(model, records, class_names, recipe):
    """COCO metrics (exact pycocotools semantics) and VOC mAP50 of ``model`` on ``records``."""
    from kdet.data.coco import coco_image_ids, records_to_coco_json, to_coco_results
    from kdet.metrics.coco import coco_evaluate
    from kdet.metrics.voc import voc_evaluate

    detections = predict_records(model, records, recipe)
    ground_truth = records_to_coco_json(records, class_names)
    results = to_coco_results(coco_image_ids(records), detections)
    metrics = coco_evaluate(ground_truth, results)
    voc = voc_evaluate(records, detections, class_names)
    voc07 = voc_evaluate(records, detections, class_names, use_07_metric=True)
    metrics["VOC_mAP50"] = voc["mAP"]
    metrics["VOC07_mAP50"] = voc07["mAP"]
    metrics["VOC_per_class_AP50"] = voc["AP"]
    return metrics, ground_truth, results
