"""Feature extractors for SSD: the paper's VGG16 base, FPN on keras.applications and keras-cv trunks, SSDLite.

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
one line naming the file and the problem. keras-cv trunks (built from their constructor
arguments) take ``"imagenet"`` from keras-cv's presets and, as a file, a preset's
``model.weights.h5``; they are copied layer by layer in order.
"""

import os
import re
import warnings
from dataclasses import dataclass, field

import keras

from kdet.models.anchors import SSD300_ASPECT_RATIOS, ssd_scales
from kdet.models.layers import ImagePreprocessing, L2Normalization
from kdet.models.necks import NECKS, build_neck, upsample_like

BACKBONES = ("vgg16", "vgg16_bn", "resnet50_fpn", "mobilenetv2_fpn", "mobilenetv3_large_ssdlite",
             "resnet50v2_fpn", "cspdarknet_tiny_fpn", "efficientnetv2_b0_fpn")  # the last three: keras-cv trunks
MOBILENETV2_IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
VGG16_BACKBONES = ("vgg16", "vgg16_bn")  # the SSD paper's base, with and without BatchNorm; the only ones with fine_map


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
    "MobileNetV3-Large": "model.weights.h5 of keras-cv's mobilenet_v3_large_imagenet preset",
    "ResNet50V2": "model.weights.h5 of keras-cv's resnet50_v2_imagenet preset",
    "CSPDarkNet-Tiny": "model.weights.h5 of keras-cv's csp_darknet_tiny_imagenet preset",
    "EfficientNetV2-B0": "model.weights.h5 of keras-cv's efficientnetv2_b0_imagenet preset",
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
        reason = _first_line(err)
        described = label + "".join(f" {k}={v}" for k, v in kwargs.items())
        raise WeightsFileError(f"{path}: does not fit the {described} backbone ({reason})"
                               f"{_file_hint(path, model)}") from err
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


def _first_line(err):
    """The first line of an error's message, whitespace folded, at most 240 characters."""
    return " ".join((str(err).strip().splitlines() or [type(err).__name__])[0].split())[:240]


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


def vgg16_ssd(images, width_multiplier=1.0, weights=None, batch_norm=False, fine_map=False):
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

    ``fine_map=True`` adds a stride-4 source before conv4_3 for objects a stride-8
    map localises poorly (under ~12 px): conv3_3 plus conv4_3 brought down by a
    1x1 conv and 2x nearest upsampling (one FPN top-down step), then a 3x3 conv and
    L2Normalization(20). Seven sources then, so seven aspect-ratio lists and
    eight anchor scales. Its layers are new, like the extras: in no backbone stage, so
    freezing pretrained stages never freezes them.
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
    conv3_3 = None
    blocks = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]
    for block, (filters, num_convs) in enumerate(blocks, start=1):
        names = [f"block{block}_conv{i}" for i in range(1, num_convs + 1)]
        for name in names:
            x = conv(filters, 3, name, padding="same")(x)
        pretrained += names
        if block == 3:
            conv3_3 = x
        if block == 4:
            if fine_map:
                sources.append(_fine_source(conv3_3, x, conv))
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
    # The fine map's boxes: half conv4_3's first scale, and the paper's boxes for the rest.
    fine_boxes = dict(anchor_scales=[0.05] + ssd_scales(6), aspect_ratios=[[2]] + SSD300_ASPECT_RATIOS) if fine_map else {}
    return BackboneFeatures(sources=sources, stages=stages, pretrained=pretrained, **fine_boxes)


def _fine_source(conv3_3, conv4_3, conv):
    """The stride-4 source of ``vgg16_ssd(fine_map=True)``: conv3_3 + upsampled conv4_3, 3x3 conv, L2 norm."""
    lateral = conv(256, 1, "fine_lateral")(conv4_3)
    fused = keras.layers.Add(name="fine_add")([conv3_3, upsample_like(lateral, conv3_3, "fine")])
    return L2Normalization(20.0, name="fine_norm")(conv(256, 3, "fine_conv", padding="same")(fused))


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


def fpn(images, trunk="resnet50", fpn_channels=256, width_multiplier=1.0, weights=None, neck="fpn"):
    """FPN (Lin et al. 2017) on a keras.applications trunk: sources P3..P7 (``neck``: kdet.models.necks'
    ``"fpn"`` or YOLOv8's ``"pan"``, on C3..C5).

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

    c3, c4, c5 = (trunk_model.get_layer(name).output for name in taps)
    sources = build_neck(neck, c3, c4, c5, scaled_filters(fpn_channels, width_multiplier))
    pretrained = [layer.name for layer in trunk_layers if layer.weights]
    return BackboneFeatures(sources=sources, stages=stages, pretrained=pretrained)


# ------------------------------------------------- keras-cv trunks: ImageNet presets and weight files
def _kerascv_source_weights(backbone_class, arguments, preset, label, weights):
    """Weights of the keras-cv trunk's layers that have any, in layer order: ``preset``'s or a file's; None: none.

    Fetched before kdet builds its graph, so an offline machine fails at once. A keras-cv preset holds the
    constructor arguments and a ``model.weights.h5``; that file (copied from a machine with internet) or one that
    the trunk's ``save_weights`` wrote is a weight file here.
    """
    if weights is None:
        return None
    if weights == "imagenet":
        try:
            source = backbone_class.from_preset(preset)
        except Exception as err:  # Kaggle download errors come in many types
            raise WeightsDownloadError(
                f"could not download ImageNet weights for {label} (keras-cv preset {preset!r}, "
                f"no internet?): {err}; use backbone_weights=None to train from scratch") from err
    else:
        path = os.fspath(weights)
        source = backbone_class(include_rescaling=True, **arguments)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                source.load_weights(path)
        except Exception as err:  # Keras raises ValueError / OSError / KeyError for files that do not fit
            raise WeightsFileError(f"{path}: does not fit the {label} backbone ({_first_line(err)}); expected "
                                   f"the model.weights.h5 of keras-cv's {preset!r} preset at the same "
                                   "width_multiplier") from err
    return [layer.get_weights() for layer in source.layers if layer.weights]


def _set_kerascv_weights(trunk_layers, source, label):
    """Copy ``_kerascv_source_weights`` into kdet's trunk, layer by layer in order (same constructor arguments)."""
    with_weights = [layer for layer in trunk_layers if layer.weights]
    if len(with_weights) != len(source):
        raise WeightsFileError(f"{label}: the weights hold {len(source)} layers, the backbone {len(with_weights)}")
    for layer, values in zip(with_weights, source):
        layer.set_weights(values)



def _stages_in_graph_order(layers, stage_of, count=5):
    """Layer names by ``stage_of(name)``; a layer it cannot place (None: unnamed) joins the layer before's stage."""
    stages, stage = [[] for _ in range(count)], 0
    for layer in layers:
        named = stage_of(layer.name)
        stage = named if named is not None else stage
        stages[stage].append(layer.name)
    return stages


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
    A weight file: the ``model.weights.h5`` of that preset, or one that the keras-cv trunk's ``save_weights`` wrote.
    """
    import keras_cv

    label = "MobileNetV3-Large"
    _check_weights(weights, label)
    if weights == "imagenet" and width_multiplier != 1.0:
        raise ValueError(f"{label}: ImageNet weights need width_multiplier=1.0, got {width_multiplier}")
    backbone_class = keras_cv.models.MobileNetV3Backbone
    arguments = dict(MOBILENETV3_LARGE, alpha=width_multiplier)
    source = _kerascv_source_weights(backbone_class, arguments, MOBILENETV3_LARGE_PRESET, label, weights)
    trunk = backbone_class(include_rescaling=True, input_tensor=images, **arguments)
    trunk_layers = [layer for layer in trunk.layers if not isinstance(layer, keras.layers.InputLayer)]
    if source is not None:
        _set_kerascv_weights(trunk_layers, source, label)
    c4 = trunk.get_layer("expanded_conv_12_depthwise_pad").input
    x = trunk.output
    sources = [c4, x]
    for k, filters in enumerate((512, 256, 256, 128), start=1):
        x = _ssdlite_extra_block(x, max(16, int(filters * width_multiplier)), f"ssdlite_extra{k}")
        sources.append(x)
    stages = _stages_in_graph_order(trunk_layers, _mobilenetv3_stage)  # unnamed: squeeze-excite, activations
    return BackboneFeatures(sources=sources, stages=stages, pretrained=[l.name for l in trunk_layers if l.weights],
                            head="separable", anchor_scales=list(SSDLITE_SCALES),
                            aspect_ratios=[list(r) for r in SSDLITE_ASPECT_RATIOS])


# ------------------------------------------ FPN on keras-cv backbones (their pyramid_level_inputs)
# The architectures as keras-cv constructor arguments (keras-cv's presets hold these plus weights).
RESNET50V2 = dict(stackwise_filters=[64, 128, 256, 512], stackwise_blocks=[3, 4, 6, 3],
                  stackwise_strides=[1, 2, 2, 2])              # preset resnet50_v2: 23,564,800 parameters
CSPDARKNET_TINY = dict(stackwise_channels=[48, 96, 192, 384],  # YOLOX-Tiny's CSPDarkNet: 2,380,416 parameters;
                       stackwise_depth=[1, 3, 3, 1])           # width 4/3 gives csp_darknet_s [64, ..., 512]
EFFICIENTNETV2_B0 = dict(                                      # keras.applications "efficientnetv2-b0" blocks
    width_coefficient=1.0, depth_coefficient=1.0, skip_connection_dropout=0.2,  # 5,919,312 parameters
    stackwise_kernel_sizes=[3, 3, 3, 3, 3, 3],
    stackwise_num_repeats=[1, 2, 2, 3, 5, 8],
    stackwise_input_filters=[32, 16, 32, 48, 96, 112],
    stackwise_output_filters=[16, 32, 48, 96, 112, 192],
    stackwise_expansion_ratios=[1, 4, 4, 4, 6, 6],
    stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.0, 0.25, 0.25, 0.25],
    stackwise_strides=[1, 2, 2, 2, 1, 2],
    stackwise_conv_types=["fused", "fused", "fused", "unfused", "unfused", "unfused"],
)


def _resnetv2_stage(name):
    """Stem (conv1, pool1: stride 4) 0, then ``v2_stack_i`` i + 1 (strides 4, 8, 16, 32); None: unnamed."""
    match = re.match(r"v2_stack_(\d)_", name)
    if match:
        return int(match.group(1)) + 1
    return 0 if name.startswith(("conv1_", "pool1_", "rescaling")) else None


def _cspdarknet_stage(name):
    """Stem (Focus + conv: stride 2) 0, then ``dark2..dark5`` 1..4 (strides 4, 8, 16, 32); None: unnamed."""
    match = re.match(r"dark(\d)_", name)
    if match:
        return int(match.group(1)) - 1
    return 0 if name.startswith(("stem_", "rescaling")) else None


def _efficientnetv2_stage(name):
    """By output stride: stem + block1 (2) 0, block2 (4) 1, block3 (8) 2, blocks 4-5 (16) 3, block6 + top (32) 4."""
    match = re.match(r"block(\d)[a-z]_", name)
    if match:
        return {1: 0, 2: 1, 3: 2, 4: 3, 5: 3, 6: 4}[int(match.group(1))]
    return 4 if name.startswith("top_") else 0 if name.startswith(("stem_", "rescaling")) else None


def _scaled_list(key, values, width_multiplier):
    return {key: [scaled_filters(v, width_multiplier) for v in values]}


@dataclass(frozen=True)
class KerasCVTrunk:
    label: str            # in messages
    backbone_class: str   # keras_cv.models class
    arguments: dict       # its constructor arguments (the architecture)
    preset: str           # keras-cv's ImageNet preset (Kaggle download)
    widen: object         # (arguments, width_multiplier) -> arguments at that width
    stage_of: object      # layer name -> stage 0..4 (None: an unnamed layer, joins the stage before it)
    even_input: bool = False  # the stem needs an even height and width


_KERASCV_FPN_TRUNKS = {
    # ResNetV2's 7x7 stem conv stays at 64 filters (keras-cv has no argument for it); the stacks scale.
    "resnet50v2": KerasCVTrunk(
        "ResNet50V2", "ResNetV2Backbone", RESNET50V2, "resnet50_v2_imagenet",
        lambda a, w: {**a, **_scaled_list("stackwise_filters", a["stackwise_filters"], w)}, _resnetv2_stage),
    "cspdarknet_tiny": KerasCVTrunk(
        "CSPDarkNet-Tiny", "CSPDarkNetBackbone", CSPDARKNET_TINY, "csp_darknet_tiny_imagenet",
        lambda a, w: {**a, **_scaled_list("stackwise_channels", a["stackwise_channels"], w)}, _cspdarknet_stage,
        even_input=True),
    "efficientnetv2_b0": KerasCVTrunk(
        "EfficientNetV2-B0", "EfficientNetV2Backbone", EFFICIENTNETV2_B0, "efficientnetv2_b0_imagenet",
        lambda a, w: {**a, "width_coefficient": a["width_coefficient"] * w}, _efficientnetv2_stage),
}


def kerascv_fpn(images, trunk, fpn_channels=256, width_multiplier=1.0, weights=None, neck="fpn"):
    """FPN (``neck``: kdet.models.necks' ``"fpn"`` or ``"pan"``) on a keras-cv backbone's
    ``pyramid_level_inputs`` P3, P4, P5: sources P3..P7.

    The trunk is built from its constructor arguments (``_KERASCV_FPN_TRUNKS``; offline, with keras-cv's
    ``include_rescaling``: pixels / 255, as its presets were trained). ``width_multiplier`` scales
    ``fpn_channels`` (min 8) and the trunk: ResNet50V2's stack filters (the stem stays 64), CSPDarkNet's stack
    channels, EfficientNetV2's ``width_coefficient`` (depth stays). ``weights="imagenet"`` loads keras-cv's
    preset (width 1 only; offline: ``WeightsDownloadError``); a weight file is that preset's ``model.weights.h5``.
    Five stages by stride (2 or 4, 4, 8, 16, 32) for freezing; trunk layers past P5 (ResNetV2's ``post_bn``)
    are not in the detector.
    """
    import keras_cv

    spec = _KERASCV_FPN_TRUNKS[trunk]
    _check_weights(weights, spec.label)
    if weights == "imagenet" and width_multiplier != 1.0:
        raise ValueError(f"{spec.label}: ImageNet weights need width_multiplier=1.0, got {width_multiplier}")
    height, width = images.shape[1:3]
    if spec.even_input and (height % 2 or width % 2):
        raise ValueError(f"{trunk}_fpn: image_size must be even (the Focus stem takes 2x2 pixel blocks), "
                         f"got {height}x{width}")
    backbone_class = getattr(keras_cv.models, spec.backbone_class)
    arguments = spec.widen(spec.arguments, width_multiplier)
    source = _kerascv_source_weights(backbone_class, arguments, spec.preset, spec.label, weights)
    model = backbone_class(include_rescaling=True, input_tensor=images, **arguments)
    if source is not None:
        _set_kerascv_weights([layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)],
                             source, spec.label)
    levels = [model.get_layer(model.pyramid_level_inputs[f"P{i}"]).output for i in (3, 4, 5)]
    used = [layer for layer in keras.Model(images, levels).layers  # graph order; drops layers past P5
            if not isinstance(layer, keras.layers.InputLayer)]
    stages = _stages_in_graph_order(used, spec.stage_of)
    sources = build_neck(neck, *levels, scaled_filters(fpn_channels, width_multiplier))
    pretrained = [name for stage_names in stages for name in stage_names if model.get_layer(name).weights]
    return BackboneFeatures(sources=sources, stages=stages, pretrained=pretrained)


def build_backbone(images, backbone="vgg16", width_multiplier=1.0, weights=None, fpn_channels=256,
                   fine_map=False, neck="fpn"):
    """Dispatch on the backbone name (one of ``BACKBONES``); ``fine_map`` is for the VGG16 bases only,
    ``neck`` (one of ``NECKS``) for the ``*_fpn`` backbones only."""
    if fine_map and backbone not in VGG16_BACKBONES:
        raise ValueError(f"fine_map=True (a stride-4 source) is built for backbones 'vgg16' and 'vgg16_bn', "
                         f"not {backbone!r}")
    if neck not in NECKS:
        raise ValueError(f"unknown neck {neck!r}; expected one of {NECKS}")
    if neck != "fpn" and not backbone.endswith("_fpn"):
        raise ValueError(f"neck={neck!r} is built for the *_fpn backbones, not {backbone!r}")
    if backbone == "mobilenetv3_large_ssdlite":
        return mobilenetv3_large_ssdlite(images, width_multiplier=width_multiplier, weights=weights)
    if backbone in VGG16_BACKBONES:
        return vgg16_ssd(images, width_multiplier=width_multiplier, weights=weights,
                         batch_norm=backbone == "vgg16_bn", fine_map=fine_map)
    if backbone.endswith("_fpn") and backbone[: -len("_fpn")] in _KERASCV_FPN_TRUNKS:
        return kerascv_fpn(images, trunk=backbone[: -len("_fpn")], fpn_channels=fpn_channels,
                           width_multiplier=width_multiplier, weights=weights, neck=neck)
    if backbone.endswith("_fpn") and backbone in BACKBONES:
        return fpn(images, trunk=backbone[: -len("_fpn")], fpn_channels=fpn_channels,
                   width_multiplier=width_multiplier, weights=weights, neck=neck)
    raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
