"""Mixed precision and XLA switches.

What Keras 3 does by itself (checked in Keras 3.15 source, ``Trainer.compile``):

* ``keras.mixed_precision.set_global_policy("mixed_float16")`` makes layers
  built afterwards compute in float16 with float32 variables.
* ``model.compile`` wraps the optimizer in a dynamic
  ``keras.optimizers.LossScaleOptimizer`` when the **model's** dtype policy is
  ``mixed_float16`` (``auto_scale_loss=True``, the default). So the policy must
  be set *before the model is built*; no manual wrapping is needed with
  ``fit``. ``mixed_bfloat16`` needs no loss scaling (float32 exponent range).
* The loss is computed on whatever dtype the model outputs: **the model's
  final output layer should have ``dtype="float32"``** (see
  :func:`float32_output`) so the loss, the box decoding and the softmax run in
  float32; the loss should also cast ``y_pred`` to float32 defensively.

``jit_compile`` is Keras' ``compile(jit_compile=...)`` argument ("auto",
True or False); :func:`compile_options` passes it through with the others.
"""

import keras

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def setup_precision(policy="float32"):
    """Set the global dtype policy (call before building the model); returns its name."""
    if policy in (None, "fp32"):
        policy = "float32"
    if policy not in POLICIES:
        raise ValueError(f"Unknown precision policy {policy!r}: expected one of {POLICIES}.")
    keras.mixed_precision.set_global_policy(policy)
    return keras.mixed_precision.global_policy().name


def current_policy():
    return keras.mixed_precision.global_policy().name


def float32_output(x, name="predictions"):
    """Final identity layer computing in float32: use it on the model's single output."""
    return keras.layers.Activation("linear", dtype="float32", name=name)(x)


def loss_scale_optimizer(optimizer, policy=None):
    """Wrap ``optimizer`` for float16 in custom loops (``compile`` already does it for ``fit``)."""
    policy = policy or current_policy()
    if policy == "mixed_float16" and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def compile_options(jit_compile="auto", steps_per_execution=1):
    """Keyword arguments for ``model.compile`` controlling XLA and host-loop overhead."""
    if jit_compile not in ("auto", True, False):
        raise ValueError(f"jit_compile must be 'auto', True or False, got {jit_compile!r}")
    return {"jit_compile": jit_compile, "steps_per_execution": int(steps_per_execution)}
