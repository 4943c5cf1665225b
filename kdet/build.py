"""Recipe -> components: the data sources and records, the tf.data pipelines, the model, loss and optimizer.

Each builder is a small function of the recipe, so a user can call them from plain Keras;
``kdet.engine`` (the training run) and ``kdet.analysis.label_issues`` (the fold models) both
build from here. Detection and evaluation with a built model: :mod:`kdet.inference`.
"""

from kdet.config import bad_model_section, resolve_source
from kdet.defaults import default_of
from kdet.errors import DatasetError, RecipeError, UserError
from kdet.log import get_logger

logger = get_logger(__name__)


# ------------------------------------------------------------------ data
def load_sources(recipe):
    """The recipe's train/val/test sources (None where absent)."""
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


def oversampled(recipe, train_records, class_names):
    """The training records with repeat-factor sampling when the recipe asks for it."""
    threshold = recipe["data"].get("repeat_factor_threshold")
    if not threshold:
        return train_records
    from kdet.data.sampling import oversample_rare_classes

    repeated, summary = oversample_rare_classes(train_records, len(class_names), float(threshold),
                                                seed=int(recipe["train"].get("seed") or 0))
    logger.info(summary)
    return repeated


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
    logger.info(f"small_data: {num_train_images} training images <= {limit}: the recipe's small-data settings apply "
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
        logger.info(f"model.init_from is set: model.backbone_weights={weights!r} is not used (the checkpoint's weights "
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
        logger.info(f"note: model.backbone_weights='auto': {err}. Training {scratch['model']['backbone']} (width "
                    f"{scratch['model'].get('width_multiplier', 1.0)}) from scratch instead; "
                    "set model.backbone_weights=None to skip the attempt")
        return scratch
    logger.info(f"model.backbone_weights='auto': ImageNet weights found; using the recipe's pretrained settings "
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
        logger.info(format_class_weights(weights, class_names, counts=counts))
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
        logger.warning(warning)
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


def compile_model(recipe, model, class_names, train_records, steps_per_epoch, verbose=True, loss_parts=True):
    """``model.compile`` with the recipe's loss (class weights from ``train_records``) and optimizer.

    ``loss_parts``: the loss's parts (loc, conf, positives_per_image) as metrics each epoch;
    ``verbose``: the class weights are printed. Returns the loss.
    """
    from kdet.losses import MultiBoxParts

    loss = build_loss(recipe, class_names, train_records, verbose=verbose, anchors_per_level=model.anchors_per_level)
    model.compile(optimizer=build_optimizer(recipe, model, steps_per_epoch), loss=loss,
                  metrics=[MultiBoxParts(loss)] if loss_parts else None,  # loc, conf, positives_per_image each epoch
                  jit_compile=bool(recipe["train"].get("jit_compile", False)))
    return loss


def freezing_callbacks(train_cfg):
    """``train.unfreeze_schedule`` / ``train.freeze_backbone_epochs``: the callbacks that (un)freeze the backbone."""
    from kdet.training.freezing import FreezeBackbone, GradualUnfreezing

    if train_cfg.get("unfreeze_schedule"):
        factor = float(train_cfg.get("unfreeze_lr_factor", 1.0))
        schedule = {int(k): v for k, v in train_cfg["unfreeze_schedule"].items()}
        lr_factors = {k: factor for k in schedule.values() if k} if factor != 1.0 else None
        return [GradualUnfreezing(schedule, lr_factors=lr_factors)]
    if train_cfg.get("freeze_backbone_epochs"):
        return [FreezeBackbone(epochs=int(train_cfg["freeze_backbone_epochs"]))]
    return []
