"""tf.distribute: MirroredStrategy on two logical CPUs matches single-device training."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from kdet.training import strategy as kstrategy

REPO = Path(__file__).resolve().parents[1]

# Logical CPUs must be configured before TensorFlow initialises: fresh process.
PARITY_SCRIPT = r"""
import json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from kdet.training import optim, strategy as ks

def build():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x))

rng = np.random.default_rng(0)
x = rng.random((32, 8, 8, 3)).astype("float32")
y = rng.random((32, 4)).astype("float32")
keras.utils.set_random_seed(0)
initial = build().get_weights()

def run(strategy, batch):
    with strategy.scope():
        model = build()
        model.set_weights(initial)
        opt = optim.build_optimizer("sgd", 0.1, momentum=0.9, weight_decay=1e-2, model=model)
        model.compile(optimizer=opt, loss="mse")
    ds = ks.distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch), strategy)
    history = model.fit(ds, epochs=3, verbose=0)
    return history.history["loss"], [w.tolist() for w in model.get_weights()]

mirrored = ks.make_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
batch = ks.global_batch_size(8, mirrored)
m_losses, m_weights = run(mirrored, batch)
s_losses, s_weights = run(ks.make_strategy("default"), batch)  # same global batch, one device
print("RESULT " + json.dumps(dict(
    replicas=mirrored.num_replicas_in_sync, global_batch=batch,
    mirrored_losses=m_losses, mirrored_weights=m_weights,
    single_losses=s_losses, single_weights=s_weights,
)))
"""


@pytest.fixture(scope="module")
def parity():
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    script = PARITY_SCRIPT
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_two_replicas_and_global_batch(parity):
    assert parity["replicas"] == 2
    assert parity["global_batch"] == 16


def test_mirrored_matches_single_device(parity):
    m, s = parity["mirrored_losses"], parity["single_losses"]
    assert len(m) == 3 and s[-1] < s[0]  # it trained
    assert m == pytest.approx(s, rel=1e-5)
    for mw, sw in zip(parity["mirrored_weights"], parity["single_weights"]):
        assert np.allclose(mw, sw, rtol=1e-5, atol=1e-6)


def test_strategy_errors_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="expected one of"):
        kstrategy.make_strategy("horovod")
    with pytest.raises(ValueError, match="do not exist"):
        kstrategy.make_strategy("mirrored", devices=["/gpu:7"])
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="TF_CONFIG"):
        kstrategy.make_strategy("multiworker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        kstrategy.make_strategy("multiworker")
    with pytest.raises(RuntimeError, match="No TPU"):
        kstrategy.make_strategy("tpu")


def test_default_strategy_and_shard_policy():
    import tensorflow as tf

    default = kstrategy.make_strategy()
    assert default.num_replicas_in_sync == 1
    assert kstrategy.global_batch_size(8, default) == 8
    ds = kstrategy.distribute_dataset(tf.data.Dataset.range(4), default)
    policy = ds.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA
