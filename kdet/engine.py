"""Training and evaluation driven by a recipe; ``tools/train.py`` is a thin wrapper.

The flow is the one data takes: sources -> records -> tf.data (augmentation,
batching) -> model -> loss / decode + NMS -> metrics -> reports and export.
Each step is a small function here so a user can call them from plain Keras.
"""

import json
import os
import time

import keras
import numpy as np

from kdet.config import RecipeError, load_recipe, resolve_source


class UserError(Exception):
    """An error whose message is the whole story (no traceback needed)."""


# ------------------------------------------------------------------ data
def load_sources(recipe):
    """The recipe's train/val/test sources (None where absent)."""
    data = recipe["data"]
    return {split: resolve_source(data.get(split), data.get("root")) for split in ("train", "val", "test")}


def class_names_of(recipe, sources):
    names = recipe["data"].get("class_names")
    if names:
        return list(names)
    for source in sources.values():
        if source is not None:
            return list(source.class_names)
    raise RecipeError("the recipe names no classes and has no data source")


def load_records(sources):
    """Records of each split, read (and validated) once, before training starts."""
    from kdet.data.sources import DatasetError

    try:
        return {split: (src.records() if src is not None else None) for split, src in sources.items()}
    except (DatasetError, OSError) as err:
        raise UserError(str(err)) from err


def build_train_dataset(recipe, records, seed=None):
    from kdet.data.pipeline import make_dataset

    data = recipe["data"]
    return make_dataset(records, image_size=_image_size(recipe), batch_size=data["batch_size"],
                        augment=data.get("augment"), training=True, max_boxes=data["max_boxes"],
                        seed=seed, cache_images=data.get("cache_images", False), workers=data.get("workers"))


def build_eval_dataset(recipe, records, with_meta=False):
    """Evaluation batches in record order: ``(images, targets)``, plus ``meta`` when asked."""
    from kdet.data.pipeline import make_dataset

    data = recipe["data"]
    return make_dataset(records, image_size=_image_size(recipe),
                        batch_size=data.get("eval_batch_size", data["batch_size"]),
                        training=False, shuffle=False, max_boxes=data["max_boxes"], with_meta=with_meta,
                        cache_images=data.get("cache_images", False))


def _image_size(recipe):
    size = recipe["model"]["image_size"]
    return (size, size) if isinstance(size, int) else tuple(size)


# ------------------------------------------------------------------ model, loss, optimizer
def build_model(recipe, class_names):
    """The recipe's detector, a ``kdet.models.ssd.SSD`` (a ``keras.Model``)."""
    from kdet.models.ssd import SSD

    try:
        return SSD(num_classes=len(class_names), **recipe["model"])
    except TypeError as err:
        raise RecipeError(f"bad model section in the recipe: {err}") from err


def build_loss(recipe, class_names, train_records=None, verbose=True, anchors_per_level=None):
    """The MultiBox loss with the recipe's class weights (``"auto"`` computed from ``train_records``).

    ``anchors_per_level`` (``SSD.anchors_per_level``) is what ``loss.assigner="atss"`` needs.
    """
    from kdet.data.class_weights import class_counts, format_class_weights, resolve_class_weights
    from kdet.losses import MultiBoxLoss

    cfg = dict(recipe.get("loss", {}))
    weights = resolve_class_weights(cfg.pop("class_weights", None), class_names, records=train_records)
    if verbose and weights is not None:
        counts = class_counts(train_records, len(class_names)) if train_records else None
        print(format_class_weights(weights, class_names, counts=counts))
    return MultiBoxLoss(class_weights=weights, num_classes=len(class_names), anchors_per_level=anchors_per_level, **cfg)


def build_learning_rate(train_cfg, steps_per_epoch):
    """Warm-up plus the recipe's step / cosine / constant schedule, in optimizer steps."""
    from kdet.training.optim import ConstantSchedule, cosine_schedule, epochs_to_steps, step_schedule

    base_lr = float(train_cfg["learning_rate"])
    warmup = int(round(train_cfg.get("warmup_epochs", 0) * steps_per_epoch))
    kind = train_cfg.get("lr_schedule", "step")
    if kind == "step":
        boundaries = epochs_to_steps(train_cfg.get("lr_steps") or (), steps_per_epoch)
        return step_schedule(base_lr, boundaries, warmup_steps=warmup)
    if kind == "cosine":
        return cosine_schedule(base_lr, train_cfg["epochs"] * steps_per_epoch, warmup_steps=warmup)
    if kind == "constant":
        return step_schedule(base_lr, [], warmup_steps=warmup) if warmup else ConstantSchedule(base_lr)
    raise RecipeError(f"train.lr_schedule must be 'step', 'cosine' or 'constant', got {kind!r}")


def build_optimizer(recipe, model, steps_per_epoch):
    from kdet.training.optim import build_optimizer as _build

    cfg = recipe["train"]
    return _build(cfg.get("optimizer", "sgd"), learning_rate=build_learning_rate(cfg, steps_per_epoch),
                  momentum=cfg.get("momentum", 0.9), weight_decay=cfg.get("weight_decay", 0.0), model=model,
                  global_clipnorm=cfg.get("clip_grad_norm"), ema_momentum=cfg.get("ema_momentum"))


# ------------------------------------------------------------------ detection and evaluation
def eval_settings(recipe):
    cfg = recipe.get("eval", {})
    return dict(score_threshold=cfg.get("score_threshold", 0.01), iou_threshold=cfg.get("iou_threshold", 0.45),
                max_detections=cfg.get("max_detections", 200))


def predict_records(model, records, recipe):
    """Detections for ``records`` in pixels of each original image (one dict per record)."""
    import tensorflow as tf

    settings = eval_settings(recipe)
    detect = tf.function(lambda images: model.detect(images, **settings))

    results = [None] * len(records)
    for images, _, meta in build_eval_dataset(recipe, records, with_meta=True):
        det = {k: v.numpy() for k, v in detect(images).items()}
        scale = np.stack([meta["width"], meta["height"], meta["width"], meta["height"]], -1).astype(np.float32)
        for row, index in enumerate(meta["index"].numpy()):
            n = int(det["num_detections"][row])
            results[index] = dict(boxes=det["boxes"][row, :n] * scale[row], scores=det["scores"][row, :n],
                                  classes=det["classes"][row, :n])
    return results


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


# ------------------------------------------------------------------ training
def build_callbacks(recipe, work_dir, class_names, val_dataset, resume):
    """Checkpoints, logs, COCO evaluation, early stopping, freezing and the non-finite guard."""
    from kdet.training.callbacks import StopOnNonFiniteLoss

    train_cfg, eval_cfg = recipe["train"], recipe.get("eval", {})
    callbacks = [StopOnNonFiniteLoss(raise_error=True)]
    callbacks += _freezing_callbacks(train_cfg)
    monitor = None
    if val_dataset is not None:
        from kdet.metrics.callback import COCOEvalCallback

        settings = eval_settings(recipe)
        callbacks.append(COCOEvalCallback(val_dataset, every_n_epochs=eval_cfg.get("every_n_epochs", 1),
                                          class_names=class_names,
                                          detect_fn=lambda model, images: model.detect(images, **settings)))
        monitor = eval_cfg.get("monitor", "val_AP")
        callbacks.append(keras.callbacks.ModelCheckpoint(
            os.path.join(work_dir, "best.keras"), monitor=monitor, mode="max", save_best_only=True))
        if train_cfg.get("early_stopping_patience"):
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor=monitor, mode="max", patience=int(train_cfg["early_stopping_patience"]),
                restore_best_weights=True))
    callbacks += [
        _image_logger(work_dir, val_dataset, eval_cfg.get("every_n_epochs", 1)),
        keras.callbacks.ModelCheckpoint(os.path.join(work_dir, "last.keras")),
        EpochRecorder(os.path.join(work_dir, "state.json")),
        keras.callbacks.CSVLogger(os.path.join(work_dir, "log.csv"), append=resume),
        keras.callbacks.TensorBoard(os.path.join(work_dir, "tensorboard"), write_graph=False),
    ]
    return callbacks


def _image_logger(work_dir, val_dataset, every_n_epochs):
    """A few validation images with their predicted boxes, into TensorBoard."""
    from kdet.training.callbacks import ImageLogger

    if val_dataset is None:
        return keras.callbacks.Callback()
    images = next(iter(val_dataset))[0][:4].numpy()
    logger = ImageLogger(os.path.join(work_dir, "tensorboard"), images, detect_fn=None,
                         every_n_epochs=every_n_epochs)
    logger.detect_fn = lambda batch: logger.model.detect(batch)
    return logger


def _freezing_callbacks(train_cfg):
    from kdet.training.freezing import FreezeBackbone, GradualUnfreezing

    if train_cfg.get("unfreeze_schedule"):
        factor = float(train_cfg.get("unfreeze_lr_factor", 1.0))
        schedule = {int(k): v for k, v in train_cfg["unfreeze_schedule"].items()}
        lr_factors = {k: factor for k in schedule.values() if k} if factor != 1.0 else None
        return [GradualUnfreezing(schedule, lr_factors=lr_factors)]
    if train_cfg.get("freeze_backbone_epochs"):
        return [FreezeBackbone(epochs=int(train_cfg["freeze_backbone_epochs"]))]
    return []


class EpochRecorder(keras.callbacks.Callback):
    """Writes the number of finished epochs next to ``last.keras`` (for ``--resume``)."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        with open(self.path, "w") as f:
            json.dump({"epochs_done": epoch + 1}, f)


def train(recipe, work_dir, resume=False):
    """Train, evaluate and export as the recipe says; returns the final metrics dict."""
    import tensorflow as tf

    from kdet.training.precision import setup_precision
    from kdet.training.strategy import make_strategy

    train_cfg = recipe["train"]
    os.makedirs(work_dir, exist_ok=True)
    keras.utils.set_random_seed(int(train_cfg.get("seed", 0)))
    setup_precision(train_cfg.get("mixed_precision", "float32"))

    sources = load_sources(recipe)
    if sources["train"] is None:
        raise RecipeError("the recipe has no data.train source")
    class_names = class_names_of(recipe, sources)
    records = load_records(sources)
    _print_data_summary(records, class_names)
    records["train"] = _oversampled(recipe, records["train"], class_names)
    val_records = records["val"] or None
    test_records = records["test"] or val_records

    strategy = make_strategy(train_cfg.get("strategy", "default"))
    train_ds = build_train_dataset(recipe, records["train"], seed=train_cfg.get("seed"))
    steps_per_epoch = len(records["train"]) // recipe["data"]["batch_size"]
    if steps_per_epoch < 1:
        raise RecipeError(f"{len(records['train'])} training images are fewer than one batch "
                          f"({recipe['data']['batch_size']})")
    train_ds = train_ds.apply(tf.data.experimental.assert_cardinality(steps_per_epoch))  # a known epoch length
    val_ds = build_eval_dataset(recipe, val_records) if val_records else None

    initial_epoch, last = 0, os.path.join(work_dir, "last.keras")
    with strategy.scope():
        if resume and os.path.exists(last):
            model = keras.models.load_model(last)
            with open(os.path.join(work_dir, "state.json")) as f:
                initial_epoch = json.load(f)["epochs_done"]
            print(f"resuming from {last} after epoch {initial_epoch}")
        else:
            if resume:
                print(f"--resume: no checkpoint in {work_dir}, starting from scratch")
            model = build_model(recipe, class_names)
            model.compile(optimizer=build_optimizer(recipe, model, steps_per_epoch),
                          loss=build_loss(recipe, class_names, records["train"],
                                          anchors_per_level=model.anchors_per_level),
                          jit_compile=bool(train_cfg.get("jit_compile", False)))
    for _ in range(initial_epoch):  # resumed: each epoch's pass (order, augmentation) as in a run without a break
        iter(train_ds)
    callbacks = build_callbacks(recipe, work_dir, class_names, val_ds, resume)
    started = time.time()
    model.fit(train_ds, epochs=int(train_cfg["epochs"]), initial_epoch=initial_epoch,
              callbacks=callbacks, verbose=recipe.get("verbose", 1))
    train_seconds = time.time() - started
    if val_records and train_cfg.get("ema_momentum") is not None:
        _evaluate_averaged_weights(model, val_records, class_names, recipe)
    return finish(model, recipe, work_dir, class_names, test_records, train_seconds)


def _evaluate_averaged_weights(model, val_records, class_names, recipe):
    """The in-training evaluations saw the raw weights; ``fit`` has since written in their moving average."""
    coco, _, _ = evaluate_records(model, val_records, class_names, recipe)
    print(f"moving-average weights on {len(val_records)} validation images: AP50 {coco['AP50']:.4f}  AP {coco['AP']:.4f}")


def _oversampled(recipe, train_records, class_names):
    """The training records with repeat-factor sampling when the recipe asks for it."""
    threshold = recipe["data"].get("repeat_factor_threshold")
    if not threshold:
        return train_records
    from kdet.data.sampling import oversample_rare_classes

    repeated, summary = oversample_rare_classes(train_records, len(class_names), float(threshold),
                                                seed=int(recipe["train"].get("seed") or 0))
    print(summary)
    return repeated


def finish(model, recipe, work_dir, class_names, test_records, train_seconds):
    """Final evaluation, metrics.json and the SavedModel export."""
    from kdet.export import export_saved_model
    from kdet.metrics._coco_common import format_summary

    metrics = {"train_seconds": round(train_seconds, 1)}
    if test_records:
        coco, _, results = evaluate_records(model, test_records, class_names, recipe)
        metrics.update(coco)
        with open(os.path.join(work_dir, "test_detections.json"), "w") as f:
            json.dump(results, f)
        print(format_summary(coco))
        print(f"mAP@0.5 (COCO AP50) on {len(test_records)} held-out images: {coco['AP50']:.4f}"
              f"   VOC all-point mAP50: {coco['VOC_mAP50']:.4f}")
    export_dir = os.path.join(work_dir, "saved_model")
    export_saved_model(model, export_dir, class_names, score_threshold=recipe["eval"].get("score_threshold", 0.01),
                       iou_threshold=recipe["eval"].get("iou_threshold", 0.45))
    metrics["saved_model"] = export_dir
    with open(os.path.join(work_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=float)
    print(f"training took {train_seconds / 60:.1f} min; metrics: {work_dir}/metrics.json; SavedModel: {export_dir}")
    return metrics


def _print_data_summary(records, class_names):
    for split, recs in records.items():
        if recs:
            counts = np.bincount(np.concatenate([r.classes for r in recs] or [np.zeros(0, int)]),
                                 minlength=len(class_names))
            per_class = ", ".join(f"{n} {c}" for n, c in zip(class_names, counts))
            print(f"{split}: {len(recs)} images ({per_class})")


def train_from_recipe_file(path, overrides=(), work_dir=None, resume=False):
    """What ``tools/train.py`` does: load the recipe, train, evaluate, export."""
    try:
        recipe = load_recipe(path, overrides)
        work_dir = work_dir or os.path.join("work_dirs", recipe["name"])
        return train(recipe, work_dir, resume=resume)
    except (RecipeError, FloatingPointError) as err:  # FloatingPointError: the non-finite loss guard
        raise UserError(str(err)) from err
