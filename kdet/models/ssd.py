"""The SSD detector (Liu et al. 2016) as a functional Keras model.

``SSD`` builds backbone -> per-map 3x3 conv heads -> one output tensor
``[B, A, 4 + (1 + num_classes) + 4]``: encoded box offsets, class logits
(background first) and the anchors (normalised ``xyxy``), see
docs/CONVENTIONS.md "Raw predictions". ``detect`` decodes them (kdet.postprocess) and
``compile`` defaults to the MultiBox loss (kdet.losses).
"""

import functools
import math

import keras

import kdet.losses  # noqa: F401  registers MultiBoxLoss, so load_model restores the compiled loss
import kdet.training.optim  # noqa: F401  registers kdet's optimizers and schedules
from kdet.models.anchors import (SSD300_ASPECT_RATIOS, AnchorBoxes, boxes_per_location,
                                 ssd_scales)
from kdet.models.backbones import build_backbone
from kdet.models.necks import conv_bn_silu


def default_aspect_ratios(num_maps):
    """The paper's pattern: [2] on the first and last two maps, [2, 3] between.

    Six maps give exactly the paper's ``[[2], [2, 3], [2, 3], [2, 3], [2], [2]]``.
    """
    if num_maps == 6:
        return [list(r) for r in SSD300_ASPECT_RATIOS]
    if num_maps <= 3:
        return [[2] for _ in range(num_maps)]
    return [[2]] + [[2, 3] for _ in range(num_maps - 3)] + [[2], [2]]


def _image_hw(image_size):
    if isinstance(image_size, int):
        return image_size, image_size
    if len(image_size) != 2:
        raise ValueError(f"SSD: image_size must be an int or (height, width), got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _separable_head(sources, boxes_per_map, channels_per_box, name, bias_initializer="zeros"):
    """SSDLite head (torchvision ``_prediction_block``): depthwise 3x3 + BN + ReLU6, then a 1x1 conv, per map."""
    outputs = []
    for k, (source, boxes) in enumerate(zip(sources, boxes_per_map)):
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"{name}_{k}_depthwise")(source)
        x = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.97, name=f"{name}_{k}_bn")(x)
        x = keras.layers.ReLU(6.0, name=f"{name}_{k}_relu")(x)
        x = keras.layers.Conv2D(boxes * channels_per_box, 1, bias_initializer=bias_initializer, name=f"{name}_{k}")(x)
        outputs.append(keras.layers.Reshape((-1, channels_per_box), name=f"{name}_{k}_reshape")(x))
    if len(outputs) == 1:
        return outputs[0]
    return keras.layers.Concatenate(axis=1, name=f"{name}_concat")(outputs)


def _head(sources, boxes_per_map, channels_per_box, name, bias_initializer="zeros", convs=0):
    """3x3 conv per map, reshaped to ``[B, H*W*boxes, channels]`` and concatenated.

    ``convs`` > 0 puts that many 3x3 conv + BN + SiLU layers (the map's channels) in front of
    the predicting conv, one tower per map and per head (YOLOv8's decoupled head branches).
    The reshape runs over cells row-major (y, x) then the boxes of a cell,
    the order of ``default_boxes``.
    """
    outputs = []
    for k, (source, boxes) in enumerate(zip(sources, boxes_per_map)):
        x = source
        for i in range(convs):
            x = conv_bn_silu(x, source.shape[-1], 3, f"{name}_{k}_tower{i}")
        x = keras.layers.Conv2D(boxes * channels_per_box, 3, padding="same", name=f"{name}_{k}",
                                bias_initializer=bias_initializer)(x)
        outputs.append(keras.layers.Reshape((-1, channels_per_box), name=f"{name}_{k}_reshape")(x))
    if len(outputs) == 1:
        return outputs[0]
    return keras.layers.Concatenate(axis=1, name=f"{name}_concat")(outputs)


SCORE_ACTIVATIONS = ("softmax", "sigmoid")
SIGMOID_PRIOR = 0.01  # RetinaNet: every class starts at probability 0.01, so the focal loss starts small


def _class_bias(score_activation):
    if score_activation == "sigmoid":
        return keras.initializers.Constant(-math.log((1 - SIGMOID_PRIOR) / SIGMOID_PRIOR))
    return "zeros"


@keras.saving.register_keras_serializable(package="kdet")
class SSD(keras.Model):
    """Single Shot MultiBox Detector.

    Args:
        num_classes: foreground classes C (logits have 1 + C channels).
        image_size: int or ``(height, width)``; the input is
            ``[B, H, W, 3]`` RGB float 0..255 and the model normalises it.
        backbone: ``"vgg16"`` (the paper's SSD base, 6 maps), ``"vgg16_bn"`` (with BatchNorm, for
            training from scratch),
            ``"resnet50_fpn"`` or ``"mobilenetv2_fpn"`` (P3..P7, 5 maps), ``"mobilenetv3_large_ssdlite"``
            (torchvision's SSDLite320: keras-cv MobileNetV3-Large, 6 maps, separable heads, its own anchors),
            ``"resnet50v2_fpn"``, ``"cspdarknet_tiny_fpn"`` or ``"efficientnetv2_b0_fpn"`` (P3..P7 on keras-cv
            backbones' ``pyramid_level_inputs``).
        width_multiplier: scales the backbone's convs (see ``backbones``).
        backbone_weights: ``None`` (from scratch), ``"imagenet"`` or the path of a keras.applications
            weight file for the backbone (e.g. ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``
            copied from a machine with internet; see ``backbones``).
        anchor_scales: ``num_maps + 1`` scales; default ``ssd_scales(num_maps)``.
        aspect_ratios: per map ratio lists; default ``default_aspect_ratios``.
        clip_anchors: clip anchors to the image.
        anchor_steps: optional per-map centre spacing (see ``default_boxes``).
        fpn_channels: channels of the FPN maps (FPN backbones only).
        neck: ``"fpn"`` (Lin et al.'s linear top-down neck) or ``"pan"`` (YOLOv8's path-aggregation
            neck: top-down and bottom-up fusion by C2f blocks with BatchNorm and SiLU); ``*_fpn`` backbones only.
        head_convs: 3x3 conv + BN + SiLU layers in front of each map's box and class predictor
            (0: SSD's single linear conv; 2: YOLOv8's branch depth); not with the separable heads.
        score_activation: ``"softmax"`` (over background + classes; SSD's) or ``"sigmoid"``
            (per class, background logit unused) for models trained with a sigmoid class loss
            (``loss.cls_loss`` "focal" / "quality_focal" / "varifocal"; the engine sets it).
            ``detect``, the SavedModel export and the evaluation callback use it; with
            ``"sigmoid"`` the class logits start at RetinaNet's prior of 0.01.

    Attributes: ``num_classes``, ``anchors`` (numpy ``[A, 4]``),
    ``feature_map_sizes``, ``anchors_per_level`` (anchors of each map, in
    order), ``backbone_stages`` (lists of layer names, input
    side first), ``backbone_layer_names`` (layers ImageNet weights fill) and
    ``new_layer_names`` (every other layer with weights).

    Returns:
        a ``keras.Model`` whose one output is ``[B, A, 4 + (1 + num_classes) + 4]``
        (docs/CONVENTIONS.md "Raw predictions"); ``detect`` decodes it.

    Example:
        A small SSD from scratch (no download), its anchors and its output layout:

        >>> model = SSD(num_classes=3, image_size=64, backbone="vgg16_bn", width_multiplier=0.125)
        >>> model.feature_map_sizes[:3], model.anchors.shape
        ([(8, 8), (4, 4), (2, 2)], (390, 4))
        >>> model.output_shape
        (None, 390, 12)
    """

    def __init__(self, num_classes: int, image_size=300, backbone: str = "vgg16", width_multiplier: float = 1.0,
                 backbone_weights=None, anchor_scales=None, aspect_ratios=None,
                 clip_anchors: bool = True, anchor_steps=None, fpn_channels: int = 256,
                 score_activation: str = "softmax", fine_map: bool = False, neck: str = "fpn",
                 head_convs: int = 0, **kwargs):
        if int(num_classes) < 1:
            raise ValueError(f"SSD: num_classes must be >= 1, got {num_classes}")
        if score_activation not in SCORE_ACTIVATIONS:
            raise ValueError(f"SSD: score_activation must be one of {SCORE_ACTIVATIONS}, got {score_activation!r}")
        if int(head_convs) < 0:
            raise ValueError(f"SSD: head_convs must be >= 0, got {head_convs}")
        height, width = _image_hw(image_size)

        # === Functional graph ===
        images = keras.Input((height, width, 3), name="images")
        features = build_backbone(images, backbone, width_multiplier=width_multiplier,
                                  weights=backbone_weights, fpn_channels=fpn_channels, fine_map=fine_map,
                                  neck=neck)
        sources = features.sources
        num_maps = len(sources)
        ratios = aspect_ratios if aspect_ratios is not None else (
            features.aspect_ratios or default_aspect_ratios(num_maps))
        scales = anchor_scales if anchor_scales is not None else (features.anchor_scales or ssd_scales(num_maps))
        if len(ratios) != num_maps:
            raise ValueError(f"SSD: backbone {backbone!r} has {num_maps} feature maps "
                             f"but aspect_ratios has {len(ratios)} entries")
        if len(scales) != num_maps + 1:
            raise ValueError(f"SSD: backbone {backbone!r} has {num_maps} feature maps, so "
                             f"anchor_scales needs {num_maps + 1} values, got {len(scales)}")

        boxes_per_map = boxes_per_location(ratios)
        if features.head == "separable":
            if int(head_convs):
                raise ValueError(f"SSD: head_convs is for the conv heads, not {backbone!r}'s separable heads")
            head = _separable_head
        else:
            head = functools.partial(_head, convs=int(head_convs))
        offsets = head(sources, boxes_per_map, 4, "box_head")
        logits = head(sources, boxes_per_map, 1 + int(num_classes), "class_head",
                      bias_initializer=_class_bias(score_activation))
        anchor_layer = AnchorBoxes(scales, ratios, clip=clip_anchors, steps=anchor_steps,
                                   name="anchors")
        anchors = anchor_layer(sources)
        predictions = keras.layers.Concatenate(axis=-1, dtype="float32", name="predictions")(
            [offsets, logits, anchors])
        super().__init__(inputs=images, outputs=predictions, **kwargs)

        # === Config ===
        self.num_classes = int(num_classes)
        self.image_size = list(image_size) if not isinstance(image_size, int) else image_size
        self.backbone = backbone
        self.width_multiplier = width_multiplier
        self.backbone_weights = backbone_weights
        self.anchor_scales = anchor_scales
        self.aspect_ratios = aspect_ratios
        self.clip_anchors = clip_anchors
        self.anchor_steps = anchor_steps
        self.fpn_channels = fpn_channels
        self.score_activation = score_activation
        self.fine_map = bool(fine_map)
        self.neck = neck
        self.head_convs = int(head_convs)

        # === Derived attributes ===
        self.feature_map_sizes = [tuple(s.shape[1:3]) for s in sources]
        self.anchors = anchor_layer.boxes_for(self.feature_map_sizes)
        self.anchors_per_level = [h * w * n for (h, w), n in zip(self.feature_map_sizes, boxes_per_map)]
        self.backbone_stages = [list(stage) for stage in features.stages]
        self.backbone_layer_names = list(features.pretrained)
        pretrained = set(features.pretrained)
        self.new_layer_names = [layer.name for layer in self.layers
                                if layer.weights and layer.name not in pretrained]

    # === Inference and training hooks ===
    def detect(self, images, **nms) -> dict:
        """Decoded, NMS-ed detections for RGB 0..255 images at the model's input size.

        Args:
            images: ``[B, H, W, 3]`` RGB 0..255 (uint8 or float) at the model's input size.
            **nms: settings of `kdet.postprocess.decode_detections` (``score_threshold``,
                ``iou_threshold``, ``max_detections``, ``pre_nms_top_k``, ``class_agnostic``,
                ``per_class_top_k``); each defaults to ``kdet.defaults.NMS_DEFAULTS``.

        Returns:
            docs/CONVENTIONS.md "Detections": ``boxes`` (normalised xyxy), ``scores``,
            ``classes`` (0-based, -1 padding), ``num_detections``.

        Example:
            >>> import numpy as np
            >>> model = SSD(num_classes=2, image_size=64, backbone="vgg16_bn", width_multiplier=0.125)
            >>> dets = model.detect(np.zeros((2, 64, 64, 3), "uint8"), max_detections=5, score_threshold=0.2)
            >>> tuple(dets["boxes"].shape), tuple(dets["classes"].shape), tuple(dets["num_detections"].shape)
            ((2, 5, 4), (2, 5), (2,))
        """
        from kdet.postprocess import decode_detections

        return decode_detections(self(images, training=False), **nms, score_activation=self.score_activation)

    def compile(self, optimizer="adam", loss=None, **kwargs):
        """``keras.Model.compile`` whose ``loss`` defaults to the SSD MultiBox loss."""
        if loss is None:
            from kdet.losses import MultiBoxLoss

            loss = MultiBoxLoss(num_classes=self.num_classes)
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def compile_from_config(self, config):
        """Recompile on ``load_model`` (Keras skips models whose ``compile`` is overridden)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built and getattr(self, "optimizer", None) is not None:
            self.optimizer.build(self.trainable_variables)  # so saved optimizer state loads

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "backbone": self.backbone,
            "width_multiplier": self.width_multiplier,
            "backbone_weights": None,  # reloading restores saved weights, never downloads
            "anchor_scales": self.anchor_scales,
            "aspect_ratios": self.aspect_ratios,
            "clip_anchors": self.clip_anchors,
            "anchor_steps": self.anchor_steps,
            "fpn_channels": self.fpn_channels,
            "score_activation": self.score_activation,
            "fine_map": self.fine_map,
            "neck": self.neck,
            "head_convs": self.head_convs,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def load_model(path, **kwargs):
    """``keras.models.load_model`` with every kdet class registered (model, loss, schedules)."""
    return keras.models.load_model(path, **kwargs)
