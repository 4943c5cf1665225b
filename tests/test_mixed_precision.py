"""Mixed precision (float16 / bfloat16) against float32, and XLA on CPU."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from kdet.training import precision

STEPS = 3


@pytest.fixture(autouse=True)
def restore_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def build_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(4, name="dense")(x)
    return keras.Model(inputs, precision.float32_output(x))


def data():
    rng = np.random.default_rng(0)
    return rng.random((16, 8, 8, 3)).astype("float32"), rng.random((16, 4)).astype("float32")


def train(policy, weights=None, jit_compile=False):
    """Full-batch SGD for STEPS steps: history holds one loss per step."""
    precision.setup_precision(policy)
    keras.utils.set_random_seed(0)
    model = build_model()
    if weights is not None:
        model.set_weights(weights)
    initial = model.get_weights()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", **precision.compile_options(jit_compile))
    x, y = data()
    history = model.fit(x, y, batch_size=16, epochs=STEPS, shuffle=False, verbose=0)
    predictions = keras.ops.convert_to_numpy(model(x))
    return model, initial, np.array(history.history["loss"]), predictions


@pytest.fixture(scope="module")
def reference():
    model, initial, losses, predictions = train("float32")
    keras.mixed_precision.set_global_policy("float32")
    return initial, losses, predictions


# Tolerances (relative): float16 has a 10-bit mantissa (~5e-4 per rounding),
# bfloat16 a 7-bit one (~4e-3). Observed here: losses 4e-5 (f16) / 4e-3 (bf16),
# predictions 1e-3 / 1.6e-2 of their range.
@pytest.mark.parametrize(
    "policy, loss_rtol, prediction_rtol", [("mixed_float16", 1e-3, 5e-3), ("mixed_bfloat16", 2e-2, 5e-2)]
)
def test_mixed_precision_close_to_float32(reference, policy, loss_rtol, prediction_rtol):
    initial, ref_losses, ref_predictions = reference
    model, _, losses, predictions = train(policy, weights=initial)
    assert model.get_layer("conv").compute_dtype == policy.split("_")[1]
    assert all(w.dtype == "float32" for w in model.weights)  # variables stay float32
    assert predictions.dtype == np.float32  # float32 output layer
    wrapped = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert wrapped == (policy == "mixed_float16")  # compile wraps only for float16
    assert ref_losses[-1] < ref_losses[0]  # training actually moves
    np.testing.assert_allclose(losses, ref_losses, rtol=loss_rtol)
    scale = np.abs(ref_predictions).max()
    np.testing.assert_allclose(predictions, ref_predictions, rtol=0, atol=prediction_rtol * scale)


def test_jit_compile_on_cpu_matches(reference):
    initial, ref_losses, ref_predictions = reference
    model, _, losses, predictions = train("float32", weights=initial, jit_compile=True)
    assert model.jit_compile is True
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(predictions, ref_predictions, rtol=1e-4, atol=1e-6)


def test_bad_policy_and_jit_values_are_rejected():
    with pytest.raises(ValueError, match="mixed_float16"):
        precision.setup_precision("float16")
    with pytest.raises(ValueError, match="jit_compile"):
        precision.compile_options(jit_compile="yes")
    assert precision.setup_precision(None) == "float32"


def test_loss_scale_optimizer_helper():
    sgd = keras.optimizers.SGD(0.1)
    assert precision.loss_scale_optimizer(sgd, "float32") is sgd
    assert isinstance(precision.loss_scale_optimizer(sgd, "mixed_float16"), keras.optimizers.LossScaleOptimizer)
