"""Freezing the backbone and unfreezing it gradually, stage by stage from the top.

The model describes its backbone with two attributes (see ``kdet.models.ssd``):

* ``model.backbone_stages``: list of lists of layer names, bottom -> top;
* ``model.backbone_layer_names`` (optional): every backbone layer; layers in
  it that belong to no stage (e.g. a stem) are trainable only when the whole
  backbone is.

``set_trainable_stages(model, k)`` makes the top ``k`` stages trainable and
freezes the rest of the backbone (``k = 0``: backbone frozen). Frozen
``BatchNormalization`` layers run in inference mode in Keras 3 (their ``call``
uses batch statistics only when ``training and self.trainable``), so their
moving statistics stay put as well.

Changing ``trainable`` after the train function was traced needs a re-trace:
we call ``model.make_train_function(force=True)``; the TF ``fit`` loop reads
``model.train_function`` at every step, so a callback can change stages
inside one ``fit`` and optimizer state is kept. (On the JAX backend ``fit``
snapshots the trainable variables at its start: change stages between
``fit`` calls there.)

The optimizer must have slots for every variable that may become trainable.
:func:`prepare_optimizer` builds it over the fully unfrozen variable set; if it
was already built over fewer variables and has not stepped yet, it is replaced
by a fresh copy; otherwise a clear error is raised.
"""

import keras

from kdet.log import get_logger
from kdet.training.optim import ScaledSchedule

logger = get_logger(__name__)

Schedule = keras.optimizers.schedules.LearningRateSchedule


# ---------------------------------------------------------------- layers
def _layers_by_name(model):
    return {layer.name: layer for layer in model._flatten_layers(include_self=False, recursive=True)}


def _backbone_stages(model):
    stages = getattr(model, "backbone_stages", None)
    if not stages:
        raise ValueError(
            f"Model {model.name!r} has no `backbone_stages` (list of lists of layer names, "
            "bottom -> top); freezing needs it."
        )
    return [list(stage) for stage in stages]


def _lookup(model, names):
    layers = _layers_by_name(model)
    missing = [n for n in names if n not in layers]
    if missing:
        raise ValueError(f"Model {model.name!r} has no layers named {missing[:5]} (from its backbone description).")
    return [layers[n] for n in names]


def _backbone_names(model):
    stages = _backbone_stages(model)
    in_stages = [name for stage in stages for name in stage]
    extra = [n for n in (getattr(model, "backbone_layer_names", None) or []) if n not in set(in_stages)]
    return stages, extra


def num_stages(model):
    return len(_backbone_stages(model))


def _containers_of(model, layers):
    """Nested layers/models (below ``model``) holding any of ``layers``: they must stay trainable."""
    targets = {id(layer) for layer in layers}
    containers = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        inner = list(layer._flatten_layers(include_self=False, recursive=True))
        if inner and any(id(sub) in targets for sub in inner):
            containers.append(layer)
    return containers


def set_trainable_stages(model, k, refresh=True):
    """Top ``k`` backbone stages trainable, the rest of the backbone frozen; returns ``k``.

    ``k`` is clipped to ``[0, number of stages]``. Non-backbone layers are not touched.
    """
    stages, extra = _backbone_names(model)
    k = max(0, min(int(k), len(stages)))
    trainable_names = {name for stage in stages[len(stages) - k :] for name in stage}
    if k == len(stages):
        trainable_names.update(extra)
    all_names = [name for stage in stages for name in stage] + extra
    layers = _lookup(model, all_names)
    for container in _containers_of(model, layers):
        if container.name not in set(all_names):
            container.trainable = True
    for layer in layers:
        if layer.name in trainable_names:
            layer.trainable = True
    for layer in layers:
        if layer.name not in trainable_names:
            layer.trainable = False
    model._kdet_trainable_stages = k
    if refresh:
        refresh_train_function(model)
    return k


def freeze_backbone(model):
    """Freeze the whole backbone (BatchNorm included: inference mode, stats fixed)."""
    prepare_optimizer(model)
    return set_trainable_stages(model, 0)


def unfreeze_stages(model, k):
    """Make the top ``k`` backbone stages trainable (others frozen)."""
    prepare_optimizer(model)
    return set_trainable_stages(model, k)


def unfreeze_all(model):
    return unfreeze_stages(model, num_stages(model))


def trainable_stages(model):
    """Number of top stages currently trainable (as last set by this module)."""
    return getattr(model, "_kdet_trainable_stages", None)


def refresh_train_function(model):
    """Re-trace the train function after ``trainable`` changed (no-op before compile)."""
    if getattr(model, "compiled", False) and getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)


# ---------------------------------------------------------------- optimizer
def _all_candidate_variables(model):
    """Variables that are trainable once the backbone is fully unfrozen (state restored after)."""
    all_layers = list(model._flatten_layers(include_self=True, recursive=True))
    layer_flags = [(layer, layer._trainable) for layer in all_layers]
    variable_flags = [(v, v.trainable) for v in model.variables if hasattr(v, "trainable")]
    saved_k = getattr(model, "_kdet_trainable_stages", None)
    try:
        set_trainable_stages(model, num_stages(model), refresh=False)
        return list(model.trainable_variables)
    finally:
        for layer, value in layer_flags:
            layer._trainable = value
        for variable, value in variable_flags:
            variable.trainable = value
        model._kdet_trainable_stages = saved_k


def _fresh_copy(optimizer):
    """Same optimizer (config and weight-decay exclusions), unbuilt."""
    loss_scale = keras.optimizers.LossScaleOptimizer
    if isinstance(optimizer, loss_scale):
        inner = _fresh_copy(optimizer.inner_optimizer)
        config = optimizer.get_config()
        return loss_scale(
            inner,
            initial_scale=config.get("initial_scale", 2.0**15),
            dynamic_growth_steps=config.get("dynamic_growth_steps", 2000),
            name=optimizer.name,
        )
    fresh = optimizer.__class__.from_config(optimizer.get_config())
    for attr in ("_exclude_from_weight_decay", "_exclude_from_weight_decay_pattern"):
        if hasattr(optimizer, attr):
            setattr(fresh, attr, getattr(optimizer, attr))
    return fresh


def _strategy_scope(model):
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is not None and hasattr(strategy, "scope"):
        return strategy.scope()
    import contextlib

    return contextlib.nullcontext()


def prepare_optimizer(model):
    """Make ``model.optimizer`` hold slots for every variable that may become trainable.

    Call after ``compile`` (the unfreezing callbacks call it at train begin).
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not getattr(model, "built", False):
        return
    variables = _all_candidate_variables(model)
    with _strategy_scope(model):
        if not optimizer.built:
            optimizer.build(variables)
            return
        base = getattr(optimizer, "inner_optimizer", optimizer)
        known = base._trainable_variables_indices
        missing = [v for v in variables if base._var_key(v) not in known]
        if not missing:
            return
        if int(keras.ops.convert_to_numpy(optimizer.iterations)) > 0:
            raise ValueError(
                f"The optimizer was built without {len(missing)} backbone variables "
                f"(e.g. {missing[0].path!r}) and has already stepped, so they cannot be unfrozen. "
                "Compile the model before freezing, or call "
                "kdet.training.freezing.prepare_optimizer(model) after compile and before fit."
            )
        fresh = _fresh_copy(optimizer)
        fresh.build(variables)
        model.optimizer = fresh
    refresh_train_function(model)


# ---------------------------------------------------------------- callbacks
class GradualUnfreezing(keras.callbacks.Callback):
    """Unfreeze the backbone top-down at scheduled epochs.

    Args:
        schedule: ``{epoch: k}``, from ``epoch`` (0-based) on the top ``k``
            stages are trainable (0 = backbone frozen, "all" = whole backbone). The entry with the
            largest epoch ``<= current`` applies, so resuming works; epochs
            before the first key keep the model as it is.
        lr_factors: optional ``{k: factor}``: while ``k`` stages are trainable
            the learning rate is ``factor`` x the learning rate (or schedule)
            the optimizer had at train begin. It is one global factor (Keras
            optimizers have a single learning rate), e.g. lower it when the
            backbone joins. Keys may be "all". Missing ``k``: factor 1. A
            ``ScaledSchedule`` found at train begin (checkpoint resumed
            mid-schedule) is unwrapped first, so factors do not compound.
        verbose: print each change.

    Each change is printed and logged as ``logs["trainable_stages"]`` (and
    ``logs["lr_factor"]``) at epoch end, so it lands in ``History``.
    """

    def __init__(self, schedule, lr_factors=None, verbose=1):
        super().__init__()
        if not schedule:
            raise ValueError("GradualUnfreezing needs a non-empty {epoch: num_stages} schedule.")
        self.schedule = {int(e): k for e, k in schedule.items()}
        self._lr_factors = dict(lr_factors or {})
        self.lr_factors = {}
        self.verbose = verbose
        self._base_lr = None
        self._current = None
        self._factor = 1.0

    def _stages_for(self, epoch):
        due = [e for e in self.schedule if e <= epoch]
        return self.schedule[max(due)] if due else None

    def _resolve(self, k):
        return num_stages(self.model) if k in ("all", None, -1) else int(k)

    def on_train_begin(self, logs=None):
        prepare_optimizer(self.model)
        self.lr_factors = {self._resolve(k): float(f) for k, f in self._lr_factors.items()}
        if self.lr_factors:
            optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
            lr = optimizer._learning_rate
            if isinstance(lr, ScaledSchedule):  # resumed from a checkpoint saved mid-schedule
                lr = lr.base
            self._base_lr = lr if isinstance(lr, Schedule) else float(keras.ops.convert_to_numpy(lr))
        self._current = trainable_stages(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        wanted = self._stages_for(epoch)
        if wanted is None:
            return
        k = min(self._resolve(wanted), num_stages(self.model))
        if k == self._current:
            return
        set_trainable_stages(self.model, k)
        self._current = k
        message = f"Epoch {epoch + 1}: {k}/{num_stages(self.model)} backbone stages trainable"
        if self.lr_factors:
            self._factor = self.lr_factors.get(k, 1.0)
            self._set_lr_factor(self._factor)
            message += f", learning-rate factor {self._factor:g}"
        if self.verbose:
            logger.info(message + f" ({len(self.model.trainable_variables)} trainable variables).")

    def _set_lr_factor(self, factor):
        optimizer = self.model.optimizer
        if isinstance(self._base_lr, Schedule):
            optimizer.learning_rate = ScaledSchedule(self._base_lr, factor)
        else:
            optimizer.learning_rate = self._base_lr * factor
        refresh_train_function(self.model)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._current is not None:
            logs["trainable_stages"] = self._current
            if self.lr_factors:
                logs["lr_factor"] = self._factor

    def get_config(self):
        return {"schedule": self.schedule, "lr_factors": self._lr_factors, "verbose": self.verbose}


class FreezeBackbone(GradualUnfreezing):
    """Backbone frozen for the first ``epochs`` epochs, then fully trainable."""

    def __init__(self, epochs, lr_factor_after=None, verbose=1):
        lr_factors = {"all": lr_factor_after} if lr_factor_after is not None else None
        super().__init__({0: 0, int(epochs): "all"}, lr_factors=lr_factors, verbose=verbose)
