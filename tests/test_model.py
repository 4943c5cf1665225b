"""SSD model: shapes, anchors in the output, L2Normalization, save/load, FPN, weights."""

import keras
import numpy as np
import pytest
from keras.src.utils import file_utils

from kdet.models.anchors import SSD300_ASPECT_RATIOS, default_boxes, ssd_scales
from kdet.models.backbones import WeightsDownloadError, vgg16_feature_map_sizes
from kdet.models.layers import ImagePreprocessing, L2Normalization
from kdet.models.ssd import SSD

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def small_ssd():
    keras.utils.set_random_seed(0)
    return SSD(NUM_CLASSES, image_size=(96, 80), width_multiplier=0.125)


def _images(batch, height, width, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, height, width, 3)).astype("float32")


def test_ssd300_feature_maps_and_8732_anchors():
    model = SSD(NUM_CLASSES, image_size=300, width_multiplier=0.125)
    assert model.feature_map_sizes == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    assert model.anchors.shape == (8732, 4)
    assert model.anchors_per_level == [38 * 38 * 4, 19 * 19 * 6, 10 * 10 * 6, 5 * 5 * 6, 3 * 3 * 4, 4]
    assert model.output_shape == (None, 8732, 4 + 1 + NUM_CLASSES + 4)
    np.testing.assert_allclose(
        model.anchors, default_boxes([38, 19, 10, 5, 3, 1], ssd_scales(), SSD300_ASPECT_RATIOS))


def test_small_model_output_and_anchors(small_ssd):
    sizes = vgg16_feature_map_sizes((96, 80))
    assert small_ssd.feature_map_sizes == sizes
    # 96 -> 48, 24, 12 (ceil pool3), 6, 3, 2, then conv10/11 shrink to 1; 80 -> 40, 20, 10, 5, 3, 2, 1, 1
    assert sizes == [(12, 10), (6, 5), (3, 3), (2, 2), (1, 1), (1, 1)]
    expected = default_boxes(sizes, ssd_scales(), SSD300_ASPECT_RATIOS)
    out = keras.ops.convert_to_numpy(small_ssd(_images(2, 96, 80)))
    assert out.shape == (2, len(expected), 4 + 1 + NUM_CLASSES + 4)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, -4:], expected)
    np.testing.assert_allclose(out[1, :, -4:], expected)
    np.testing.assert_allclose(small_ssd.anchors, expected)
    assert small_ssd.num_classes == NUM_CLASSES


def test_too_small_input_raises_clearly():
    with pytest.raises(ValueError, match="too small"):
        SSD(NUM_CLASSES, image_size=8, width_multiplier=0.125)


def test_l2_normalization_initial_scale_and_learnable():
    layer = L2Normalization(20.0)
    x = np.array([[[[3.0, 4.0]]]], "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), [[[[12.0, 16.0]]]], rtol=1e-6)
    assert layer.trainable_weights and np.allclose(layer.gamma.numpy(), 20.0)
    layer.gamma.assign([1.0, 2.0])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), [[[[0.6, 1.6]]]], rtol=1e-6)


def test_l2_normalization_in_model_and_gets_gradients(small_ssd):
    import tensorflow as tf

    norm = small_ssd.get_layer("conv4_3_norm")
    assert isinstance(norm, L2Normalization)
    assert np.allclose(norm.gamma.numpy(), 20.0) and norm.gamma.trainable
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(small_ssd(_images(1, 96, 80))[..., :4 + 1 + NUM_CLASSES])
    grad = tape.gradient(loss, norm.gamma)
    assert grad is not None and np.any(grad.numpy() != 0)


def test_caffe_preprocessing_is_bgr_minus_mean():
    out = ImagePreprocessing("caffe")(np.array([[[[10.0, 20.0, 30.0]]]], "float32"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out),
                               [[[[30 - 103.939, 20 - 116.779, 10 - 123.68]]]], rtol=1e-6)
    out = ImagePreprocessing("tf")(np.array([[[[0.0, 127.5, 255.0]]]], "float32"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), [[[[-1.0, 0.0, 1.0]]]], atol=1e-6)


def test_save_and_load_without_custom_objects(small_ssd, tmp_path):
    path = tmp_path / "ssd.keras"
    small_ssd.save(path)
    reloaded = keras.models.load_model(path)
    assert isinstance(reloaded, SSD)
    images = _images(2, 96, 80, seed=1)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(reloaded(images)),
                                  keras.ops.convert_to_numpy(small_ssd(images)))
    assert reloaded.get_config() == small_ssd.get_config()
    assert reloaded.backbone_stages == small_ssd.backbone_stages


def test_config_never_downloads_weights(small_ssd):
    config = small_ssd.get_config()
    assert config["backbone_weights"] is None
    assert config["num_classes"] == NUM_CLASSES and config["image_size"] == [96, 80]


def test_vgg_stages_cover_backbone_layers(small_ssd):
    stages = small_ssd.backbone_stages
    assert [stage[0] for stage in stages] == [
        "block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1", "fc6"]
    in_stages = {name for stage in stages for name in stage}
    assert set(small_ssd.backbone_layer_names) <= in_stages
    assert "block4_conv3" in small_ssd.backbone_layer_names
    assert {"conv8_2", "conv4_3_norm", "box_head_0", "class_head_5"} <= set(small_ssd.new_layer_names)
    with_weights = {layer.name for layer in small_ssd.layers if layer.weights}
    assert with_weights == set(small_ssd.backbone_layer_names) | set(small_ssd.new_layer_names)
    assert not set(small_ssd.backbone_layer_names) & set(small_ssd.new_layer_names)


@pytest.mark.parametrize("backbone, width, size, maps", [
    ("resnet50_fpn", 1.0, 64, [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]),
    # odd sizes: 72 -> C3 9, C4 5, C5 3 (the top-down path crops 6 -> 5 and 10 -> 9)
    ("mobilenetv2_fpn", 0.35, 72, [(9, 9), (5, 5), (3, 3), (2, 2), (1, 1)]),
])
def test_fpn_models_build_and_run(backbone, width, size, maps):
    model = SSD(2, image_size=size, backbone=backbone, width_multiplier=width, fpn_channels=32)
    assert model.feature_map_sizes == maps
    out = keras.ops.convert_to_numpy(model(_images(1, size, size)))
    expected = default_boxes(maps, ssd_scales(5), [[2], [2, 3], [2, 3], [2], [2]])
    assert out.shape == (1, len(expected), 4 + 3 + 4)
    np.testing.assert_allclose(out[0, :, -4:], expected)
    assert np.all(np.isfinite(out))
    assert len(model.backbone_stages) == 5
    in_stages = {name for stage in model.backbone_stages for name in stage}
    trunk_with_weights = {layer.name for layer in model.layers
                          if layer.weights and not layer.name.startswith(("fpn_", "box_", "class_"))}
    assert trunk_with_weights == set(model.backbone_layer_names)
    assert set(model.backbone_layer_names) <= in_stages
    assert {"fpn_p7", "fpn_lateral_c3"} <= set(model.new_layer_names)


def test_imagenet_weights_offline_raise_clear_message(monkeypatch):
    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", no_network)
    with pytest.raises(WeightsDownloadError, match=r"could not download ImageNet weights for "
                       r"VGG16 \(no internet\?\).*use backbone_weights=None"):
        SSD(2, image_size=32, backbone_weights="imagenet")


def test_imagenet_weights_need_full_width():
    with pytest.raises(ValueError, match="width_multiplier=1.0"):
        SSD(2, image_size=32, width_multiplier=0.5, backbone_weights="imagenet")


def test_unknown_backbone_and_bad_anchor_lists_raise():
    with pytest.raises(ValueError, match="unknown backbone"):
        SSD(2, image_size=64, backbone="vgg19")
    with pytest.raises(ValueError, match="aspect_ratios"):
        SSD(2, image_size=64, width_multiplier=0.125, aspect_ratios=[[2]] * 5)
    with pytest.raises(ValueError, match="anchor_scales"):
        SSD(2, image_size=64, width_multiplier=0.125, anchor_scales=[0.1, 0.5])


def test_imagenet_weights_are_copied_by_layer_name(monkeypatch, tmp_path):
    # Stand-in for the download: a weights file of keras.applications' own VGG16.
    reference = keras.applications.VGG16(include_top=False, weights=None)
    path = str(tmp_path / "imagenet.weights.h5")
    reference.save_weights(path)
    monkeypatch.setattr(file_utils, "get_file", lambda *args, **kwargs: path)

    model = SSD(2, image_size=32, backbone_weights="imagenet")
    for name in ("block1_conv1", "block4_conv3", "block5_conv3"):
        for got, want in zip(model.get_layer(name).get_weights(),
                             reference.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)
    assert model.get_config()["backbone_weights"] is None


def test_vgg16_bn_variant_for_training_from_scratch(tmp_path):
    model = SSD(num_classes=2, image_size=64, backbone="vgg16_bn", width_multiplier=0.125)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 23  # 13 VGG convs + fc6 + fc7 + 8 extra-layer convs
    staged = {name for stage in model.backbone_stages for name in stage}
    backbone_norms = {n.name for n in norms if n.name.startswith(("block", "fc"))}
    assert len(backbone_norms) == 15 and backbone_norms <= staged  # frozen with their convs
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    path = tmp_path / "bn.keras"
    model.save(path)
    np.testing.assert_allclose(keras.models.load_model(path)(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="no ImageNet weights for the batch-norm variant"):
        SSD(num_classes=2, image_size=64, backbone="vgg16_bn", backbone_weights="imagenet")


def test_fine_map_adds_a_stride4_source_fed_by_conv4_3(tmp_path):
    keras.utils.set_random_seed(0)
    model = SSD(NUM_CLASSES, image_size=96, backbone="vgg16_bn", width_multiplier=0.125, fine_map=True)
    sizes = [(24, 24)] + vgg16_feature_map_sizes(96)  # conv3_3's stride 4, then the usual six maps
    assert model.feature_map_sizes == sizes
    np.testing.assert_allclose(model.anchors, default_boxes(sizes, [0.05] + ssd_scales(), [[2]] + SSD300_ASPECT_RATIOS))
    assert model.anchors_per_level[0] == 24 * 24 * 4
    # One FPN top-down step: the fine source sees conv4_3 (a change there reaches the stride-4 boxes).
    fine_source = model.get_layer("fine_norm").output
    probe = keras.Model(model.inputs, fine_source)
    images = _images(1, 96, 96)
    before = keras.ops.convert_to_numpy(probe(images))
    conv4_3 = model.get_layer("block4_conv3")
    kernel, = conv4_3.get_weights()
    conv4_3.set_weights([kernel * 2.0])
    assert not np.allclose(keras.ops.convert_to_numpy(probe(images)), before)
    conv4_3.set_weights([kernel])
    # Its layers are new (never frozen with the pretrained stages) and survive a save and reload.
    fine_layers = {"fine_lateral", "fine_lateral_bn", "fine_conv", "fine_conv_bn", "fine_norm"}
    assert fine_layers <= set(model.new_layer_names)
    assert not fine_layers & {name for stage in model.backbone_stages for name in stage}
    path = tmp_path / "fine.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert reloaded.get_config()["fine_map"] is True
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(images)),
                               keras.ops.convert_to_numpy(model(images)), atol=1e-5)


def test_fine_map_is_refused_on_other_backbones():
    with pytest.raises(ValueError, match="fine_map=True .* 'vgg16' and 'vgg16_bn', not 'mobilenetv2_fpn'"):
        SSD(NUM_CLASSES, image_size=64, backbone="mobilenetv2_fpn", width_multiplier=0.35, fine_map=True)


def _tower_parameters(channels, convs):
    """Hand count of one head's towers: per map and conv, a 3x3 kernel without bias plus BN's 4 vectors."""
    return sum(convs * (9 * c * c + 4 * c) for c in channels)


def test_head_convs_put_conv_bn_silu_towers_before_both_predictors(tmp_path):
    arguments = dict(image_size=72, backbone="mobilenetv2_fpn", width_multiplier=0.35, fpn_channels=32, neck="pan")
    plain = SSD(NUM_CLASSES, **arguments)
    towered = SSD(NUM_CLASSES, head_convs=2, **arguments)
    assert towered.output_shape == plain.output_shape
    np.testing.assert_array_equal(towered.anchors, plain.anchors)
    source_channels = [int(plain.get_layer(f"box_head_{k}").input.shape[-1])
                       for k in range(len(plain.feature_map_sizes))]
    assert towered.count_params() - plain.count_params() == 2 * _tower_parameters(source_channels, 2)
    for head in ("box_head", "class_head"):
        for k in range(len(source_channels)):
            predictor_input = towered.get_layer(f"{head}_{k}").input
            assert predictor_input is towered.get_layer(f"{head}_{k}_tower1_silu").output
            assert towered.get_layer(f"{head}_{k}_tower1_silu").activation is keras.activations.silu
    towers = {layer.name for layer in towered.layers if "_tower" in layer.name and layer.weights}
    assert towers <= set(towered.new_layer_names)
    path = tmp_path / "towered.keras"
    towered.save(path)
    reloaded = keras.models.load_model(path)
    assert reloaded.head_convs == 2
    images = _images(2, 72, 72, seed=4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(images)),
                               keras.ops.convert_to_numpy(towered(images)), atol=1e-5)


def test_head_convs_refused_on_separable_heads_and_below_zero():
    with pytest.raises(ValueError, match="head_convs must be >= 0, got -1"):
        SSD(NUM_CLASSES, image_size=64, width_multiplier=0.125, head_convs=-1)
    with pytest.raises(ValueError, match="not 'mobilenetv3_large_ssdlite'.s separable heads"):
        SSD(NUM_CLASSES, image_size=96, backbone="mobilenetv3_large_ssdlite", width_multiplier=0.5, head_convs=1)
