"""The FPN-family necks (kdet.models.necks): FPN's top-down path and YOLOv8's PAN.

Independent truth: what each neck's graph lets reach what. In FPN information only flows
top-down, so P5 cannot see C3; PAN's bottom-up path makes P5 depend on C3. Both give the
same map sizes (odd ones included) and channels, so SSD's anchors are unchanged; the PAN
model saves and reloads to the same outputs; a neck on a backbone without C3..C5 is refused.
"""

import keras
import numpy as np
import pytest

from kdet.analysis.anchors import model_anchor_setup
from kdet.config import RecipeError
from kdet.defaults import default_recipe
from kdet.engine import build_model
from kdet.models.necks import build_neck
from kdet.models.ssd import SSD

SIZES = {3: 9, 4: 5, 5: 3}  # a 72-px input's C3, C4, C5 (odd: the paths crop)


def _neck_model(neck, channels=16):
    inputs = [keras.Input((SIZES[i], SIZES[i], 8 * i), name=f"c{i}") for i in (3, 4, 5)]
    return keras.Model(inputs, build_neck(neck, *inputs, channels))


def _levels(seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, SIZES[i], SIZES[i], 8 * i)).astype("float32") for i in (3, 4, 5)]


@pytest.mark.parametrize("neck", ["fpn", "pan"])
def test_neck_map_sizes_and_channels(neck):
    outputs = _neck_model(neck)(_levels(0))
    assert [tuple(o.shape) for o in outputs] == [(1, 9, 9, 16), (1, 5, 5, 16), (1, 3, 3, 16), (1, 2, 2, 16),
                                                 (1, 1, 1, 16)]


@pytest.mark.parametrize("neck, p5_sees_c3", [("fpn", False), ("pan", True)])
def test_bottom_up_path_reaches_p5_only_in_pan(neck, p5_sees_c3):
    model = _neck_model(neck)
    c3, c4, c5 = _levels(1)
    changed_c3 = c3 + np.random.default_rng(2).normal(size=c3.shape).astype("float32")
    before = [keras.ops.convert_to_numpy(o) for o in model([c3, c4, c5])]
    after = [keras.ops.convert_to_numpy(o) for o in model([changed_c3, c4, c5])]
    assert not np.allclose(before[0], after[0])  # P3 reads C3 in both
    assert (not np.allclose(before[2], after[2])) == p5_sees_c3
    changed_c5 = [c3, c4, c5 + 1.0]
    assert not np.allclose(before[0], keras.ops.convert_to_numpy(model(changed_c5)[0]))  # top-down in both


def test_pan_neck_has_batchnorm_and_silu_and_its_layers_are_new():
    model = SSD(2, image_size=72, backbone="mobilenetv2_fpn", width_multiplier=0.35, fpn_channels=32, neck="pan")
    assert model.feature_map_sizes == [(9, 9), (5, 5), (3, 3), (2, 2), (1, 1)]
    pan_layers = [layer for layer in model.layers if layer.name.startswith("pan_")]
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in pan_layers)
    assert any(getattr(layer, "activation", None) is keras.activations.silu for layer in pan_layers)
    with_weights = {layer.name for layer in pan_layers if layer.weights}
    assert with_weights and with_weights <= set(model.new_layer_names)
    in_stages = {name for stage in model.backbone_stages for name in stage}
    assert not with_weights & in_stages  # freezing the trunk never freezes the neck
    assert not any(layer.name.startswith("fpn_") for layer in model.layers)


def test_pan_model_saves_and_reloads_to_the_same_outputs(tmp_path):
    model = SSD(2, image_size=72, backbone="mobilenetv2_fpn", width_multiplier=0.35, fpn_channels=32, neck="pan")
    path = tmp_path / "pan.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    images = np.random.default_rng(3).uniform(0, 255, (2, 72, 72, 3)).astype("float32")
    assert reloaded.neck == "pan"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(images)),
                               keras.ops.convert_to_numpy(model(images)), atol=1e-5)


@pytest.mark.parametrize("model_section, message", [
    (dict(backbone="vgg16_bn", neck="pan"), "neck='pan' is built for the *_fpn backbones, not 'vgg16_bn'"),
    (dict(backbone="mobilenetv2_fpn", neck="bifpn"), "unknown neck 'bifpn'"),
])
def test_a_neck_ssd_cannot_build_is_a_recipe_error_at_each_first_build(model_section, message):
    recipe = default_recipe()
    recipe["model"].update(image_size=72, width_multiplier=0.35, backbone_weights=None, **model_section)
    with pytest.raises(RecipeError, match="bad model section") as err:
        model_anchor_setup(recipe["model"], 2)  # the pre-flight's build
    assert message in str(err.value)
    with pytest.raises(RecipeError, match="bad model section") as err:
        build_model(recipe, ["a", "b"])         # the engine's
    assert message in str(err.value)
