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

from kdet.config import RecipeError, bad_model_section, load_recipe, resolve_source
from kdet.defaults import default_of, nms_settings
from kdet.errors import UserError  # defined in the leaf module kdet.errors, importable from here too


# ------------------------------------------------------------------ data
def load_sources(recipe):
    """The recipe's train/val/test sources (None where absent)."""
    from kdet.data.base import DatasetError

    data = recipe["data"]
    try:  # factories that look at the data on the way in (sources.auto detects the layout)
        return {split: resolve_source(data.get(split), data.get("root"), data) for split in ("train", "val", "test")}
    except DatasetError as err:
        raise UserError(str(err)) from err


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


def build_train_dataset(recipe, records, seed=None, epoch=None, mosaic_off_from=None, skip_batches=None):
    """Training batches; with ``epoch`` (a ``tf.Variable`` set by ``PassEpoch``) each epoch's pass comes from it.

    ``mosaic_off_from`` (a ``tf.Variable``): the first epoch without mosaic (``data.close_mosaic``);
    ``skip_batches`` (a ``tf.Variable``): batches a pass resumed mid-epoch leaves out (kdet.training.preemption).
    """
    from kdet.data.pipeline import make_dataset

    from kdet.data.kerascv_augment import recipe_augment

    data = recipe["data"]
    augment = recipe_augment(data, _image_size(recipe))  # data.augment, or the keras-cv preset
    return make_dataset(records, image_size=_image_size(recipe), batch_size=data["batch_size"],
                        augment=augment, training=True, max_boxes=data["max_boxes"],
                        seed=seed, cache_images=_cache_images(data, records), workers=data.get("workers"),
                        epoch=epoch, mosaic_off_from=mosaic_off_from, skip_batches=skip_batches)


def build_eval_dataset(recipe, records, with_meta=False):
    """Evaluation batches in record order: ``(images, targets)``, plus ``meta`` when asked."""
    from kdet.data.pipeline import make_dataset

    data = recipe["data"]
    return make_dataset(records, image_size=_image_size(recipe),
                        batch_size=data.get("eval_batch_size", data["batch_size"]),
                        training=False, shuffle=False, max_boxes=data["max_boxes"], with_meta=with_meta,
                        cache_images=_cache_images(data, records))


AUTO_CACHE_BYTES = 2 * 1024 ** 3  # data.cache_images="auto": decoded images kept when they fit in this


def _cache_images(data, records):
    """``data.cache_images``; ``"auto"``: True when the split's decoded images fit in ``AUTO_CACHE_BYTES``."""
    cache = data.get("cache_images", False)
    if cache != "auto":
        return bool(cache)
    decoded = {r.image_path: r.width * r.height * 3 for r in records}
    return sum(decoded.values()) <= AUTO_CACHE_BYTES


def _image_size(recipe):
    size = recipe["model"]["image_size"]
    return (size, size) if isinstance(size, int) else tuple(size)


# ------------------------------------------------------------------ model, loss, optimizer
def build_model(recipe, class_names):
    """The recipe's detector, a ``kdet.models.ssd.SSD`` (a ``keras.Model``).

    With ``model.init_from`` it starts from that kdet model's matching layers (kdet.models.transfer).
    """
    from kdet.analysis.anchors import wants_auto_anchors
    from kdet.models.backbones import WeightsFileError
    from kdet.models.ssd import SSD
    from kdet.models.transfer import InitFromError, init_from_checkpoint

    recipe = resolve_backbone_weights(recipe, class_names)
    if wants_auto_anchors(recipe["model"]):
        raise RecipeError("model.anchor_scales / aspect_ratios = 'auto' must be fitted to the training boxes "
                          "first: kdet.analysis.anchors.resolve_auto_anchors (engine.train does it)")
    try:
        model = SSD(num_classes=len(class_names), score_activation=_score_activation(recipe),
                    **_ssd_arguments(recipe["model"]))
        if recipe["model"].get("init_from"):
            init_from_checkpoint(model, recipe["model"]["init_from"])
        return model
    except (WeightsFileError, InitFromError) as err:
        raise RecipeError(str(err)) from err
    except (TypeError, ValueError) as err:  # SSD refuses the section (fine_map on FPN, scales of the wrong length)
        raise bad_model_section(err) from err


def _ssd_arguments(model_section):
    """The recipe's model section less the keys the engine handles (``init_from``)."""
    return {key: value for key, value in model_section.items() if key != "init_from"}


def _score_activation(recipe):
    """``"sigmoid"`` for the sigmoid class losses of ``loss.cls_loss``, else ``"softmax"``."""
    from kdet.losses import score_activation

    try:
        return score_activation(recipe.get("loss", {}).get("cls_loss", "softmax"))
    except ValueError as err:
        raise RecipeError(str(err)) from err


def resolve_small_data(recipe, num_train_images):
    """The recipe's ``small_data`` settings merged in when the training split is that small (printed)."""
    from kdet.config import merge

    small = dict(recipe.get("small_data") or {})
    limit = small.pop("max_images", None)
    if not small or limit is None or num_train_images > int(limit):
        return recipe
    changed = ", ".join(f"{section}.{key}" for section, keys in small.items() for key in keys)
    print(f"small_data: {num_train_images} training images <= {limit}: the recipe's small-data settings apply "
          f"({changed})")
    return merge(recipe, small)


def resolve_backbone_weights(recipe, class_names):
    """``model.backbone_weights="auto"``: ImageNet weights when they can be fetched, else from scratch.

    With the weights, the recipe's ``pretrained`` section (model and training
    settings for a pretrained backbone) is merged in; without them (offline),
    the recipe trains as written with ``backbone_weights=None``, and a note says
    so. Returns the recipe with concrete weights (unchanged when not "auto").
    """
    from kdet.config import merge
    from kdet.models.backbones import WeightsDownloadError
    from kdet.models.ssd import SSD

    weights = recipe["model"].get("backbone_weights")
    if recipe["model"].get("init_from") and weights is not None:
        print(f"model.init_from is set: model.backbone_weights={weights!r} is not used (the checkpoint's weights "
              "replace it)")
        return merge(recipe, dict(model=dict(backbone_weights=None)))
    if weights != "auto":
        return recipe
    pretrained = merge(recipe, recipe.get("pretrained") or {})
    pretrained["model"]["backbone_weights"] = "imagenet"
    try:
        SSD(num_classes=len(class_names), **_ssd_arguments(pretrained["model"]))  # fetches (and caches) the weights
    except WeightsDownloadError as err:
        scratch = merge(recipe, dict(model=dict(backbone_weights=None)))
        print(f"note: model.backbone_weights='auto': {err}. Training {scratch['model']['backbone']} (width "
              f"{scratch['model'].get('width_multiplier', 1.0)}) from scratch instead; "
              "set model.backbone_weights=None to skip the attempt")
        return scratch
    print(f"model.backbone_weights='auto': ImageNet weights found; using the recipe's pretrained settings "
          f"({pretrained['model']['backbone']}, width {pretrained['model'].get('width_multiplier', 1.0)})")
    return pretrained


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
    """Warm-up plus the recipe's step / cosine / constant schedule, in optimizer steps.

    With ``train.time_budget`` the schedule is planned over ``train.epochs`` and re-paced to the
    epochs that fit (a ``FittedSchedule``, see kdet/training/time_budget.py).
    """
    schedule = _planned_learning_rate(train_cfg, steps_per_epoch)
    if not train_cfg.get("time_budget"):
        return schedule
    from kdet.training.optim import FittedSchedule

    return FittedSchedule(schedule, planned_steps=int(train_cfg["epochs"]) * steps_per_epoch)


def _planned_learning_rate(train_cfg, steps_per_epoch):
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

    cfg = {**{k: default_of("train", k) for k in ("optimizer", "momentum", "weight_decay")}, **recipe["train"]}
    ema_warmup_steps = float(cfg.get("ema_warmup_epochs") or 0) * steps_per_epoch
    warning = None if ema_warmup_steps else ema_start_weight_warning(cfg.get("ema_momentum"), cfg.get("epochs"),
                                                                     steps_per_epoch)
    if warning:
        print(warning)
    return _build(cfg["optimizer"], learning_rate=build_learning_rate(cfg, steps_per_epoch),
                  momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], model=model,
                  global_clipnorm=cfg.get("clip_grad_norm"), ema_momentum=cfg.get("ema_momentum"),
                  ema_warmup_steps=ema_warmup_steps)


def ema_start_weight_warning(ema_momentum, epochs, steps_per_epoch, limit=0.05):
    """A warning when the weight average would still hold > ``limit`` of the initial weights at the end.

    Keras' ``use_ema`` has no warm-up: after N steps the initial (random) weights keep
    ``momentum ** N`` of the average (0.998 over 480 steps: 38%, a broken model). With
    ``train.ema_warmup_epochs`` they keep none (the first step's momentum is 0): no warning then.
    """
    if ema_momentum is None or not isinstance(epochs, (int, float)) or not steps_per_epoch:
        return None
    steps = int(epochs * steps_per_epoch)
    share = float(ema_momentum) ** steps
    if share <= limit:
        return None
    fitting = limit ** (1.0 / max(steps, 1))
    return (f"warning: train.ema_momentum={ema_momentum} over {steps} steps keeps {share:.0%} of the initial "
            f"weights in the final average (no warm-up); use at most {fitting:.4f} for this run, or "
            f"train.ema_warmup_epochs")


# ------------------------------------------------------------------ detection and evaluation
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


# ------------------------------------------------------------------ training
def build_callbacks(recipe, work_dir, class_names, val_dataset, resume_point=None, extra_state=None,
                    planned_epochs=None):
    """Checkpoints, logs, COCO evaluation, early stopping, freezing and the non-finite guard.

    ``resume_point`` (from `load_resume_point`) keeps ``log.csv``'s rows of the finished
    epochs and the best value ``best.keras`` was saved at; ``extra_state()`` returns more
    entries for ``state.json`` (the time budget's); ``planned_epochs()`` is the run's plan (the time
    budget's, re-paced), which early stopping waits for a share of.
    """
    from kdet.training.callbacks import Checkpoints, CSVLog, EarlyStoppingOnEvaluations, StopOnNonFiniteLoss

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
        if train_cfg.get("early_stopping_patience"):
            callbacks.append(EarlyStoppingOnEvaluations(
                monitor=monitor, mode="max", patience=int(train_cfg["early_stopping_patience"]),
                restore_best_weights=True, min_value=train_cfg.get("early_stopping_min_value"),
                min_fraction=train_cfg.get("early_stopping_min_fraction"),
                planned_epochs=planned_epochs or (lambda: train_cfg["epochs"])))
    epochs_done, best = (resume_point["epochs_done"], resume_point.get("best")) if resume_point else (0, None)
    callbacks += [
        _image_logger(work_dir, val_dataset, eval_cfg.get("every_n_epochs", 1)),
        CSVLog(os.path.join(work_dir, "log.csv"), keep_epochs=epochs_done),   # written before state.json
        Checkpoints(work_dir, monitor=monitor, mode="max", best=best, extra_state=extra_state),  # + state.json
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


def load_resume_point(work_dir, steps_per_epoch):
    """``{"model", "epochs_done", "best"}`` from ``last.keras`` + ``state.json``; None without a checkpoint.

    The files are written in the order ``last.keras`` then ``state.json`` (each atomically),
    so after a kill ``state.json`` is either right or one epoch behind ``last.keras``; the
    optimizer step count written in ``state.json`` tells the two apart. A checkpoint that
    does not load or a ``state.json`` that disagrees with it is a `UserError` naming the file.
    """
    last, state_path = os.path.join(work_dir, "last.keras"), os.path.join(work_dir, "state.json")
    if not os.path.exists(last):
        return None
    have_state = os.path.exists(state_path)
    state = _read_state(state_path) if have_state else dict(epochs_done=0, iterations=0)
    model = _load_checkpoint(last)
    steps = int(model.optimizer.iterations.numpy())
    epochs_done, saved_steps = state["epochs_done"], state.get("iterations")
    position = epochs_done * steps_per_epoch + int(state.get("steps_done") or 0)   # mid-epoch checkpoints: steps_done
    metrics = state.get("metrics")
    if saved_steps is not None and steps != saved_steps:
        if not saved_steps < steps <= saved_steps + steps_per_epoch:
            said = (f"says {epochs_done} epochs ({saved_steps} optimizer steps) are done" if have_state
                    else "is missing (so no epoch is known to be done)")
            raise UserError(f"{state_path} {said}, but "
                            f"{last} holds {steps} steps: they are not from the same run; remove the work dir's "
                            "state.json and last.keras to start over")
        ahead = steps - saved_steps   # killed between writing last.keras and state.json
        position, metrics = position + ahead, None
        print(f"{last} is {'one epoch' if ahead == steps_per_epoch else f'{ahead} steps'} ahead of {state_path} "
              "(the run was stopped between the two writes)")
    epochs_done, steps_done = divmod(position, steps_per_epoch)
    return dict(model=model, epochs_done=epochs_done, steps_done=steps_done, best=state.get("best"),
                time_budget=state.get("time_budget"), metrics=metrics if steps_done else None)


def _read_state(path):
    try:
        with open(path) as f:
            state = json.load(f)
        epochs = state["epochs_done"]
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs_done must be a whole number >= 0, got {epochs!r}")
        return state
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = f"no field {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise UserError(f"{path}: not a kdet training state ({reason}); remove it and last.keras "
                        "to start over") from err


def _load_checkpoint(path):
    """``last.keras`` through kdet's loader (kdet's classes registered); a damaged file is a `UserError`."""
    from kdet.cli import ToolError, load_keras_model

    try:
        model = load_keras_model(path)
    except ToolError as err:
        raise UserError(f"{err}: restore it, or remove it to start over") from err
    if getattr(model, "optimizer", None) is None:
        raise UserError(f"{path}: the checkpoint has no optimizer state (not written by kdet's training)")
    return model


def train(recipe, work_dir, resume=False):
    """Train, evaluate and export as the recipe says; returns the final metrics dict.

    Under ``train.strategy="multiworker"`` every worker runs this; the chief writes
    ``work_dir`` and the others write to a temporary folder removed at the end
    (``kdet.training.strategy.writer_dir``); all resume from ``work_dir``.
    """
    import contextlib

    from kdet.training.signals import SignalStop
    from kdet.training.strategy import make_strategy, writer_dir
    from kdet.training.workdir_lock import WorkDirBusy, WorkDirLock

    os.makedirs(work_dir, exist_ok=True)
    # first: a multi-worker strategy must set up its collectives before any other TensorFlow op
    strategy = make_strategy(recipe["train"].get("strategy", "default"))
    with writer_dir(strategy, work_dir) as out_dir:
        try:  # the writer takes the work dir before touching a file in it (kdet/training/workdir_lock.py)
            lock = WorkDirLock(work_dir) if out_dir == work_dir else contextlib.nullcontext()
            with lock, SignalStop() as stop:   # SIGTERM / SIGINT: a checkpoint, then Interrupted
                return _train(recipe, work_dir, out_dir, resume, strategy, stop)
        except WorkDirBusy as err:
            raise UserError(str(err)) from None


def _train(recipe, work_dir, out_dir, resume, strategy, stop=None):
    import tensorflow as tf

    from kdet.training.precision import setup_precision
    from kdet.training.strategy import prepare_fit, shard_by_data

    train_cfg = recipe["train"]
    keras.utils.set_random_seed(int(train_cfg.get("seed", 0)))
    setup_precision(train_cfg.get("mixed_precision", "float32"))
    _check_strategy_backend(train_cfg.get("strategy", "default"))

    sources = load_sources(recipe)
    if sources["train"] is None:
        raise RecipeError("the recipe has no data.train source")
    class_names = class_names_of(recipe, sources)
    records = load_records(sources)
    recipe = resolve_small_data(recipe, len(records["train"]))
    recipe = resolve_backbone_weights(recipe, class_names)
    _print_data_summary(records, class_names)
    recipe = _preflight(recipe, records, class_names, out_dir)
    train_cfg = recipe["train"]  # both steps above may return a new recipe
    records["train"] = _oversampled(recipe, records["train"], class_names)
    val_records = records["val"] or None
    test_records = records["test"] or val_records

    epoch_records = _repeated_to_epoch_size(recipe, records["train"])  # class weights count each image once
    seed = train_cfg.get("seed")
    # seeded: each epoch's data order and augmentation come from (seed, epoch), so a resumed run repeats none
    pass_epoch = tf.Variable(0, dtype=tf.int64, trainable=False) if seed is not None else None
    skip_batches = tf.Variable(0, dtype=tf.int64, trainable=False)  # > 0 only for a pass resumed mid-epoch
    steps_per_epoch = len(epoch_records) // recipe["data"]["batch_size"]
    if steps_per_epoch < 1:
        raise RecipeError(f"{len(epoch_records)} training images are fewer than one batch "
                          f"({recipe['data']['batch_size']})")
    _resolve_auto_epochs(train_cfg, steps_per_epoch, num_images=len(records["train"]))
    mosaic_off_from = _mosaic_switch(recipe, pass_epoch)
    passes = build_train_dataset(recipe, epoch_records, seed=seed, epoch=pass_epoch, mosaic_off_from=mosaic_off_from,
                                 skip_batches=skip_batches)

    def epochs_of(steps):  # a known epoch length; workers: each takes its part of every global batch
        return shard_by_data(passes.apply(tf.data.experimental.assert_cardinality(steps)))

    train_ds = epochs_of(steps_per_epoch)
    # with meta: val_AP's small / medium / large ranges use the original image sizes, as the final evaluation
    val_ds = build_eval_dataset(recipe, val_records, with_meta=True) if val_records else None

    from kdet.training.callbacks import remove_stale_temp_files

    remove_stale_temp_files(out_dir)   # partial saves of a killed run
    resume_point, initial_epoch, resume_step = None, 0, 0
    with strategy.scope():
        if resume:
            resume_point = load_resume_point(work_dir, steps_per_epoch)
        if resume_point:
            model, initial_epoch = resume_point["model"], resume_point["epochs_done"]
            resume_step = resume_point["steps_done"]
            if resume_step:
                print(f"resuming from {os.path.join(work_dir, 'last.keras')} at epoch {initial_epoch + 1}, "
                      f"step {resume_step} of {steps_per_epoch}")
            else:
                print(f"resuming from {os.path.join(work_dir, 'last.keras')} after epoch {initial_epoch}")
            if recipe["model"].get("init_from"):
                print("--resume wins: model.init_from is not applied (the checkpoint holds the run's weights)")
        else:
            if resume:
                print(f"--resume: no checkpoint in {work_dir}, starting from scratch")
            from kdet.losses import MultiBoxParts

            model = build_model(recipe, class_names)
            loss = build_loss(recipe, class_names, records["train"], anchors_per_level=model.anchors_per_level)
            model.compile(optimizer=build_optimizer(recipe, model, steps_per_epoch), loss=loss,
                          metrics=[MultiBoxParts(loss)],  # loc, conf, positives_per_image each epoch
                          jit_compile=bool(train_cfg.get("jit_compile", False)))
    budget = _time_budget(recipe, steps_per_epoch, mosaic_off_from, resume_point)
    callbacks = build_callbacks(recipe, out_dir, class_names, val_ds, resume_point,
                                extra_state=(lambda: dict(time_budget=budget.state())) if budget is not None else None,
                                planned_epochs=(lambda: budget.epochs) if budget is not None else None)
    if budget is not None:  # first: it decides before val_AP and the checkpoint of the epoch are written
        for callback in callbacks:
            if hasattr(callback, "every_n_epochs"):  # val_AP and the TensorBoard images keep their share
                budget.pace(callback)
        callbacks[:0] = [budget] + ([budget.progbar] if budget.progbar else [])
    if pass_epoch is not None:
        from kdet.training.callbacks import PassEpoch

        callbacks.insert(0, PassEpoch(pass_epoch))
    callbacks.append(_mid_epoch_checkpoints(recipe, callbacks, steps_per_epoch, stop, strategy, resume_point))
    if budget is not None:
        budget.skipped_steps = resume_step
    prepare_fit(model, train_ds, strategy)
    started = time.time()
    from kdet.training.preemption import fit_resumable

    epochs = budget.fit_epochs(initial_epoch) if budget is not None else int(train_cfg["epochs"])
    # train_ds shuffles itself (fit's shuffle=False); resumed mid-epoch: the rest of that pass first
    history = fit_resumable(model, train_ds, epochs=max(epochs, initial_epoch + 1) if resume_step else epochs,
                            initial_epoch=initial_epoch, callbacks=callbacks, verbose=recipe.get("verbose", 1),
                            steps_per_epoch=steps_per_epoch, resume_step=resume_step, skip_batches=skip_batches,
                            tail_dataset=epochs_of(steps_per_epoch - resume_step) if resume_step else None)
    train_seconds = time.time() - started
    if budget is not None:
        train_seconds = budget.elapsed()  # the whole budget's time, with the runs this one resumes
        print(f"time_budget {budget.minutes:g} min: {initial_epoch + len(history.epoch)} epochs in "
              f"{train_seconds / 60:.2f} min")
    if val_records and train_cfg.get("ema_momentum") is not None:
        _evaluate_averaged_weights(model, val_records, class_names, recipe)
    run = _run_summary(recipe, callbacks, budget, model, steps_per_epoch)
    return finish(model, recipe, out_dir, class_names, test_records, train_seconds, train_records=records["train"],
                  run=run)


def _run_summary(recipe, callbacks, budget, model, steps_per_epoch):
    """What the training did against its plan and why it stopped (the run report's evidence)."""
    from kdet.training.callbacks import EarlyStoppingOnEvaluations

    train_cfg, model_cfg = recipe["train"], recipe["model"]
    planned = int(budget.epochs if budget is not None else train_cfg["epochs"])
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    stopper = next((c for c in callbacks if isinstance(c, EarlyStoppingOnEvaluations)), None)
    if stopper is not None and stopper.stopped_epoch > 0:
        stopped_by = (f"early stopping after epoch {stopper.stopped_epoch + 1} ({stopper.patience} evaluations "
                      f"without a better {stopper.monitor})")
    elif budget is not None and budget.stopped_by_budget:
        stopped_by = f"the time budget ({budget.minutes:g} min)"
    else:
        stopped_by = "the plan's last epoch"
    return dict(planned_epochs=planned, steps_per_epoch=steps_per_epoch, planned_steps=planned * steps_per_epoch,
                steps_done=steps, stopped_by=stopped_by, learning_rate=train_cfg.get("learning_rate"),
                backbone=model_cfg.get("backbone"), width_multiplier=model_cfg.get("width_multiplier", 1.0))


def _mid_epoch_checkpoints(recipe, callbacks, steps_per_epoch, stop, strategy, resume_point):
    """The ``MidEpochCheckpoint`` callback: on SIGTERM / SIGINT, and every ``train.checkpoint_every_minutes``."""
    from kdet.training.callbacks import Checkpoints
    from kdet.training.preemption import MidEpochCheckpoint
    from kdet.training.strategy import is_multi_worker

    every = recipe["train"].get("checkpoint_every_minutes", default_of("train", "checkpoint_every_minutes"))
    if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float)) or every < 0):
        raise RecipeError(f"train.checkpoint_every_minutes must be a number of minutes >= 0 (0 or None: only at "
                          f"epoch ends), got {every!r}")
    checkpoints = next(c for c in callbacks if isinstance(c, Checkpoints))
    start = (resume_point["epochs_done"], resume_point["steps_done"]) if resume_point else (0, 0)
    return MidEpochCheckpoint(checkpoints, steps_per_epoch, every_minutes=every, stop=stop, start=start,
                              metrics_state=(resume_point or {}).get("metrics"),
                              multi_worker=strategy if is_multi_worker(strategy) else None)


def _check_strategy_backend(kind):
    """``train.strategy``: the tf.distribute strategies need the TensorFlow backend."""
    if kind != "default" and keras.backend.backend() != "tensorflow":
        raise RecipeError(f"train.strategy={kind!r} is a tf.distribute strategy: it needs KERAS_BACKEND=tensorflow "
                          f"(under {keras.backend.backend()} only 'default' runs; multi-device training there is "
                          "keras.distribution, which kdet does not set up)")


def _mosaic_switch(recipe, pass_epoch):
    """The ``tf.Variable`` holding the first epoch without mosaic, for ``data.close_mosaic`` (None without it)."""
    import tensorflow as tf

    from kdet.data.augment import Mosaic

    close = int(recipe["data"].get("close_mosaic") or 0)
    if not close:
        return None
    if close < 0:
        raise RecipeError(f"data.close_mosaic must be a number of epochs >= 0, got {close}")
    if not any(isinstance(t, Mosaic) for t in recipe["data"].get("augment") or []):
        print(f"note: data.close_mosaic={close} does nothing: data.augment has no mosaic() entry")
        return None
    if pass_epoch is None:
        raise RecipeError("data.close_mosaic needs train.seed (the epoch reaches the input pipeline "
                          "through the seeded passes)")
    first_off = max(0, int(recipe["train"]["epochs"]) - close)
    return tf.Variable(first_off, dtype=tf.int64, trainable=False)


def _time_budget(recipe, steps_per_epoch, mosaic_off_from, resume_point):
    """The ``TimeBudget`` callback for ``train.time_budget`` (None without one)."""
    minutes = recipe["train"].get("time_budget")
    if minutes is None:
        return None
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0:
        raise RecipeError(f"train.time_budget must be a number of minutes > 0, got {minutes!r}")
    from kdet.training.time_budget import TimeBudget

    verbose = recipe.get("verbose", 1)
    return TimeBudget(minutes, recipe["train"]["epochs"], steps_per_epoch,
                      close_mosaic=recipe["data"].get("close_mosaic") or 0, mosaic_off_from=mosaic_off_from,
                      resumed=(resume_point or {}).get("time_budget"),
                      progbar=keras.callbacks.ProgbarLogger() if verbose else None)


def _preflight(recipe, records, class_names, work_dir):
    """Pre-flight checks (printed briefly, ``preflight.txt`` in full); fits "auto" anchors first."""
    from kdet.analysis.preflight import preflight_for_training

    return preflight_for_training(recipe, records, class_names, work_dir, verbose=recipe.get("verbose", 1))


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


def _repeated_to_epoch_size(recipe, train_records):
    """Whole copies of a small training set so one epoch has about ``data.min_images_per_epoch`` images.

    Keeps per-epoch work (checkpoint, log, evaluation) in proportion to training on tiny sets.
    """
    minimum = recipe["data"].get("min_images_per_epoch")
    if not minimum or not train_records or len(train_records) >= minimum:
        return train_records
    copies = max(1, int(round(minimum / len(train_records))))
    if copies == 1:
        return train_records
    print(f"train: {len(train_records)} images repeated {copies}x per epoch (data.min_images_per_epoch={minimum})")
    return list(train_records) * copies


def _resolve_auto_epochs(train_cfg, steps_per_epoch, num_images=None):
    """``train.epochs="auto"``: about ``train.auto_steps`` optimizer steps, in whole epochs (written back).

    With ``train.auto_steps_per_image``, a small set gets fewer: that many steps per training image
    (a tiny set overfits long before ``auto_steps``).
    """
    if train_cfg.get("epochs") != "auto":
        return
    steps = int(train_cfg.get("auto_steps") or 3000)
    why = f"train.auto_steps={steps}"
    per_image = train_cfg.get("auto_steps_per_image")
    if per_image and num_images and per_image * num_images < steps:
        steps = int(round(per_image * num_images))
        why = f"train.auto_steps_per_image={per_image:g} x {num_images} training images, below train.auto_steps"
    train_cfg["epochs"] = max(1, int(round(steps / steps_per_epoch)))
    print(f"train.epochs='auto': {train_cfg['epochs']} epochs of {steps_per_epoch} steps ({why})")


def finish(model, recipe, work_dir, class_names, test_records, train_seconds, train_records=None, run=None):
    """Final evaluation, metrics.json, the run report and the SavedModel export."""
    from kdet.export import export_saved_model
    from kdet.metrics._coco_common import format_summary

    metrics = {"train_seconds": round(train_seconds, 1)}
    if test_records:
        coco, ground_truth, results = evaluate_records(model, test_records, class_names, recipe)
        metrics.update(coco)
        with open(os.path.join(work_dir, "test_detections.json"), "w") as f:
            json.dump(results, f)
        print(format_summary(coco))
        print(f"mAP@0.5 (COCO AP50) on {len(test_records)} held-out images: {coco['AP50']:.4f}"
              f"   VOC all-point mAP50: {coco['VOC_mAP50']:.4f}")
        _run_report(model, recipe, work_dir, class_names, test_records, ground_truth, results, train_records, run)
    else:
        print("no validation or test images: no final evaluation (add a test split to the data, or lower "
              "data.min_val_images to hold some training images out)")
    export_dir = os.path.join(work_dir, "saved_model")
    if keras.backend.backend() == "tensorflow":
        export_saved_model(model, export_dir, class_names, **eval_settings(recipe))
        metrics["saved_model"] = export_dir
    else:
        export_dir = metrics["saved_model"] = None
        _save_for_export(model, work_dir, class_names)
    with open(os.path.join(work_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=float)
    print(f"training took {train_seconds / 60:.1f} min; metrics: {work_dir}/metrics.json"
          + (f"; SavedModel: {export_dir}" if export_dir else ""))
    return metrics


def _save_for_export(model, work_dir, class_names):
    """Other backends: the final model as ``final.keras`` and the command that exports it under TensorFlow."""
    import shlex

    final = os.path.join(work_dir, "final.keras")
    model.save(final)
    print(f"SavedModel export needs the TensorFlow backend: skipped under {keras.backend.backend()}; "
          f"export the final model with: KERAS_BACKEND=tensorflow python tools/export.py {final} "
          f"{os.path.join(work_dir, 'saved_model')} --classes {shlex.quote(','.join(class_names))}")


def _run_report(model, recipe, work_dir, class_names, test_records, ground_truth, results, train_records, run=None):
    """The run report (tables, curves, confusion, gallery, findings): ``kdet.metrics.run_report``."""
    from kdet.metrics.run_report import report_after_training

    report_after_training(model, recipe, work_dir, class_names, test_records, ground_truth, results,
                          train_records=train_records, run=run)
    from kdet.analysis.label_issues import recipe_wants_label_issues, report_label_issues

    if recipe_wants_label_issues(recipe):  # K extra trainings: only when the recipe asks
        report_label_issues(recipe, work_dir)


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
    except Exception as err:  # a bad image met inside the input pipeline (say, changed since loading)
        from kdet.data.pipeline import input_error
        from kdet.training.callbacks import disk_error_reason

        reason = disk_error_reason(err, space_only=True)
        if reason is not None and work_dir:   # a write the work dir cannot take, outside the checkpoints
            detail = (str(err).strip().splitlines() or [""])[0][:200]
            raise UserError(f"{work_dir}: {reason} while writing the run's files ({detail}); the last checkpoint "
                            "is intact: free space (or make the folder writable) and run again with --resume") from None
        if input_error(err) is None:
            raise
        raise UserError(str(input_error(err))) from None
