"""Transfer learning offline: keras.applications weight files as model.backbone_weights, and
model.init_from (start from an earlier kdet model: matching layers load, the rest start anew)."""

import re
import zipfile

import h5py
import keras
import numpy as np
import pytest

from kdet.config import RecipeError
from kdet.engine import build_model
from kdet.models.backbones import WeightsFileError
from kdet.models.ssd import SSD
from kdet.models.transfer import InitFromError, init_from_checkpoint

VGG16_NOTOP = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
VGG16_CONVS = [(f"block{b}_conv{i}", cin if i == 1 else cout, cout)
               for b, (cin, cout, n) in enumerate([(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3),
                                                   (512, 512, 3)], start=1) for i in range(1, n + 1)]
TINY = dict(image_size=64, backbone="vgg16_bn", width_multiplier=0.125)


# ------------------------------------------------------------------ keras.applications weight files
def write_keras2_h5(path, layers):
    """A weight file laid out as keras.applications' downloads (Keras 2 ``save_weights``, H5).

    ``layers``: ``[(name, [arrays])]``; layers without weights (input, pooling) are listed too.
    """
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [name.encode() for name, _ in layers]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for name, arrays in layers:
            group = f.create_group(name)
            weight_names = [f"{name}/{kind}:0".encode() for kind in ("kernel", "bias")[:len(arrays)]]
            group.attrs["weight_names"] = weight_names
            for weight_name, array in zip(weight_names, arrays):
                group.create_dataset(weight_name.decode(), data=array)


def vgg16_notop_layers(seed=0):
    """Random VGG16 conv weights in the notop file's layer order (with its pooling layers)."""
    rng = np.random.default_rng(seed)
    layers = [("input_1", [])]
    for name, cin, cout in VGG16_CONVS:
        layers.append((name, [rng.normal(0, 0.05, (3, 3, cin, cout)).astype("float32"),
                              rng.normal(0, 0.05, cout).astype("float32")]))
        if name.endswith(("1_conv2", "2_conv2", "3_conv3", "4_conv3", "5_conv3")):
            layers.append((name.split("_")[0] + "_pool", []))
    return layers


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / VGG16_NOTOP
    layers = vgg16_notop_layers()
    write_keras2_h5(path, layers)
    return str(path), dict(layers)


def test_vgg16_notop_file_loads_into_the_ssd_backbone(vgg16_file):
    path, arrays = vgg16_file
    model = SSD(2, image_size=32, backbone="vgg16", backbone_weights=path)
    for name, _, _ in VGG16_CONVS:
        kernel, bias = model.get_layer(name).get_weights()
        np.testing.assert_array_equal(kernel, arrays[name][0])
        np.testing.assert_array_equal(bias, arrays[name][1])
    assert model.get_config()["backbone_weights"] is None   # a reload never reads the file again


def test_saved_weights_h5_loads_into_the_fpn_trunk(tmp_path):
    """A ``.weights.h5`` written by keras.applications' own model (Keras 3 save_weights)."""
    keras.utils.set_random_seed(1)
    reference = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=0.35)
    path = str(tmp_path / "mobilenet_v2_0.35.weights.h5")
    reference.save_weights(path)
    keras.utils.set_random_seed(2)
    model = SSD(2, image_size=64, backbone="mobilenetv2_fpn", width_multiplier=0.35, fpn_channels=16,
                backbone_weights=path)
    assert len(model.backbone_layer_names) == 104
    for name in model.backbone_layer_names:
        for got, want in zip(model.get_layer(name).get_weights(), reference.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(WeightsFileError, match=r"^\S+mobilenet_v2_0\.35\.weights\.h5: does not fit the "
                                               r"MobileNetV2 alpha=0\.5 backbone \(.+\)$"):
        SSD(2, image_size=64, backbone="mobilenetv2_fpn", width_multiplier=0.5, fpn_channels=16,
            backbone_weights=path)


def test_weight_files_that_do_not_fit_are_one_line_errors(vgg16_file, tmp_path):
    path, _ = vgg16_file
    cases = [
        (dict(backbone="mobilenetv2_fpn", width_multiplier=0.35), path,
         r": does not fit the MobileNetV2 alpha=0.35 backbone \(Layer count mismatch when loading weights from "
         r"file. Model expected 104 layers, found 13 saved layers.\); the file's layers start \['block1_conv1', "
         r"'block1_conv2', 'block2_conv1'\], this backbone's \['Conv1', 'bn_Conv1', 'expanded_conv_depthwise'\]: "
         r"weights of another network\?$"),
        (dict(backbone="vgg16_bn"), path, r": backbone 'vgg16_bn' \(VGG16-BN\) has no keras.applications weights"),
        (dict(backbone="vgg16", width_multiplier=0.5), path, r": keras.applications VGG16 weights need "
                                                            r"width_multiplier=1.0, got 0.5"),
        (dict(backbone="vgg16"), str(tmp_path / "nowhere_notop.h5"), r": no such weight file"),
        (dict(backbone="vgg16"), str(tmp_path), r": a folder, not a VGG16 weight file"),
    ]
    (tmp_path / "weights.npz").write_bytes(b"PK")
    (tmp_path / "download.h5").write_text("<html>403 Forbidden</html>")
    cases += [(dict(backbone="vgg16"), str(tmp_path / "weights.npz"), r": not a Keras weight file"),
              (dict(backbone="vgg16"), str(tmp_path / "download.h5"), r": not an HDF5 weight file")]
    for kwargs, file, message in cases:
        with pytest.raises(WeightsFileError) as info:
            SSD(2, image_size=32, fpn_channels=8, backbone_weights=file, **kwargs)
        text = str(info.value)
        assert text.startswith(file + ":") and "\n" not in text, text
        assert re.search(message, text), text


def test_classifier_top_file_and_other_network_are_named(tmp_path):
    with_top = vgg16_notop_layers() + [("flatten", []), ("fc1", [np.zeros((4, 4), "float32")] * 2),
                                       ("fc2", [np.zeros((4, 4), "float32")] * 2),
                                       ("predictions", [np.zeros((4, 4), "float32")] * 2)]
    top = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
    write_keras2_h5(top, with_top)
    with pytest.raises(WeightsFileError, match=r"Layer count mismatch.*classifier top: use the notop file$"):
        SSD(2, image_size=32, backbone="vgg16", backbone_weights=str(top))
    other = tmp_path / "resnet_like_notop.h5"
    write_keras2_h5(other, [("conv1_conv", [np.zeros((7, 7, 3, 64), "float32")] * 2)])
    with pytest.raises(WeightsFileError, match=r"expected 13 layers, found 1 saved layers.\); the file's layers "
                                               r"start \['conv1_conv'\], this backbone's \['block1_conv1', "
                                               r"'block1_conv2', 'block2_conv1'\]: weights of another network\?$"):
        SSD(2, image_size=32, backbone="vgg16", backbone_weights=str(other))


def test_recipe_with_a_bad_weight_file_is_a_recipe_error(tmp_path):
    missing = str(tmp_path / "vgg16_notop.h5")
    recipe = dict(model=dict(TINY, backbone="vgg16", width_multiplier=1.0, backbone_weights=missing))
    with pytest.raises(RecipeError, match=r"^\S+vgg16_notop\.h5: no such weight file"):
        build_model(recipe, ["a", "b"])


# ------------------------------------------------------------------ model.init_from
def _perturbed(model, seed):
    """Every weight (BatchNorm statistics too) moved off its initial value, as training would."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in layer.get_weights()])
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 3-class kdet model saved as training saves it (compiled, .keras)."""
    keras.utils.set_random_seed(0)
    model = _perturbed(SSD(3, **TINY), seed=0)
    model.compile(optimizer="adam")
    path = str(tmp_path_factory.mktemp("ckpt") / "best.keras")
    model.save(path)
    return path, model


def _weights(model, name):
    return model.get_layer(name).get_weights()


def _equal(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_other_class_count_loads_all_but_the_class_heads(checkpoint, capsys):
    path, source = checkpoint
    keras.utils.set_random_seed(5)
    fresh = SSD(2, **TINY)                 # what the class heads must stay: their own initialisation
    keras.utils.set_random_seed(5)
    model = build_model(dict(model=dict(TINY, backbone_weights=None, init_from=path)), ["a", "b"])
    out = capsys.readouterr().out
    with_weights = [layer.name for layer in model.layers if layer.weights]
    heads = [n for n in with_weights if n.startswith("class_head_")]
    assert len(with_weights) == 59 and len(heads) == 6
    for name in with_weights:
        if name in heads:
            assert _equal(_weights(model, name), _weights(fresh, name)), name
        else:
            assert _equal(_weights(model, name), _weights(source, name)), name
    # 15 VGG convs + their BatchNorms; conv4_3_norm + 8 extra convs + BatchNorms; 6 + 6 heads
    assert (f"model.init_from={path}: loaded 53 of 59 layers with weights "
            "(backbone 30/30, extras 17/17, box heads 6/6, class heads 0/6)") in out
    assert "  not loaded, other class count (start anew): class_head_0, class_head_1, class_head_2, " in out
    assert "note: the checkpoint has 3 classes, the model 2: the class heads start anew" in out
    assert "anchors differ" not in out and "shapes differ" not in out


def test_same_class_count_loads_everything_and_predicts_the_same(checkpoint, capsys):
    path, source = checkpoint
    model = build_model(dict(model=dict(TINY, backbone_weights="imagenet", init_from=path)), ["a", "b", "c"])
    out = capsys.readouterr().out
    assert "model.backbone_weights='imagenet' is not used" in out   # no download attempted
    assert "loaded 59 of 59 layers with weights (backbone 30/30, extras 17/17, box heads 6/6, class heads 6/6)" in out
    assert all(_equal(a, b) for a, b in zip(model.get_weights(), source.get_weights()))
    images = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(model(images), source(images))


def test_class_heads_of_coinciding_shape_still_start_anew(tmp_path, capsys):
    """4 boxes x (1 + 2 classes) = 6 boxes x (1 + 1 class) = 12 channels: same shapes, other meaning."""
    keras.utils.set_random_seed(0)
    source = _perturbed(SSD(2, **TINY, aspect_ratios=[[2]] * 6), seed=1)
    path = str(tmp_path / "two_classes.keras")
    source.save(path)
    model = SSD(1, **TINY, aspect_ratios=[[2, 3]] * 6)
    fresh_heads = {n: _weights(model, n) for n in (f"class_head_{k}" for k in range(6))}
    assert _weights(model, "class_head_0")[0].shape == _weights(source, "class_head_0")[0].shape
    report = init_from_checkpoint(model, path)
    assert report.class_count_differs == list(fresh_heads)
    assert all(_equal(_weights(model, n), w) for n, w in fresh_heads.items())
    assert [name for name, _, _ in report.shape_mismatch] == [f"box_head_{k}" for k in range(6)]
    out = capsys.readouterr().out
    assert "not loaded, shapes differ (start anew): box_head_0 (3, 3, 64, 24) vs (3, 3, 64, 16)" in out


def test_other_anchors_load_matching_box_heads_and_say_so(checkpoint, capsys):
    path, source = checkpoint
    ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
    ratios[1] = [2]                        # map 1: 4 boxes per location instead of 6
    model = SSD(3, **dict(TINY, image_size=96), aspect_ratios=ratios)
    report = init_from_checkpoint(model, path)
    out = capsys.readouterr().out
    # conv10_2's kernel shrinks to its 1x1 input map at 64 px, not at 96 px (2x2)
    assert [name for name, _, _ in report.shape_mismatch] == ["conv10_2", "box_head_1", "class_head_1"]
    assert _equal(_weights(model, "box_head_0"), _weights(source, "box_head_0"))
    assert "extras 16/17, box heads 5/6, class heads 5/6" in out
    assert "conv10_2 (2, 2, 16, 32) vs (1, 1, 16, 32), box_head_1 (3, 3, 128, 16) vs (3, 3, 128, 24)" in out
    # 12x12, 6x6, 3x3, 2x2, 1x1, 1x1 maps with 4, 4, 6, 6, 4, 4 boxes: 576 + 144 + 54 + 24 + 4 + 4
    assert "note: the anchors differ (checkpoint: 390 at 64 px, model: 806 at 96 px)" in out


def test_init_from_errors_are_one_line(checkpoint, tmp_path, vgg16_file):
    path, _ = checkpoint
    recipe = lambda file: dict(model=dict(TINY, backbone_weights=None, init_from=file))  # noqa: E731
    damaged = tmp_path / "last.keras"
    damaged.write_bytes(open(path, "rb").read()[:5000])
    cases = [(str(tmp_path / "missing.keras"), r"no such model file"),
             (str(damaged), r"not a .keras model file \(not a complete zip archive"),
             (vgg16_file[0], r"needs a kdet .keras model .*use model.backbone_weights")]
    for file, message in cases:
        with pytest.raises(RecipeError, match=message) as info:
            build_model(recipe(file), ["a"])
        assert file in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(RecipeError, match=r"no layer of this checkpoint fits the model \(checkpoint: vgg16_bn "
                                          r"width 0.125; model: vgg16 width 0.25\)"):
        build_model(dict(model=dict(TINY, backbone="vgg16", width_multiplier=0.25, init_from=path)), ["a"])
    with pytest.raises(WeightsFileError, match=r"a kdet model, not backbone weights; start from it with "
                                               r"model.init_from"):
        SSD(2, image_size=32, backbone="vgg16", backbone_weights=path)
    assert zipfile.is_zipfile(path)


def test_init_from_works_with_gradual_unfreezing(checkpoint):
    """Epoch 1: backbone frozen; epoch 2: its top stage trains. Frozen stages keep the checkpoint's weights."""
    from kdet.training.freezing import GradualUnfreezing

    path, source = checkpoint
    model = build_model(dict(model=dict(TINY, backbone_weights=None, init_from=path)), ["a", "b"])
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    targets = np.full((4, 2, 6), -1.0, "float32")
    targets[:, 0] = [0.1, 0.1, 0.6, 0.7, 1, 0]
    model.fit(images, targets, batch_size=2, epochs=2, verbose=0,
              callbacks=[GradualUnfreezing({0: 0, 1: 1}, verbose=0)])
    stages = model.backbone_stages
    with_weights = lambda names: [n for n in names if model.get_layer(n).weights]  # noqa: E731
    for name in with_weights([n for stage in stages[:-1] for n in stage]):
        assert _equal(_weights(model, name), _weights(source, name)), name
    assert all(not _equal(_weights(model, n), _weights(source, n)) for n in with_weights(stages[-1]))
    assert not all(_equal(_weights(model, f"box_head_{k}"), _weights(source, f"box_head_{k}")) for k in range(6))


def test_training_from_a_checkpoint_with_a_frozen_backbone_then_resume_wins(checkpoint, tmp_path, monkeypatch,
                                                                            capsys):
    import kdet.engine as engine
    from _helpers import write_tiny_recipe
    from kdet.config import load_recipe
    from kdet.models.ssd import load_model

    path, source = checkpoint
    monkeypatch.setattr(engine, "finish", lambda *args, **kwargs: {})  # no test split, no export: not at stake
    settings = ["model.backbone=vgg16_bn", f"model.init_from={path!r}", "train.freeze_backbone_epochs=1",
                "data.val=None", "data.test=None"]
    recipe = load_recipe(write_tiny_recipe(tmp_path), settings + ["train.epochs=1"])
    work_dir = str(tmp_path / "run")
    engine.train(recipe, work_dir)
    out = capsys.readouterr().out
    assert f"model.init_from={path}: loaded 53 of 59 layers with weights" in out   # 5 shapes classes, not 3
    trained = load_model(f"{work_dir}/last.keras", compile=False)
    backbone = [n for stage in trained.backbone_stages for n in stage if trained.get_layer(n).weights]
    assert len(backbone) == 30   # frozen for the epoch: still the checkpoint's (BatchNorm statistics too)
    assert all(_equal(_weights(trained, n), _weights(source, n)) for n in backbone)
    assert not _equal(_weights(trained, "conv8_1"), _weights(source, "conv8_1"))   # the extras trained

    engine.train(load_recipe(write_tiny_recipe(tmp_path), settings + ["train.epochs=2"]), work_dir, resume=True)
    out = capsys.readouterr().out
    assert "--resume wins: model.init_from is not applied" in out and "model.init_from=" not in out
