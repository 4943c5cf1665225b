"""FPN SSD on keras-cv's ResNet50V2, CSPDarkNet-Tiny and EfficientNetV2-B0 (their pyramid_level_inputs).

Checks against independent truth: the constructor arguments give keras-cv's preset architectures (the parameter
counts its preset table lists), the FPN laterals read the layers keras-cv names as P3..P5, the maps and anchors
are SSD's; then, per backbone at 72 px and a small width, stage freezing and unfreezing while training (through
GradualUnfreezing), save and reload without custom_objects; a weight file (CSPDarkNet) and a SavedModel export
(ResNet50V2) for one backbone each, as they cost seconds.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

keras_cv = pytest.importorskip("keras_cv")

from kdet.models import backbones  # noqa: E402
from kdet.models.anchors import default_boxes, ssd_scales  # noqa: E402
from kdet.models.backbones import WeightsDownloadError, WeightsFileError  # noqa: E402
from kdet.models.ssd import SSD  # noqa: E402
from kdet.training import freezing  # noqa: E402

# backbone: (width used here, keras-cv's P3, P4, P5 layers, a stem layer, a top-stage layer)
CASES = {
    "resnet50v2_fpn": (0.125, ("v2_stack_1_block4_out", "v2_stack_2_block6_out", "v2_stack_3_block3_out"),
                       "conv1_conv", "v2_stack_3_block3_3_conv"),
    "cspdarknet_tiny_fpn": (0.25, ("dark3_csp", "dark4_csp", "dark5_csp"), "stem_conv", "dark5_csp"),
    "efficientnetv2_b0_fpn": (0.25, ("block3b_", "block5e_", "top_activation"), "stem_conv", "top_conv"),
}
PRESETS = {"resnet50v2_fpn": ("ResNetV2Backbone", "resnet50_v2_imagenet"),
           "cspdarknet_tiny_fpn": ("CSPDarkNetBackbone", "csp_darknet_tiny_imagenet"),
           "efficientnetv2_b0_fpn": ("EfficientNetV2Backbone", "efficientnetv2_b0_imagenet")}
WEIGHT_FILE_CASE, EXPORT_CASE = "cspdarknet_tiny_fpn", "resnet50v2_fpn"  # export: ResNet50V2's is the cheapest
SIZE = 72  # odd maps (9, 5, 3): the top-down path crops
MAPS = [(9, 9), (5, 5), (3, 3), (2, 2), (1, 1)]


@pytest.mark.parametrize("backbone", sorted(PRESETS))
def test_arguments_give_keras_cv_preset_architecture(backbone):
    class_name, preset = PRESETS[backbone]
    spec = backbones._KERASCV_FPN_TRUNKS[backbone[: -len("_fpn")]]
    backbone_class = getattr(keras_cv.models, class_name)
    trunk = backbone_class(include_rescaling=True, **spec.arguments)
    assert trunk.count_params() == backbone_class.presets[preset]["metadata"]["params"]


def _weights(layers):
    return [w.numpy().copy() for layer in layers for w in layer.weights]


class _Snapshot(keras.callbacks.Callback):
    def __init__(self, names):
        super().__init__()
        self.names, self.after_first_epoch = names, None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.after_first_epoch = {n: _weights([self.model.get_layer(n)]) for n in self.names}


def _trunk_weight_file(backbone, width, tmp_path):
    """A keras-cv trunk at kdet's arguments for ``width``, and the ``model.weights.h5`` its save_weights wrote."""
    spec = backbones._KERASCV_FPN_TRUNKS[backbone[: -len("_fpn")]]
    trunk = getattr(keras_cv.models, spec.backbone_class)(include_rescaling=True, **spec.widen(spec.arguments, width))
    path = str(tmp_path / "model.weights.h5")
    trunk.save_weights(path)
    return trunk, path


def _check_export(model, tmp_path):
    from kdet.export import export_saved_model

    images = np.random.RandomState(1).randint(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
    export_dir = export_saved_model(model, str(tmp_path / "saved"), ["a", "b"], score_threshold=0.0)
    served = tf.saved_model.load(export_dir).signatures["serving_default"](tf.constant(images))
    want = model.detect(images, score_threshold=0.0)
    np.testing.assert_allclose(served["detection_scores"].numpy(), want["scores"].numpy(), atol=1e-5)


@pytest.mark.parametrize("backbone", sorted(CASES))
def test_build_freeze_unfreeze_train_save_reload(backbone, tmp_path):
    """Each backbone; CSPDarkNet also starts from a weight file, ResNet50V2 also exports (each costs seconds)."""
    width, taps, stem, top = CASES[backbone]
    trunk, weights = _trunk_weight_file(backbone, width, tmp_path) if backbone == WEIGHT_FILE_CASE else (None, None)
    model = SSD(num_classes=2, image_size=SIZE, backbone=backbone, width_multiplier=width, fpn_channels=16,
                backbone_weights=weights)
    if trunk is not None:  # the file's weights are in kdet's trunk; a file of another width fails in one line
        for name in (stem, "dark3_csp", "dark5_spp_conv2"):
            for got, want in zip(_weights([model.get_layer(name)]), _weights([trunk.get_layer(name)])):
                np.testing.assert_array_equal(got, want)
        with pytest.raises(WeightsFileError, match=r"model\.weights\.h5: does not fit the CSPDarkNet-Tiny backbone"):
            SSD(num_classes=2, image_size=SIZE, backbone=backbone, width_multiplier=0.5, backbone_weights=weights)
    # the neck reads keras-cv's pyramid levels; SSD's maps and anchors on P3..P7
    for level, name in zip((3, 4, 5), taps):
        assert model.get_layer(f"fpn_lateral_c{level}").input is model.get_layer(name).output
    assert model.feature_map_sizes == MAPS
    # stages: 5, disjoint, every backbone layer with weights in one; the stem first, the top stage last
    stages = model.backbone_stages
    in_stages = [name for stage in stages for name in stage]
    assert len(stages) == 5 and len(in_stages) == len(set(in_stages))
    assert {layer.name for layer in model.layers if layer.weights} == set(model.backbone_layer_names) | set(
        model.new_layer_names)
    assert set(model.backbone_layer_names) <= set(in_stages) and not set(in_stages) & set(model.new_layer_names)
    assert stem in stages[0] and top in stages[4] and taps[0] in stages[2] and taps[1] in stages[3]

    # epoch 1: only the top stage (and the new layers) train; epoch 2: all of the backbone. Eager steps: tracing
    # these deep train steps costs 8-25 s of CPU each (twice: unfreezing re-traces), an eager step 1-4 s.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    x = np.random.RandomState(0).randint(0, 256, (2, SIZE, SIZE, 3)).astype("float32")
    y = np.array([[[0.1, 0.1, 0.6, 0.7, 0, 0], [0.5, 0.4, 0.9, 0.9, 1, 0]]] * 2, np.float32)
    frozen = [name for stage in stages[:4] for name in stage]
    snapshot = _Snapshot(frozen + [top])
    before = {n: _weights([model.get_layer(n)]) for n in snapshot.names}
    unfreezing = freezing.GradualUnfreezing({0: 1, 1: "all"}, verbose=0)
    history = model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[unfreezing, snapshot])
    assert np.all(np.isfinite(history.history["loss"])) and history.history["trainable_stages"] == [1, 5]
    for name in frozen:  # stages 1-4 frozen in epoch 1: weights and BatchNorm statistics stay
        for got, want in zip(snapshot.after_first_epoch[name], before[name]):
            np.testing.assert_array_equal(got, want)
    assert not np.array_equal(snapshot.after_first_epoch[top][0], before[top][0])
    assert not np.array_equal(model.get_layer(stem).weights[0].numpy(), before[stem][0])  # unfrozen in epoch 2

    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path, compile=False)  # uncompiled: a cheaper load and export
    assert isinstance(reloaded, SSD) and reloaded.get_config() == model.get_config()
    out = model(x).numpy()
    np.testing.assert_array_equal(reloaded(x).numpy(), out)
    np.testing.assert_allclose(out[0, :, -4:], default_boxes(MAPS, ssd_scales(5), [[2], [2, 3], [2, 3], [2], [2]]))
    if backbone == EXPORT_CASE:
        _check_export(reloaded, tmp_path)


@pytest.mark.parametrize("backbone", sorted(PRESETS))
def test_imagenet_offline_error_width_and_size(backbone, monkeypatch):
    class_name, preset = PRESETS[backbone]

    def offline(*args, **kwargs):
        raise OSError("Kaggle download failed: no network")

    monkeypatch.setattr(getattr(keras_cv.models, class_name), "from_preset", offline)
    label = backbones._KERASCV_FPN_TRUNKS[backbone[: -len("_fpn")]].label
    with pytest.raises(WeightsDownloadError, match=rf"could not download ImageNet weights for {label} .*"
                       rf"{preset}.*use backbone_weights=None"):
        SSD(2, image_size=64, backbone=backbone, backbone_weights="imagenet")
    with pytest.raises(ValueError, match="width_multiplier=1.0"):
        SSD(2, image_size=64, backbone=backbone, width_multiplier=0.5, backbone_weights="imagenet")
    if backbone == "cspdarknet_tiny_fpn":
        with pytest.raises(ValueError, match="image_size must be even"):
            SSD(2, image_size=(64, 63), backbone=backbone)
