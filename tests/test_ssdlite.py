"""SSDLite320 on keras-cv's MobileNetV3-Large (torchvision's ssdlite320_mobilenet_v3_large layout).

Checks against independent truth: torchvision's feature-map sizes at 320 and its anchor set (6 per cell,
DefaultBoxGenerator scales 0.2..0.95 with [2, 3] ratios, recomputed here by hand), separable heads;
then serialisation without custom_objects, freezing by stage, SavedModel export and a few training steps.
"""

import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("keras_cv")

from kdet.models.backbones import WeightsDownloadError  # noqa: E402
from kdet.models.ssd import SSD  # noqa: E402
from kdet.training import freezing  # noqa: E402

BACKBONE = "mobilenetv3_large_ssdlite"


def torchvision_anchors(sizes, min_ratio=0.2, max_ratio=0.95):
    """torchvision DefaultBoxGenerator([[2, 3]] * 6) boxes, normalised xyxy, clipped, cell-major."""
    m = len(sizes)
    scales = [min_ratio + (max_ratio - min_ratio) * k / (m - 1) for k in range(m)] + [1.0]
    boxes = []
    for k, (h, w) in enumerate(sizes):
        s, s_next = scales[k], scales[k + 1]
        shapes = [(s, s), (math.sqrt(s * s_next),) * 2]
        for r in (2, 3):
            shapes += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
        for i, j in itertools.product(range(h), range(w)):
            cx, cy = (j + 0.5) / w, (i + 0.5) / h
            boxes += [[cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2] for bw, bh in shapes]
    return np.clip(np.array(boxes), 0, 1)


@pytest.fixture(scope="module")
def small():
    return SSD(num_classes=3, image_size=96, backbone=BACKBONE, width_multiplier=0.5)


def test_ssdlite320_maps_anchors_and_separable_heads():
    model = SSD(num_classes=90, image_size=320, backbone=BACKBONE)
    assert model.feature_map_sizes == [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    np.testing.assert_allclose(model.anchors, torchvision_anchors(model.feature_map_sizes), atol=1e-6)
    assert model.anchors.shape == (3234, 4)
    assert model.get_layer("ssdlite_extra1_expand").output.shape[-1] == 512
    c4 = model.get_layer("expanded_conv_12_expand").output.shape
    assert c4[1:] == (20, 20, 672)
    assert isinstance(model.get_layer("class_head_0_depthwise"), keras.layers.DepthwiseConv2D)
    assert model.get_layer("class_head_0").kernel.shape == (1, 1, 672, 6 * 91)
    with_weights = {layer.name for layer in model.layers if layer.weights}
    assert with_weights == set(model.backbone_layer_names) | set(model.new_layer_names)
    in_stages = [name for stage in model.backbone_stages for name in stage]
    assert len(in_stages) == len(set(in_stages)) and set(model.backbone_layer_names) <= set(in_stages)
    se_of_block_12 = [n for n in model.backbone_stages[4] if "squeeze" in n or "excite" in n]
    assert se_of_block_12, "the squeeze-excite layers of the last stage belong to it"


def test_save_reload_without_custom_objects_and_export(small, tmp_path):
    from kdet.cli import load_keras_model
    from kdet.export import export_saved_model

    images = np.random.RandomState(0).randint(0, 256, (2, 96, 96, 3)).astype("float32")
    path = str(tmp_path / "ssdlite.keras")
    small.save(path)
    for reloaded in (keras.models.load_model(path), load_keras_model(path)):
        assert isinstance(reloaded, SSD) and reloaded.get_config() == small.get_config()
        np.testing.assert_array_equal(reloaded(images).numpy(), small(images).numpy())
    export_dir = export_saved_model(small, str(tmp_path / "saved"), ["a", "b", "c"], score_threshold=0.0)
    served = tf.saved_model.load(export_dir).signatures["serving_default"](tf.constant(images.astype(np.uint8)))
    want = small.detect(images.astype(np.uint8), score_threshold=0.0)
    np.testing.assert_allclose(served["detection_scores"].numpy(), want["scores"].numpy(), atol=1e-5)


def test_freeze_by_stage_and_train_a_few_steps():
    model = SSD(num_classes=2, image_size=64, backbone=BACKBONE, width_multiplier=0.35)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    rng = np.random.RandomState(1)
    x = rng.randint(0, 256, (4, 64, 64, 3)).astype("float32")
    y = np.tile(np.array([[[0.1, 0.1, 0.6, 0.7, 0, 0], [0.5, 0.4, 0.9, 0.9, 1, 0]]], np.float32), (4, 1, 1))
    freezing.set_trainable_stages(model, 1)
    top = set(model.backbone_stages[-1])
    first = model.get_layer("Conv").kernel.numpy().copy()
    last = model.get_layer("Conv_1").kernel.numpy().copy()
    history = model.fit(x, y, batch_size=4, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    np.testing.assert_array_equal(model.get_layer("Conv").kernel.numpy(), first)  # stem frozen
    assert not np.array_equal(model.get_layer("Conv_1").kernel.numpy(), last)  # top stage trained
    assert "Conv_1" in top
    assert all(model.get_layer(n).trainable for n in top)
    assert not any(model.get_layer(n).trainable for n in model.backbone_stages[0])


def test_imagenet_offline_error_and_width(monkeypatch):
    import keras_cv

    def offline(*args, **kwargs):
        raise OSError("Kaggle download failed: no network")

    monkeypatch.setattr(keras_cv.models.MobileNetV3Backbone, "from_preset", offline)
    with pytest.raises(WeightsDownloadError, match=r"could not download ImageNet weights for MobileNetV3-Large "
                       r".*mobilenet_v3_large_imagenet.*use backbone_weights=None"):
        SSD(2, image_size=64, backbone=BACKBONE, backbone_weights="imagenet")
    with pytest.raises(ValueError, match="width_multiplier=1.0"):
        SSD(2, image_size=64, backbone=BACKBONE, width_multiplier=0.5, backbone_weights="imagenet")
