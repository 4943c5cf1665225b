"""Feature extractors for SSD: the paper's VGG16 base and FPN on keras.applications.

Each builder takes the model's image input (``[B, H, W, 3]`` RGB 0..255,
docs/CONVENTIONS.md), applies the matching ImageNet preprocessing as a layer,
and returns ``BackboneFeatures``: the source feature maps for the SSD heads
(input side first), the backbone ``stages`` (lists of layer names, input side
first, for freezing / gradual unfreezing) and ``pretrained`` (the layers that
ImageNet weights fill). Every other layer with weights is "new".

``weights`` is ``None`` (from scratch), ``"imagenet"`` (downloaded by keras.applications)
or the path of a keras.applications weight file copied from a machine with internet
(``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``, the ResNet50 / MobileNetV2
``notop`` files, or a ``.weights.h5`` that ``save_weights`` wrote): it is loaded into the
keras.applications model of the backbone (which checks it layer by layer), then copied
into kdet's backbone by layer name. A file that does not fit is a `WeightsFileError`,
one line naming the file and the problem.
"""

import os
import re
import warnings
from dataclasses import dataclass, field

import keras

from kdet.models.layers import ImagePreprocessing, L2Normalization

BACKBONES = ("vgg16", "vgg16_bn", "resnet50_fpn", "mobilenetv2_fpn", "mobilenetv3_large_ssdlite")
MOBILENETV2_IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


class WeightsDownloadError(RuntimeError):
    """ImageNet weights could not be fetched (usually: no internet)."""


class WeightsFileError(ValueError):
    """A backbone weight file that is missing, unreadable or does not fit the backbone; one line."""


WEIGHT_FILE_SUFFIXES = (".h5", ".hdf5", ".keras")  # legacy H5 (keras.applications' downloads), .weights.h5, .keras


@dataclass
class BackboneFeatures:
    sources: list                                  # feature-map tensors, input side first
    stages: list                                   # list of lists of layer names, input side first
    pretrained: list = field(default_factory=list)  # layer names that ImageNet weights fill
    head: str = "conv"                             # "conv" (3x3) | "separable" (SSDLite: depthwise 3x3, 1x1)
    anchor_scales: list = None                     # the backbone's own default anchors (None: SSD's)
    aspect_ratios: list = None


def scaled_filters(filters, width_multiplier):
    """Filters of a conv scaled by the width multiplier, at least 8."""
    return max(8, int(round(filters * width_multiplier)))


def _pair(size):
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


# ------------------------------------------------------------ ImageNet weights
def _imagenet_layer_weights(application, label, **kwargs):
    """``{layer name: weights}`` of a keras.applications model with ImageNet weights."""
    try:
        model = application(include_top=False, weights="imagenet", **kwargs)
    except Exception as err:  # download / file errors come in many types
        raise WeightsDownloadError(
            f"could not download ImageNet weights for {label} (no internet?): {err}; "
            "use backbone_weights=None to train from scratch") from err
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


def _load_pretrained(layers_by_name, weights_by_name, label):
    for name, layer in layers_by_name.items():
        if name not in weights_by_name:
            raise ValueError(f"{label}: the pretrained weights have no layer named {name!r}")
        layer.set_weights(weights_by_name[name])


def _is_weight_file(weights):
    return isinstance(weights, os.PathLike) or (isinstance(weights, str) and weights != "imagenet")


def _check_weights(weights, label):
    """A bad value or weight file fails before any layer is built."""
    if weights is not None and weights != "imagenet" and not _is_weight_file(weights):
        raise ValueError(f"{label}: backbone_weights must be None, 'imagenet' or the path of a weight file, "
                         f"got {weights!r}")
    if _is_weight_file(weights):
        _check_weight_file(os.fspath(weights), label)


def _pretrained_layer_weights(application, label, weights, **kwargs):
    """``{layer name: weights}`` of the keras.applications trunk: ImageNet's or a weight file's."""
    if weights == "imagenet":
        return _imagenet_layer_weights(application, label, **kwargs)
    return _file_layer_weights(application, label, os.fspath(weights), **kwargs)


# ------------------------------------------------------------ weight files
def _check_weight_file(path, label):
    """Existence and file type, before Keras reads the file."""
    if not os.path.exists(path):
        raise WeightsFileError(f"{path}: no such weight file (backbone_weights is None, 'imagenet', 'auto' or "
                               f"the path of a keras.applications {label} weight file)")
    if os.path.isdir(path):
        raise WeightsFileError(f"{path}: a folder, not a {label} weight file (.h5 / .weights.h5)")
    if not path.endswith(WEIGHT_FILE_SUFFIXES):
        raise WeightsFileError(f"{path}: not a Keras weight file (expected a .h5 / .weights.h5 file as "
                               f"keras.applications downloads, e.g. {_EXAMPLE_FILES.get(label, '')})")
    if path.endswith(".keras"):
        if _is_kdet_model(path):
            raise WeightsFileError(f"{path}: a kdet model, not backbone weights; start from it with "
                                   "model.init_from (and backbone_weights=None)")
        return
    import h5py

    if not h5py.is_hdf5(path):
        raise WeightsFileError(f"{path}: not an HDF5 weight file (a damaged or incomplete download, or "
                               "another format)")


_EXAMPLE_FILES = {
    "VGG16": "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "ResNet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "MobileNetV2": "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
}


def _is_kdet_model(path):
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return '"class_name": "SSD"' in archive.read("config.json").decode(errors="replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return False


def _file_layer_weights(application, label, path, **kwargs):
    """``{layer name: weights}`` of the keras.applications trunk loaded from ``path`` (checked by Keras)."""
    model = application(include_top=False, weights=None, **kwargs)
    try:
        with warnings.catch_warnings():  # Keras warns once per layer before it raises
            warnings.simplefilter("ignore")
            model.load_weights(path)
    except Exception as err:  # Keras raises ValueError / OSError / KeyError for files that do not fit
        reason = " ".join((str(err).strip().splitlines() or [type(err).__name__])[0].split())[:240]
        described = label + "".join(f" {k}={v}" for k, v in kwargs.items())
        raise WeightsFileError(f"{path}: does not fit the {described} backbone ({reason})"
                               f"{_file_hint(path, model)}") from err
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


def _file_hint(path, model):
    """What a legacy H5 file holds instead, when its layer names tell (a classifier top, another network)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("layer_names", [])]
            names = [n for n in names if len(group[n].attrs.get("weight_names", []))]
    except (OSError, KeyError, TypeError):
        return ""
    if not names:
        return ""
    if "predictions" in names:
        return "; the file includes the classifier top: use the notop file"
    expected = [layer.name for layer in model.layers if layer.weights]
    if names[0] != expected[0]:
        return f"; the file's layers start {names[:3]}, this backbone's {expected[:3]}: weights of another network?"
    return ""


# -------------------------------------------------------------- SSD VGG16 base
def vgg16_feature_map_sizes(image_size):
    """``[(h, w)] * 6`` source sizes of the SSD VGG16 base; 38,19,10,5,3,1 at 300.

    Raises ``ValueError`` when the input is too small for every map to be >= 1.
    """

    def sizes_1d(n):
        n = n // 2                      # pool1 (2x2 valid)
        n = n // 2                      # pool2
        conv4_3 = -(-n // 2)            # pool3, ceil mode ('same')
        fc7 = conv4_3 // 2              # pool4; pool5 and fc6/fc7 keep the size
        conv8 = -(-fc7 // 2)            # pad 1, 3x3 stride 2
        conv9 = -(-conv8 // 2)
        conv10 = max(conv9 - 2, 1)      # 3x3 valid, kernel shrinks to the map below 3
        conv11 = max(conv10 - 2, 1)
        return [conv4_3, fc7, conv8, conv9, conv10, conv11]

    height, width = _pair(image_size)
    sizes = list(zip(sizes_1d(height), sizes_1d(width)))
    if min(min(s) for s in sizes) < 1:
        raise ValueError(
            f"image_size {image_size!r} is too small for the SSD VGG16 base "
            f"(feature maps {sizes}); use at least 12x12 (300 in the paper)")
    return sizes


def vgg16_ssd(images, width_multiplier=1.0, weights=None, batch_norm=False):
    """The SSD300 VGG16 base + extra layers (Liu et al. 2016, Fig. 2).

    VGG16 conv1_1..conv5_3 (pool3 in ceil mode), conv4_3 -> L2Normalization(20)
    as the first source; pool5 3x3 stride 1; fc6 3x3 dilation 6 (1024); fc7 1x1
    (1024) the second source; extras conv8..conv11 (1x1 then 3x3: stride 2 with
    padding 1 for conv8/9, valid for conv10/11). Layer names for conv1..conv5
    are keras.applications' (``block4_conv3`` is conv4_3) so ImageNet weights
    copy by name; they need ``width_multiplier == 1``. When a map entering
    conv10_2 / conv11_2 is smaller than 3, their kernel shrinks to the map size
    so the output stays 1x1 instead of vanishing.

    ``batch_norm=True`` (backbone ``"vgg16_bn"``) puts BatchNormalization after
    every conv, as ScratchDet (Zhu et al. 2019) does to train SSD from scratch;
    there are no ImageNet weights for it.
    """
    label = "VGG16-BN" if batch_norm else "VGG16"
    _check_weights(weights, "VGG16")
    if _is_weight_file(weights) and batch_norm:
        raise WeightsFileError(f"{os.fspath(weights)}: backbone 'vgg16_bn' (VGG16-BN) has no keras.applications "
                               "weights: use backbone 'vgg16' with this file, or model.init_from for a kdet model")
    if _is_weight_file(weights) and width_multiplier != 1.0:
        raise WeightsFileError(f"{os.fspath(weights)}: keras.applications VGG16 weights need "
                               f"width_multiplier=1.0, got {width_multiplier}")
    if weights == "imagenet" and batch_norm:
        raise ValueError(f"{label}: no ImageNet weights for the batch-norm variant; use backbone_weights=None")
    if weights == "imagenet" and width_multiplier != 1.0:
        raise ValueError(f"{label}: ImageNet weights need width_multiplier=1.0, got {width_multiplier}")
    vgg16_feature_map_sizes(tuple(images.shape[1:3]))  # raises clearly on small inputs

    convs = {}

    def conv(filters, kernel, name, **kwargs):
        """Conv + ReLU (+ BatchNorm between them with ``batch_norm``), as one callable."""
        filters = scaled_filters(filters, width_multiplier)
        if not batch_norm:
            convs[name] = keras.layers.Conv2D(filters, kernel, activation="relu", name=name, **kwargs)
            return convs[name]
        convs[name] = keras.layers.Conv2D(filters, kernel, use_bias=False, name=name, **kwargs)
        norm = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")  # torch's 0.1
        relu = keras.layers.ReLU(name=f"{name}_relu")
        return lambda x: relu(norm(convs[name](x)))

    def with_norm(names):
        return [n for name in names for n in ([name, f"{name}_bn", f"{name}_relu"] if batch_norm else [name])]

    x = ImagePreprocessing("caffe", name="vgg16_preprocess")(images)
    stages, pretrained, sources = [], [], []
    blocks = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]
    for block, (filters, num_convs) in enumerate(blocks, start=1):
        names = [f"block{block}_conv{i}" for i in range(1, num_convs + 1)]
        for name in names:
            x = conv(filters, 3, name, padding="same")(x)
        pretrained += names
        if block == 4:
            sources.append(L2Normalization(20.0, name="conv4_3_norm")(x))
        if block < 5:
            pool_name = f"block{block}_pool"
            padding = "same" if block == 3 else "valid"  # pool3 ceil mode: 75 -> 38
            x = keras.layers.MaxPooling2D(2, 2, padding=padding, name=pool_name)(x)
        else:
            pool_name = "pool5"
            x = keras.layers.MaxPooling2D(3, 1, padding="same", name=pool_name)(x)
        stages.append(with_norm(names) + [pool_name])

    x = conv(1024, 3, "fc6", padding="same", dilation_rate=6)(x)
    x = conv(1024, 1, "fc7")(x)
    stages.append(with_norm(["fc6", "fc7"]))
    sources.append(x)

    for index, (squeeze, filters, strided) in enumerate(
            [(256, 512, True), (128, 256, True), (128, 256, False), (128, 256, False)], start=8):
        x = conv(squeeze, 1, f"conv{index}_1")(x)
        if strided:
            x = keras.layers.ZeroPadding2D(1, name=f"conv{index}_2_pad")(x)
            x = conv(filters, 3, f"conv{index}_2", strides=2)(x)
        else:
            kernel = (min(3, x.shape[1]), min(3, x.shape[2]))
            x = conv(filters, kernel, f"conv{index}_2")(x)
        sources.append(x)

    if weights is not None:
        _load_pretrained({name: convs[name] for name in pretrained},
                         _pretrained_layer_weights(keras.applications.VGG16, "VGG16", weights), label)
    return BackboneFeatures(sources=sources, stages=stages, pretrained=pretrained)


# ------------------------------------------------------------------------ FPN
def _resnet50_stage(name):
    prefix = name.split("_")[0]
    if prefix in ("conv1", "pool1"):
        return 0
    match = re.fullmatch(r"conv([2-5])", prefix)
    return int(match.group(1)) - 1 if match else None


def _mobilenetv2_stage(name):
    """Stages by output stride: stem (2), blocks 1-2 (4), 3-5 (8), 6-12 (16), 13-16 + head (32)."""
    match = re.match(r"block_(\d+)_", name)
    if match is None:
        return 4 if name in ("Conv_1", "Conv_1_bn", "out_relu") else 0
    block = int(match.group(1))
    return 1 if block <= 2 else 2 if block <= 5 else 3 if block <= 12 else 4


_FPN_TRUNKS = {
    # name: (keras.applications builder, preprocessing, C3..C5 layer names, stage rule)
    "resnet50": ("ResNet50", "caffe",
                 ("conv3_block4_out", "conv4_block6_out", "conv5_block3_out"), _resnet50_stage),
    "mobilenetv2": ("MobileNetV2", "tf",
                    ("block_6_expand_relu", "block_13_expand_relu", "out_relu"), _mobilenetv2_stage),
}


def _upsample_like(x, target, name):
    """Nearest 2x upsampling of ``x``, cropped to ``target``'s size (odd sizes)."""
    x = keras.layers.UpSampling2D(2, interpolation="nearest", name=f"{name}_upsample")(x)
    extra_h = x.shape[1] - target.shape[1]
    extra_w = x.shape[2] - target.shape[2]
    if extra_h or extra_w:
        x = keras.layers.Cropping2D(((0, extra_h), (0, extra_w)), name=f"{name}_crop")(x)
    return x


def fpn(images, trunk="resnet50", fpn_channels=256, width_multiplier=1.0, weights=None):
    """FPN (Lin et al. 2017) on a keras.applications trunk: sources P3..P7.

    C3..C5 (strides 8, 16, 32) get 1x1 laterals, a top-down pathway of nearest
    2x upsampling + addition, and 3x3 smoothing; P6 is a 3x3 stride-2 conv on
    P5 and P7 a 3x3 stride-2 conv on ReLU(P6) (torchvision ``LastLevelP6P7``).
    ``width_multiplier`` scales ``fpn_channels`` (min 8) and, for MobileNetV2,
    is its ``alpha``; ResNet50's trunk has no width option and stays full.
    """
    if trunk not in _FPN_TRUNKS:
        raise ValueError(f"unknown FPN trunk {trunk!r}; expected one of {sorted(_FPN_TRUNKS)}")
    label, mode, taps, stage_of = _FPN_TRUNKS[trunk]
    _check_weights(weights, label)
    builder = getattr(keras.applications, label)
    kwargs = {}
    if trunk == "mobilenetv2":
        kwargs["alpha"] = width_multiplier
        if weights == "imagenet" and width_multiplier not in MOBILENETV2_IMAGENET_ALPHAS:
            raise ValueError(f"{label}: ImageNet weights need width_multiplier in "
                             f"{MOBILENETV2_IMAGENET_ALPHAS}, got {width_multiplier}")

    x = ImagePreprocessing(mode, name=f"{trunk}_preprocess")(images)
    trunk_model = builder(include_top=False, weights=None, input_tensor=x, **kwargs)
    trunk_layers = [layer for layer in trunk_model.layers
                    if not isinstance(layer, (keras.layers.InputLayer, ImagePreprocessing))]
    stages = [[] for _ in range(5)]
    for layer in trunk_layers:
        stage = stage_of(layer.name)
        if stage is None:
            raise ValueError(f"{label}: layer {layer.name!r} fits no backbone stage")
        stages[stage].append(layer.name)
    if weights is not None:
        with_weights = {layer.name: layer for layer in trunk_layers if layer.weights}
        _load_pretrained(with_weights, _pretrained_layer_weights(builder, label, weights, **kwargs), label)

    channels = scaled_filters(fpn_channels, width_multiplier)
    c3, c4, c5 = (trunk_model.get_layer(name).output for name in taps)
    laterals = [keras.layers.Conv2D(channels, 1, name=f"fpn_lateral_c{i}")(c)
                for i, c in zip((3, 4, 5), (c3, c4, c5))]
    p5 = laterals[2]
    p4 = keras.layers.Add(name="fpn_p4_add")([laterals[1], _upsample_like(p5, laterals[1], "fpn_p5")])
    p3 = keras.layers.Add(name="fpn_p3_add")([laterals[0], _upsample_like(p4, laterals[0], "fpn_p4")])
    outputs = [keras.layers.Conv2D(channels, 3, padding="same", name=f"fpn_output_p{i}")(p)
               for i, p in zip((3, 4, 5), (p3, p4, p5))]
    p6 = keras.layers.Conv2D(channels, 3, strides=2, padding="same", name="fpn_p6")(outputs[2])
    p7 = keras.layers.ReLU(name="fpn_p6_relu")(p6)
    p7 = keras.layers.Conv2D(channels, 3, strides=2, padding="same", name="fpn_p7")(p7)
    pretrained = [layer.name for layer in trunk_layers if layer.weights]
    return BackboneFeatures(sources=outputs + [p6, p7], stages=stages, pretrained=pretrained)


# -------------------------------------------------- SSDLite on keras-cv's MobileNetV3-Large
# MobileNetV3-Large (Howard et al. 2019, Table 1), as keras-cv's MobileNetV3Backbone arguments: expansion is a
# ratio of the block's input channels (16*4 = 64, 24*3 = 72, ..., 112*6 = 672, 160*6 = 960, torchvision's numbers).
MOBILENETV3_LARGE = dict(
    stackwise_expansion=[1, 4, 3, 3, 3, 3, 6, 2.5, 2.3, 2.3, 6, 6, 6, 6, 6],
    stackwise_filters=[16, 24, 24, 40, 40, 40, 80, 80, 80, 80, 112, 112, 160, 160, 160],
    stackwise_kernel_size=[3, 3, 3, 5, 5, 5, 3, 3, 3, 3, 3, 3, 5, 5, 5],
    stackwise_stride=[1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1],
    stackwise_se_ratio=[None, None, None, 0.25, 0.25, 0.25, None, None, None, None, 0.25, 0.25, 0.25, 0.25, 0.25],
    stackwise_activation=["relu"] * 6 + ["hard_swish"] * 9,
)
MOBILENETV3_LARGE_PRESET = "mobilenet_v3_large_imagenet"  # keras-cv's ImageNet preset (Kaggle download)
# torchvision ssdlite320_mobilenet_v3_large: DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)
SSDLITE_SCALES = [0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0]
SSDLITE_ASPECT_RATIOS = [[2, 3]] * 6


def _mobilenetv3_stage(name):
    """Stages by output stride: stem + block 0 (2), 1-2 (4), 3-5 (8), 6-11 (16), 12-14 + Conv_1 (32); None: unnamed."""
    match = re.match(r"expanded_conv_(\d+)_", name)
    if match is None:
        return 4 if name.startswith("Conv_1") else 0 if name.startswith(("Conv", "rescaling")) else None
    block = int(match.group(1))
    return 0 if block == 0 else 1 if block <= 2 else 2 if block <= 5 else 3 if block <= 11 else 4


def _ssdlite_extra_block(x, filters, name):
    """torchvision ``_extra_block``: 1x1 to filters/2, depthwise 3x3 stride 2, 1x1 to filters; BN + ReLU6 each."""
    def norm_relu(y, suffix):
        y = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.97, name=f"{name}_{suffix}_bn")(y)
        return keras.layers.ReLU(6.0, name=f"{name}_{suffix}_relu")(y)

    x = norm_relu(keras.layers.Conv2D(filters // 2, 1, use_bias=False, name=f"{name}_squeeze")(x), "squeeze")
    x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
    x = norm_relu(keras.layers.DepthwiseConv2D(3, strides=2, use_bias=False, name=f"{name}_depthwise")(x), "depthwise")
    return norm_relu(keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_expand")(x), "expand")


def mobilenetv3_large_ssdlite(images, width_multiplier=1.0, weights=None):
    """SSDLite320 on MobileNetV3-Large (torchvision ``ssdlite320_mobilenet_v3_large``), trunk from keras-cv.

    Sources: C4 = the activated 672-channel expansion of block 12 (stride 16, 20x20 at 320), C5 = the
    960-channel last conv (stride 32), then four extra blocks to 512, 256, 256, 128 channels (strides 64..512;
    3, 2, 1 at 320). Heads are depthwise-separable (``head="separable"``); anchors torchvision's (6 per cell,
    scales 0.2..0.95). ``width_multiplier`` is the trunk's alpha and scales the extras (min 16).
    ``weights="imagenet"``: keras-cv's preset (alpha 1 only); a failed download is a ``WeightsDownloadError``.
    """
    import keras_cv

    label = "MobileNetV3-Large"
    _check_weights(weights, label)
    if weights == "imagenet" and width_multiplier != 1.0:
        raise ValueError(f"{label}: ImageNet weights need width_multiplier=1.0, got {width_multiplier}")
    trunk = keras_cv.models.MobileNetV3Backbone(include_rescaling=True, input_tensor=images,
                                                alpha=width_multiplier, **MOBILENETV3_LARGE)
    trunk_layers = [layer for layer in trunk.layers if not isinstance(layer, keras.layers.InputLayer)]
    if weights == "imagenet":
        try:
            preset = keras_cv.models.MobileNetV3Backbone.from_preset(MOBILENETV3_LARGE_PRESET)
        except Exception as err:  # Kaggle download errors come in many types
            raise WeightsDownloadError(
                f"could not download ImageNet weights for {label} (keras-cv preset {MOBILENETV3_LARGE_PRESET!r}, "
                f"no internet?): {err}; use backbone_weights=None to train from scratch") from err
        for mine, theirs in zip([l for l in trunk_layers if l.weights], [l for l in preset.layers if l.weights]):
            mine.set_weights(theirs.get_weights())
    c4 = trunk.get_layer("expanded_conv_12_depthwise_pad").input
    x = trunk.output
    sources = [c4, x]
    for k, filters in enumerate((512, 256, 256, 128), start=1):
        x = _ssdlite_extra_block(x, max(16, int(filters * width_multiplier)), f"ssdlite_extra{k}")
        sources.append(x)
    stages, stage = [[] for _ in range(5)], 0
    for layer in trunk_layers:  # in graph order: unnamed layers (squeeze-excite, activations) join their block's stage
        named = _mobilenetv3_stage(layer.name)
        stage = named if named is not None else stage
        stages[stage].append(layer.name)
    return BackboneFeatures(sources=sources, stages=stages, pretrained=[l.name for l in trunk_layers if l.weights],
                            head="separable", anchor_scales=list(SSDLITE_SCALES),
                            aspect_ratios=[list(r) for r in SSDLITE_ASPECT_RATIOS])


def build_backbone(images, backbone="vgg16", width_multiplier=1.0, weights=None, fpn_channels=256):
    """Dispatch on the backbone name: ``vgg16``, ``resnet50_fpn``, ``mobilenetv2_fpn``, ``mobilenetv3_large_ssdlite``."""
    if backbone == "mobilenetv3_large_ssdlite":
        return mobilenetv3_large_ssdlite(images, width_multiplier=width_multiplier, weights=weights)
    if backbone in ("vgg16", "vgg16_bn"):
        return vgg16_ssd(images, width_multiplier=width_multiplier, weights=weights,
                         batch_norm=backbone == "vgg16_bn")
    if backbone.endswith("_fpn") and backbone in BACKBONES:
        return fpn(images, trunk=backbone[: -len("_fpn")], fpn_channels=fpn_channels,
                   width_multiplier=width_multiplier, weights=weights)
    raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
