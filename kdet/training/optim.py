"""Optimizers and learning-rate schedules for SSD training.

Weight decay in Keras 3
-----------------------
Keras 3 optimizers take ``weight_decay`` and apply it **decoupled**:
before each update ``var -= lr * weight_decay * var``, outside the gradient
and therefore outside SGD momentum and Adam's moment estimates (AdamW style).
Caffe (the SSD paper) and ``torch.optim.SGD`` use **coupled L2**: ``wd * var``
is added to the gradient and so goes through momentum; with momentum 0.9 its
steady-state effect is ~10x the decoupled one at the same coefficient.
:func:`build_optimizer` therefore offers both: ``weight_decay_mode="l2"``
(default for SGD, paper-faithful, via :class:`SGDWithL2`) and
``"decoupled"`` (default for AdamW, Keras' own mechanism).

In both modes normalisation-layer variables (BatchNorm, LayerNorm, a learnable
L2Normalization scale, ...) and biases are excluded from decay.

Schedules
---------
All schedules are ``keras.optimizers.schedules.LearningRateSchedule``
subclasses written with ``keras.ops`` and registered for serialization:
:class:`WarmupSchedule` (linear warm-up wrapped around any schedule or float),
:class:`StepSchedule` (the SSD paper's x0.1 drops at 80k/100k iterations),
:class:`CosineSchedule`, :class:`ScaledSchedule` (a constant multiplier,
used by gradual unfreezing's ``lr_factors``) and :class:`FittedSchedule` (a planned
schedule re-paced to fit ``train.time_budget``).
"""

import math

import keras
from keras import ops

from kdet.defaults import WEIGHT_DECAY

Schedule = keras.optimizers.schedules.LearningRateSchedule

# Variable names (``variable.name`` in Keras 3 is the short name, e.g.
# "kernel", "bias", "gamma") that never get weight decay, used when no model
# is given to find the variables themselves.
DEFAULT_NO_DECAY_NAMES = ("bias", "gamma", "beta", "moving_mean", "moving_variance")


# ---------------------------------------------------------------- schedules
def _as_schedule(learning_rate):
    """Accept a float or a schedule; return a schedule."""
    if isinstance(learning_rate, Schedule):
        return learning_rate
    if isinstance(learning_rate, dict):
        return keras.saving.deserialize_keras_object(learning_rate)
    return ConstantSchedule(float(learning_rate))


def _serialize_schedule(schedule):
    if isinstance(schedule, ConstantSchedule):
        return schedule.learning_rate
    return keras.saving.serialize_keras_object(schedule)


@keras.saving.register_keras_serializable(package="kdet")
class ConstantSchedule(Schedule):
    """A fixed learning rate, as a schedule (so it can be wrapped)."""

    def __init__(self, learning_rate):
        self.learning_rate = float(learning_rate)

    def __call__(self, step):
        return ops.cast(self.learning_rate, "float32")

    def get_config(self):
        return {"learning_rate": self.learning_rate}


@keras.saving.register_keras_serializable(package="kdet")
class WarmupSchedule(Schedule):
    """Linear warm-up in front of a base schedule.

    For ``step < warmup_steps`` the rate is ``base(step) * f`` where ``f`` goes
    linearly from ``warmup_factor`` (at step 0) to 1 (at ``warmup_steps``),
    as in torchvision's detection references; afterwards it is ``base(step)``.
    """

    def __init__(self, base, warmup_steps, warmup_factor=0.001):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.base = _as_schedule(base)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        base_lr = ops.cast(self.base(step), "float32")
        if self.warmup_steps == 0:
            return base_lr
        alpha = ops.minimum(step / float(self.warmup_steps), 1.0)
        factor = self.warmup_factor * (1.0 - alpha) + alpha
        return base_lr * factor

    def get_config(self):
        return {
            "base": _serialize_schedule(self.base),
            "warmup_steps": self.warmup_steps,
            "warmup_factor": self.warmup_factor,
        }


@keras.saving.register_keras_serializable(package="kdet")
class StepSchedule(Schedule):
    """Piecewise constant: ``base_lr * factor ** (number of boundaries passed)``.

    A boundary ``b`` is passed once ``step >= b`` (step counts finished
    optimizer updates, i.e. ``optimizer.iterations``).
    """

    def __init__(self, base_lr, boundaries, factor=0.1):
        boundaries = [int(b) for b in boundaries]
        if boundaries != sorted(boundaries):
            raise ValueError(f"boundaries must be increasing, got {boundaries}")
        self.base_lr = float(base_lr)
        self.boundaries = boundaries
        self.factor = float(factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        passed = ops.zeros((), "float32")
        for boundary in self.boundaries:
            passed = passed + ops.cast(step >= float(boundary), "float32")
        return self.base_lr * ops.power(self.factor, passed)

    def get_config(self):
        return {"base_lr": self.base_lr, "boundaries": self.boundaries, "factor": self.factor}


@keras.saving.register_keras_serializable(package="kdet")
class CosineSchedule(Schedule):
    """Cosine decay from ``base_lr`` to ``base_lr * final_factor`` over ``total_steps``."""

    def __init__(self, base_lr, total_steps, final_factor=0.0):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.final_factor = float(final_factor)

    def __call__(self, step):
        progress = ops.minimum(ops.cast(step, "float32") / float(self.total_steps), 1.0)
        cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
        return self.base_lr * (self.final_factor + (1.0 - self.final_factor) * cosine)

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "final_factor": self.final_factor,
        }


@keras.saving.register_keras_serializable(package="kdet")
class ScaledSchedule(Schedule):
    """``factor * base(step)``: a constant multiplier on any schedule."""

    def __init__(self, base, factor):
        self.base = _as_schedule(base)
        self.factor = float(factor)

    def __call__(self, step):
        return ops.cast(self.base(step), "float32") * self.factor

    def get_config(self):
        return {"base": _serialize_schedule(self.base), "factor": self.factor}


@keras.saving.register_keras_serializable(package="kdet")
class FittedSchedule(Schedule):
    """A planned schedule (``planned_steps`` long) played at an adjustable pace: what ``train.time_budget`` fits.

    ``lr(step) = base(position)`` with ``position = anchor_position + (step - anchor_step) * rate``:
    the identity until :meth:`fit_rest` says the run will end at ``total_steps`` instead; the
    rest of the plan (warm-up left, step drops, cosine) is then squeezed or stretched into the
    steps left, continuing from where it is (no jump in the learning rate). The three numbers
    live in one variable read inside the compiled train step, so a re-fit during ``fit`` needs
    no retrace; ``get_config`` saves their values with the checkpoint (``--resume``).
    """

    def __init__(self, base, planned_steps, anchor_step=0.0, anchor_position=0.0, rate=1.0):
        if planned_steps <= 0:
            raise ValueError(f"planned_steps must be > 0, got {planned_steps}")
        self.base = _as_schedule(base)
        self.planned_steps = int(planned_steps)
        self.pace = keras.Variable([anchor_step, anchor_position, rate], dtype="float32", trainable=False,
                                   name="fitted_schedule_pace")

    def position(self, step):
        """Where ``step`` falls on the planned schedule's step axis (a tensor)."""
        anchor_step, anchor_position, rate = ops.unstack(ops.convert_to_tensor(self.pace), 3)
        return anchor_position + (ops.cast(step, "float32") - anchor_step) * rate

    def __call__(self, step):
        return ops.cast(self.base(self.position(step)), "float32")

    def fit_rest(self, step, total_steps):
        """From optimizer step ``step`` on, play the rest of the plan so that it ends at ``total_steps``."""
        here = float(ops.convert_to_numpy(self.position(step)))
        left_planned, left_steps = self.planned_steps - here, total_steps - step
        rate = left_planned / left_steps if left_planned > 0 and left_steps > 0 else 0.0
        self.pace.assign([float(step), here, rate])

    def step_at(self, position):
        """The optimizer step at which the current pace reaches planned ``position`` (None: never)."""
        anchor_step, anchor_position, rate = (float(v) for v in self.pace.numpy())
        if rate <= 0:
            return None
        return anchor_step + (position - anchor_position) / rate

    def get_config(self):
        anchor_step, anchor_position, rate = (float(v) for v in self.pace.numpy())
        return {"base": _serialize_schedule(self.base), "planned_steps": self.planned_steps,
                "anchor_step": anchor_step, "anchor_position": anchor_position, "rate": rate}


def find_fitted_schedule(optimizer):
    """The :class:`FittedSchedule` in ``optimizer``'s learning rate (inside any wrappers), or None."""
    schedule = getattr(optimizer, "_learning_rate", None)  # Keras keeps the schedule object there
    while schedule is not None and not isinstance(schedule, FittedSchedule):
        schedule = getattr(schedule, "base", None)
    return schedule


def epochs_to_steps(epochs, steps_per_epoch):
    """Epoch boundaries -> optimizer-step boundaries (``int(e * steps_per_epoch)``).

    Accepts one number or a list; fractional epochs are allowed.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    if isinstance(epochs, (list, tuple)):
        return [int(round(e * steps_per_epoch)) for e in epochs]
    return int(round(epochs * steps_per_epoch))


def step_schedule(base_lr, boundaries_steps, factor=0.1, warmup_steps=0, warmup_factor=0.001):
    """SSD-paper style schedule (e.g. ``boundaries_steps=[80000, 100000]``), optional warm-up."""
    schedule = StepSchedule(base_lr, boundaries_steps, factor)
    if warmup_steps:
        schedule = WarmupSchedule(schedule, warmup_steps, warmup_factor)
    return schedule


def cosine_schedule(base_lr, total_steps, final_factor=0.0, warmup_steps=0, warmup_factor=0.001):
    """Cosine decay over ``total_steps``, optional linear warm-up in front."""
    schedule = CosineSchedule(base_lr, total_steps, final_factor)
    if warmup_steps:
        schedule = WarmupSchedule(schedule, warmup_steps, warmup_factor)
    return schedule


# ---------------------------------------------------------------- optimizers
class EMAWarmup:
    """Keras' weight average (``use_ema``) with Ultralytics' warm-up, as a mixin for an optimizer class.

    Keras averages with a fixed ``ema_momentum`` from the first step, so after N steps the random
    initial weights still hold ``momentum ** N`` of the average (0.998 over 480 steps: 38%). With
    ``ema_warmup_steps=T`` the momentum of step t is ``ema_momentum * (1 - exp(-t / T))``: the average
    follows the weights closely at first and averages over ~1 / (1 - ema_momentum) steps later on.
    ``ema_warmup_steps=0``: Keras' own rule.
    """

    def __init__(self, *args, ema_warmup_steps=0, **kwargs):
        super().__init__(*args, **kwargs)
        if ema_warmup_steps < 0:
            raise ValueError(f"ema_warmup_steps must be >= 0, got {ema_warmup_steps}")
        self.ema_warmup_steps = float(ema_warmup_steps)

    def _update_model_variables_moving_average(self, trainable_variables):
        if not (self.use_ema and self.ema_warmup_steps):
            return super()._update_model_variables_moving_average(trainable_variables)
        step = ops.cast(self.iterations, "float32")
        momentum = self.ema_momentum * (1.0 - ops.exp(-step / self.ema_warmup_steps))
        for variable, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                m = ops.cast(momentum, variable.dtype)
                average.assign(m * average + (1.0 - m) * variable)

    def get_config(self):
        return {**super().get_config(), "ema_warmup_steps": self.ema_warmup_steps}


@keras.saving.register_keras_serializable(package="kdet")
class SGD(EMAWarmup, keras.optimizers.SGD):
    """Keras' SGD (decoupled ``weight_decay``) with :class:`EMAWarmup`."""


@keras.saving.register_keras_serializable(package="kdet")
class AdamW(EMAWarmup, keras.optimizers.AdamW):
    """Keras' AdamW with :class:`EMAWarmup`."""


@keras.saving.register_keras_serializable(package="kdet")
class SGDWithL2(EMAWarmup, keras.optimizers.SGD):
    """SGD with coupled L2 weight decay (Caffe / ``torch.optim.SGD`` semantics).

    ``l2 * var`` is added to the gradient before the momentum update, for every
    variable not excluded with ``exclude_from_weight_decay``. Keras' own
    (decoupled) ``weight_decay`` is left off.
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, l2=0.0, **kwargs):
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, **kwargs)
        self.l2 = float(l2)

    def update_step(self, gradient, variable, learning_rate):
        if self.l2 and self._use_weight_decay(variable):
            gradient = ops.add(
                ops.cast(gradient, variable.dtype),
                ops.multiply(ops.cast(self.l2, variable.dtype), variable),
            )
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["l2"] = self.l2
        return config


def _is_normalization_layer(layer):
    """BatchNorm, LayerNorm, GroupNorm, custom L2Normalization, ..."""
    return "normalization" in type(layer).__name__.lower()


def no_decay_variables(model):
    """Model variables that must not be decayed: normalisation layers' and 1-D ones (biases)."""
    excluded, seen = [], set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        norm = _is_normalization_layer(layer)
        for variable in layer.weights:
            if id(variable) in seen:
                continue
            if norm or len(variable.shape) <= 1:
                excluded.append(variable)
                seen.add(id(variable))
    return excluded


def build_optimizer(
    name="sgd",
    learning_rate=1e-3,
    momentum=0.9,
    weight_decay=WEIGHT_DECAY,
    weight_decay_mode=None,
    model=None,
    exclude_names=DEFAULT_NO_DECAY_NAMES,
    nesterov=False,
    beta_1=0.9,
    beta_2=0.999,
    epsilon=1e-7,
    clipnorm=None,
    global_clipnorm=None,
    ema_momentum=None,
    ema_warmup_steps=0,
):
    """Build an SGD or AdamW optimizer with weight decay that skips norm layers and biases.

    Args:
        name: "sgd" or "adamw".
        learning_rate: float or ``LearningRateSchedule`` (see schedules above).
        weight_decay: coefficient; 0 or None switches decay off.
        weight_decay_mode: "l2" (coupled, through momentum, as Caffe/torch) or
            "decoupled" (Keras' ``weight_decay``). Default: "l2" for SGD,
            "decoupled" for AdamW.
        model: if given, its normalisation-layer and 1-D variables are excluded
            by identity (robust to any naming); ``exclude_names`` are always
            excluded by name as well (substring of ``variable.name``).
        ema_momentum: e.g. 0.998 keeps an exponential moving average of the
            trainable weights (Keras ``use_ema``), written into the model when
            ``fit`` ends; ``None``: no averaging.
        ema_warmup_steps: the average's warm-up (:class:`EMAWarmup`); 0: none.
    """
    name = name.lower()
    if name not in ("sgd", "adamw"):
        raise ValueError(f"Unknown optimizer {name!r}: expected 'sgd' or 'adamw'.")
    mode = weight_decay_mode or ("l2" if name == "sgd" else "decoupled")
    if mode not in ("l2", "decoupled"):
        raise ValueError(f"weight_decay_mode must be 'l2' or 'decoupled', got {mode!r}")
    weight_decay = float(weight_decay or 0.0)
    common = dict(learning_rate=learning_rate, clipnorm=clipnorm, global_clipnorm=global_clipnorm)
    if ema_momentum is not None:
        common.update(use_ema=True, ema_momentum=float(ema_momentum), ema_warmup_steps=float(ema_warmup_steps or 0))
    if name == "sgd" and mode == "l2":
        optimizer = SGDWithL2(momentum=momentum, nesterov=nesterov, l2=weight_decay, **common)
    elif name == "sgd":
        optimizer = SGD(
            momentum=momentum, nesterov=nesterov, weight_decay=weight_decay or None, **common
        )
    elif mode == "decoupled":
        optimizer = AdamW(
            weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, **common
        )
    else:
        raise ValueError("weight_decay_mode='l2' is only implemented for SGD; use 'decoupled' with adamw.")
    if weight_decay:
        var_list = no_decay_variables(model) if model is not None else None
        optimizer.exclude_from_weight_decay(var_list=var_list, var_names=list(exclude_names or []))
    return optimizer


def decayed_variables(optimizer, variables):
    """The subset of ``variables`` that ``optimizer`` applies weight decay to (for checks/logs)."""
    return [v for v in variables if optimizer._use_weight_decay(v)]
