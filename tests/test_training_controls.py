"""Optimizers/schedules, freezing and gradual unfreezing, non-finite guard, image logger."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from kdet.training import callbacks as kcb
from kdet.training import freezing, optim


# ---------------------------------------------------------------- helpers
@keras.saving.register_keras_serializable(package="kdet_test")
class ScaledL2Norm(keras.layers.Layer):
    """Stand-in for SSD's L2Normalization: a learnable per-channel scale named 'weight'."""

    def build(self, input_shape):
        self.weight = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="weight")

    def call(self, x):
        return x * self.weight


def tiny_detector(seed=0):
    """Three-stage conv backbone with BatchNorm + a dense head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="s0_conv")(inputs)
    x = keras.layers.BatchNormalization(name="s0_bn")(x)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="s1_conv")(x)
    x = keras.layers.BatchNormalization(name="s1_bn")(x)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="s2_conv")(x)
    x = ScaledL2Norm(name="l2norm")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.backbone_stages = [["s0_conv", "s0_bn"], ["s1_conv", "s1_bn"], ["s2_conv"]]
    model.backbone_layer_names = ["s0_conv", "s0_bn", "s1_conv", "s1_bn", "s2_conv"]
    return model


def data(n=16, seed=1):
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 8, 8, 3)) * 4 + 1).astype("float32")  # non-zero mean: BN modes differ
    y = rng.random((n, 2)).astype("float32")
    return x, y


def snapshot(model):
    return {v.path: np.array(v.numpy()) for v in model.variables}


def changed(before, after):
    return {k for k in before if not np.array_equal(before[k], after[k])}


def layer_vars(model, *names):
    return {v.path for n in names for v in model.get_layer(n).weights}


# ---------------------------------------------------------------- schedules
def value(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


def test_warmup_values_by_hand():
    s = optim.WarmupSchedule(0.1, warmup_steps=10, warmup_factor=0.1)
    # factor = 0.1 * (1 - step/10) + step/10
    assert value(s, 0) == pytest.approx(0.01)
    assert value(s, 5) == pytest.approx(0.055)
    assert value(s, 10) == pytest.approx(0.1)
    assert value(s, 1000) == pytest.approx(0.1)


def test_step_and_cosine_values():
    s = optim.step_schedule(1e-3, [80000, 100000])
    assert value(s, 79999) == pytest.approx(1e-3)
    assert value(s, 80000) == pytest.approx(1e-4)
    assert value(s, 100000) == pytest.approx(1e-5)
    c = optim.cosine_schedule(1.0, 100, final_factor=0.1)
    assert value(c, 0) == pytest.approx(1.0)
    assert value(c, 50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert value(c, 100) == pytest.approx(0.1)
    assert value(c, 200) == pytest.approx(0.1)
    w = optim.step_schedule(0.2, [10], warmup_steps=4, warmup_factor=0.5)
    assert value(w, 2) == pytest.approx(0.2 * 0.75)
    assert value(w, 10) == pytest.approx(0.02)


def test_schedule_serialization_roundtrip():
    s = optim.WarmupSchedule(optim.StepSchedule(0.1, [5, 8], 0.5), 3, 0.2)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(s))
    assert isinstance(restored, optim.WarmupSchedule)
    for step in [0, 1, 3, 5, 8, 9]:
        assert value(restored, step) == pytest.approx(value(s, step))
    # Inside an optimizer config too.
    opt = optim.build_optimizer("sgd", learning_rate=s)
    clone = optim.SGDWithL2.from_config(opt.get_config())
    assert value(clone._learning_rate, 1) == pytest.approx(value(s, 1))


def test_epochs_to_steps():
    assert optim.epochs_to_steps([10, 20], 50) == [500, 1000]
    assert optim.epochs_to_steps(1.5, 10) == 15
    with pytest.raises(ValueError):
        optim.epochs_to_steps(3, 0)


# ---------------------------------------------------------------- weight decay
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_excludes_norm_and_bias(name):
    model = tiny_detector()
    opt = optim.build_optimizer(name, 0.01, weight_decay=5e-4, model=model)
    decayed = {v.path for v in optim.decayed_variables(opt, model.trainable_variables)}
    assert decayed == {"s0_conv/kernel", "s1_conv/kernel", "s2_conv/kernel", "head/kernel"}
    # Without the model, names alone still exclude biases and BN (not the oddly named L2 scale).
    by_name = optim.build_optimizer(name, 0.01, weight_decay=5e-4)
    decayed = {v.path for v in optim.decayed_variables(by_name, model.trainable_variables)}
    assert decayed == {"s0_conv/kernel", "s1_conv/kernel", "s2_conv/kernel", "head/kernel", "l2norm/weight"}


def _two_steps(opt):
    w = keras.Variable(np.array([2.0], "float32"), name="kernel")
    b = keras.Variable(np.array([2.0], "float32"), name="bias")
    grads = [keras.ops.ones((1,)), keras.ops.ones((1,))]
    for _ in range(2):
        opt.apply(grads, [w, b])
    return float(w.numpy()[0]), float(b.numpy()[0])


def test_l2_is_coupled_and_decoupled_differs():
    # lr 0.1, momentum 0.9, decay 0.5, grad 1, w0 = 2.
    # L2 (through momentum): g=2, m=-0.2, w=1.8; g=1.9, m=-0.37, w=1.43.
    w, b = _two_steps(optim.build_optimizer("sgd", 0.1, momentum=0.9, weight_decay=0.5))
    assert w == pytest.approx(1.43, abs=1e-5)
    # bias undecayed: m=-0.1, w=1.9; m=-0.19, w=1.71
    assert b == pytest.approx(1.71, abs=1e-5)
    # Keras decoupled: w -= lr*wd*w first: 1.9 -> 1.8; 1.71 -> 1.52.
    w, b = _two_steps(optim.build_optimizer("sgd", 0.1, momentum=0.9, weight_decay=0.5, weight_decay_mode="decoupled"))
    assert w == pytest.approx(1.52, abs=1e-5)
    assert b == pytest.approx(1.71, abs=1e-5)


# ---------------------------------------------------------------- freezing
def test_frozen_batchnorm_runs_in_inference_mode():
    model = tiny_detector()
    freezing.freeze_backbone(model)
    bn = model.get_layer("s0_bn")
    x = np.random.default_rng(0).random((4, 8, 8, 4)).astype("float32") * 3 + 2
    frozen_train = keras.ops.convert_to_numpy(bn(x, training=True))
    inference = keras.ops.convert_to_numpy(bn(x, training=False))
    np.testing.assert_allclose(frozen_train, inference, rtol=1e-6)
    freezing.unfreeze_all(model)
    unfrozen_train = keras.ops.convert_to_numpy(bn(x, training=True))
    assert np.abs(unfrozen_train - inference).max() > 0.1


def test_freeze_then_unfreeze_top_stage_weights():
    model = tiny_detector()
    model.compile(optimizer=optim.build_optimizer("sgd", 0.01, model=model), loss="mse")
    freezing.freeze_backbone(model)
    x, y = data(8)
    before = snapshot(model)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    moved = changed(before, snapshot(model))
    assert moved == layer_vars(model, "head", "l2norm")  # BN moving stats included in "unchanged"

    assert freezing.unfreeze_stages(model, 1) == 1
    before = snapshot(model)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    moved = changed(before, snapshot(model))
    assert moved == layer_vars(model, "head", "l2norm", "s2_conv")


def test_gradual_unfreezing_inside_one_fit():
    model = tiny_detector()
    freezing.freeze_backbone(model)  # before compile: optimizer gets rebuilt at train begin
    model.compile(optimizer=optim.build_optimizer("sgd", 0.01, model=model), loss="mse")

    class Snapshots(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.items = []

        def on_epoch_begin(self, epoch, logs=None):
            self.items.append((snapshot(self.model), len(self.model.trainable_variables)))

    snaps = Snapshots()
    unfreezing = freezing.GradualUnfreezing({0: 0, 1: 1, 2: "all"}, lr_factors={3: 0.5}, verbose=0)
    x, y = data(16)
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[unfreezing, snaps])
    snaps.items.append((snapshot(model), None))
    assert history.history["trainable_stages"] == [0, 1, 3]
    assert history.history["lr_factor"] == [1.0, 1.0, 0.5]
    assert [n for _, n in snaps.items[:3]] == [3, 5, 13]  # head+l2norm, +s2_conv, +s0/s1 conv & BN
    epoch_moves = [changed(snaps.items[i][0], snaps.items[i + 1][0]) for i in range(3)]
    assert epoch_moves[0] == layer_vars(model, "head", "l2norm")
    assert epoch_moves[1] == layer_vars(model, "head", "l2norm", "s2_conv")
    assert epoch_moves[2] == {v.path for v in model.weights}  # BN moving stats move once unfrozen
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.005)


def test_freeze_backbone_callback_and_schedule_lr_factor():
    model = tiny_detector()
    schedule = optim.StepSchedule(0.01, [1000])
    model.compile(optimizer=optim.build_optimizer("sgd", schedule, model=model), loss="mse")
    cb = freezing.FreezeBackbone(epochs=1, lr_factor_after=0.1, verbose=0)
    x, y = data(8)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb])
    assert history.history["trainable_stages"] == [0, 3]
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(0.001)


def test_unfreezing_after_optimizer_stepped_without_slots_fails_clearly():
    model = tiny_detector()
    freezing.freeze_backbone(model)
    model.compile(optimizer="sgd", loss="mse")
    x, y = data(8)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="prepare_optimizer"):
        freezing.unfreeze_stages(model, 1)


def test_nested_backbone_model():
    keras.utils.set_random_seed(0)
    trunk_in = keras.Input((8, 8, 3))
    t = keras.layers.Conv2D(4, 3, name="low")(trunk_in)
    t = keras.layers.BatchNormalization(name="low_bn")(t)
    t = keras.layers.Conv2D(4, 3, name="high")(t)
    trunk = keras.Model(trunk_in, t, name="trunk")
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(1, name="head")(keras.layers.Flatten()(trunk(inputs)))
    model = keras.Model(inputs, outputs)
    model.backbone_stages = [["low", "low_bn"], ["high"]]
    freezing.freeze_backbone(model)
    assert {v.path for v in model.trainable_variables} == {"head/kernel", "head/bias"}
    freezing.unfreeze_stages(model, 1)
    assert {v.path for v in model.trainable_variables} == {"head/kernel", "head/bias", "high/kernel", "high/bias"}
    trunk.trainable = False  # even a frozen container is reopened for its trainable stages
    freezing.unfreeze_stages(model, 1)
    assert len(model.trainable_variables) == 4
    freezing.unfreeze_all(model)
    assert len(model.trainable_variables) == 8


def test_missing_backbone_description_is_reported():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="backbone_stages"):
        freezing.freeze_backbone(model)
    model.backbone_stages = [["nope"]]
    with pytest.raises(ValueError, match="nope"):
        freezing.freeze_backbone(model)


# ---------------------------------------------------------------- non-finite guard
def _nan_data():
    x, y = data(24)
    x[9, 0, 0, 0] = np.nan  # second batch of 8
    return x, y


def small_regressor(lr=0.01):
    """Dense model run eagerly: nothing to trace, so these tests stay fast."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse", run_eagerly=True)
    return model


def test_stop_on_non_finite_loss_stops_and_names_step(capsys):
    model = small_regressor()
    guard = kcb.StopOnNonFiniteLoss()
    x, y = _nan_data()
    history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[guard])
    assert guard.stopped_at == (0, 1)
    assert len(history.history["loss"]) == 1
    out = capsys.readouterr().out
    assert "epoch 1, batch 1" in out and "learning rate" in out and "log(w)" in out


def test_stop_on_non_finite_loss_can_raise_and_ignores_finite():
    model = small_regressor()
    x, y = _nan_data()
    with pytest.raises(kcb.NonFiniteLossError, match="float16"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[kcb.StopOnNonFiniteLoss(raise_error=True)])
    model = small_regressor()  # the NaN batch poisoned the weights: start afresh
    guard = kcb.StopOnNonFiniteLoss()
    x, y = data(16)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[guard])
    assert guard.stopped_at is None and len(history.history["loss"]) == 2


def test_diverging_learning_rate_is_caught():
    model = small_regressor(lr=1e6)
    guard = kcb.StopOnNonFiniteLoss(verbose=0)
    x, y = data(16)
    model.fit(x * 100, y, batch_size=2, epochs=5, verbose=0, callbacks=[guard])
    assert guard.stopped_at is not None and "Non-finite" in guard.message


# ---------------------------------------------------------------- image logger
def test_draw_boxes_pixels():
    image = np.zeros((10, 10, 3), np.uint8)
    drawn = kcb.draw_boxes(image, [[0.2, 0.2, 0.6, 0.6]], color=(255, 0, 0), thickness=1)
    # covers pixels 2..5 (continuous [2, 6))
    assert (drawn[2, 2:6, 0] == 255).all() and (drawn[5, 2:6, 0] == 255).all()
    assert (drawn[2:6, 2, 0] == 255).all() and (drawn[2:6, 5, 0] == 255).all()
    assert drawn[3, 3, 0] == 0 and drawn[1, 2, 0] == 0 and drawn[6, 6, 0] == 0
    assert image.sum() == 0  # input untouched


def test_image_logger_writes_summary(tmp_path):
    import tensorflow as tf

    images = np.full((2, 16, 16, 3), 100.0, np.float32)

    def detect_fn(batch):
        return {
            "boxes": np.array([[[0.25, 0.25, 0.75, 0.75], [0, 0, 0, 0]]] * 2, np.float32),
            "scores": np.array([[0.9, 0.0]] * 2, np.float32),
            "classes": np.array([[0, -1]] * 2, np.int32),
            "num_detections": np.array([1, 1], np.int32),
        }

    logger = kcb.ImageLogger(tmp_path, images, detect_fn)
    drawn = logger.log_images(step=0)
    assert drawn.shape == (2, 16, 16, 3) and drawn.dtype == np.uint8
    assert (drawn[0, 4, 4:12, 0] == 255).all() and drawn[0, 8, 8, 0] == 100
    events = list((tmp_path / "images").glob("events.out.tfevents.*"))
    assert events
    values = [
        value
        for event in tf.compat.v1.train.summary_iterator(str(events[0]))
        for value in event.summary.value
        if value.tag == "detections"
    ]
    assert len(values) == 1
    strings = tf.make_ndarray(values[0].tensor)
    assert strings[0] == b"16" and strings[1] == b"16" and len(strings) == 4
    np.testing.assert_array_equal(tf.io.decode_png(strings[2]).numpy(), drawn[0])


# ---------------------------------------------------------------- with the real SSD
def test_ssd_weight_decay_and_stage_freezing():
    import kdet.models.ssd as ssd  # an import error must fail, not skip
    keras.utils.set_random_seed(0)
    model = ssd.SSD(3, image_size=(96, 80), width_multiplier=0.125)
    opt = optim.build_optimizer("sgd", 1e-3, model=model)
    decayed = optim.decayed_variables(opt, model.trainable_variables)
    assert decayed and all(v.name == "kernel" for v in decayed)  # no bias, no L2Normalization scale
    undecayed = set(map(id, model.trainable_variables)) - set(map(id, decayed))
    assert all(len(v.shape) == 1 for v in model.trainable_variables if id(v) in undecayed)

    backbone = {n for stage in model.backbone_stages for n in stage} | set(model.backbone_layer_names)
    backbone_vars = {v.path for n in backbone for v in model.get_layer(n).weights}
    freezing.freeze_backbone(model)
    trainable = {v.path for v in model.trainable_variables}
    assert trainable and not trainable & backbone_vars
    freezing.unfreeze_stages(model, 1)
    top = {v.path for n in model.backbone_stages[-1] for v in model.get_layer(n).weights}
    assert {v.path for v in model.trainable_variables} & backbone_vars == top
    freezing.unfreeze_all(model)
    assert backbone_vars <= {v.path for v in model.trainable_variables}


def test_recipe_clip_grad_norm_clips_the_global_norm():
    from kdet.engine import build_optimizer

    train = dict(optimizer="sgd", learning_rate=0.1, momentum=0.0, weight_decay=0.0, warmup_epochs=0,
                 lr_schedule="constant", clip_grad_norm=0.5)
    w = keras.Variable(np.array([2.0], "float32"), name="kernel")
    b = keras.Variable(np.array([2.0], "float32"), name="bias")
    build_optimizer(dict(train=train), model=None, steps_per_epoch=10).apply(
        [keras.ops.ones((1,)), keras.ops.ones((1,))], [w, b])
    # Global norm sqrt(2) -> 0.5: each gradient becomes 0.5 / sqrt(2).
    assert float(w.numpy()[0]) == pytest.approx(2.0 - 0.1 * 0.5 / np.sqrt(2), abs=1e-6)
    train["clip_grad_norm"] = None
    build_optimizer(dict(train=train), model=None, steps_per_epoch=10).apply(
        [keras.ops.ones((1,)), keras.ops.ones((1,))], [w, b])
    assert float(w.numpy()[0]) == pytest.approx(2.0 - 0.1 * 0.5 / np.sqrt(2) - 0.1, abs=1e-6)


def test_recipe_ema_momentum_leaves_the_weight_average_in_the_model_after_fit():
    from kdet.engine import build_optimizer

    train = dict(optimizer="sgd", learning_rate=0.1, momentum=0.0, weight_decay=0.0, warmup_epochs=0,
                 lr_schedule="constant", ema_momentum=0.5)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    model.compile(optimizer=build_optimizer(dict(train=train), model, steps_per_epoch=3), loss="mse")
    # Loss w^2 (x = 1, y = 0): gradient 2w, so SGD steps w to 0.8, 0.64, 0.512.
    model.fit(np.ones((3, 1), "float32"), np.zeros((3, 1), "float32"), batch_size=1, shuffle=False, verbose=0)
    # The average starts at the first step's weights: 0.8 -> 0.5 * 0.8 + 0.5 * 0.64 -> ... with 0.512.
    expected = 0.5 * (0.5 * 0.8 + 0.5 * 0.64) + 0.5 * 0.512
    assert float(model.get_weights()[0][0, 0]) == pytest.approx(expected, abs=1e-6)


def test_ema_warns_when_the_average_keeps_the_initial_weights():
    from kdet.engine import ema_start_weight_warning

    message = ema_start_weight_warning(0.998, 40, 12)  # 480 steps: 0.998 ** 480 = 38%
    assert "keeps 38% of the initial weights" in message and "at most 0.9938" in message
    assert ema_start_weight_warning(0.998, 300, 12) is None  # 3,600 steps: 0.07% left
    assert ema_start_weight_warning(None, 40, 12) is None and ema_start_weight_warning(0.998, "auto", 12) is None


def test_ema_warmup_ramps_the_momentum_from_zero_by_hand():
    from kdet.engine import build_optimizer
    from kdet.training.optim import AdamW

    train = dict(optimizer="sgd", learning_rate=0.1, momentum=0.0, weight_decay=0.0, warmup_epochs=0,
                 lr_schedule="constant", ema_momentum=0.5, ema_warmup_epochs=1)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    optimizer = build_optimizer(dict(train=train), model, steps_per_epoch=3)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(np.ones((3, 1), "float32"), np.zeros((3, 1), "float32"), batch_size=1, shuffle=False, verbose=0)
    # SGD steps w to 0.8, 0.64, 0.512; step t averages with momentum 0.5 * (1 - exp(-t / 3)), t = 0, 1, 2.
    m1, m2 = 0.5 * (1 - np.exp(-1 / 3)), 0.5 * (1 - np.exp(-2 / 3))
    expected = m2 * (m1 * 0.8 + (1 - m1) * 0.64) + (1 - m2) * 0.512
    assert float(model.get_weights()[0][0, 0]) == pytest.approx(expected, abs=1e-6)
    assert abs(expected - (0.5 * (0.5 * 0.8 + 0.5 * 0.64) + 0.5 * 0.512)) > 0.01  # differs from Keras' rule
    # the warm-up is part of the optimizer's config (a resumed run keeps it)
    assert keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)).ema_warmup_steps == 3.0
    adamw = build_optimizer(dict(train={**train, "optimizer": "adamw"}), model, steps_per_epoch=4)
    assert isinstance(adamw, AdamW) and adamw.ema_warmup_steps == 4.0
