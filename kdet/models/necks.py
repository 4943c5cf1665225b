"""Necks of the FPN-family backbones: C3, C4, C5 (strides 8, 16, 32) in, SSD sources P3..P7 out.

* ``fpn_neck``: Lin et al. 2017 as torchvision builds it: linear 1x1 laterals, a top-down
  pathway of upsampling + addition, one 3x3 conv per level, P6/P7 as stride-2 convs.
* ``pan_neck``: the path-aggregation neck of YOLOv8 (PANet's bottom-up path on top of the
  top-down one): every fusion is a concatenation followed by a C2f block (convs with
  BatchNorm and SiLU), so the SSD heads read features that went through non-linear
  fusion rather than a sum of linear projections.

Both return five maps of ``channels`` channels: ``[P3, P4, P5, P6, P7]``.
"""

import keras

NECKS = ("fpn", "pan")


def upsample_like(x, target, name):
    """Nearest 2x upsampling of ``x``, cropped to ``target``'s size (odd sizes)."""
    x = keras.layers.UpSampling2D(2, interpolation="nearest", name=f"{name}_upsample")(x)
    extra_h = x.shape[1] - target.shape[1]
    extra_w = x.shape[2] - target.shape[2]
    if extra_h or extra_w:
        x = keras.layers.Cropping2D(((0, extra_h), (0, extra_w)), name=f"{name}_crop")(x)
    return x


def build_neck(neck, c3, c4, c5, channels):
    """``fpn_neck`` or ``pan_neck`` by name (one of ``NECKS``)."""
    if neck == "fpn":
        return fpn_neck(c3, c4, c5, channels)
    if neck == "pan":
        return pan_neck(c3, c4, c5, channels)
    raise ValueError(f"unknown neck {neck!r}; expected one of {NECKS}")


def fpn_neck(c3, c4, c5, channels):
    """The FPN neck (Lin et al. 2017) on C3..C5 (strides 8, 16, 32): ``[P3, P4, P5, P6, P7]``.

    1x1 laterals, a top-down pathway of nearest 2x upsampling + addition, and 3x3
    smoothing; P6 is a 3x3 stride-2 conv on P5 and P7 a 3x3 stride-2 conv on ReLU(P6)
    (torchvision ``LastLevelP6P7``). ``channels`` for every level.
    """
    laterals = [keras.layers.Conv2D(channels, 1, name=f"fpn_lateral_c{i}")(c)
                for i, c in zip((3, 4, 5), (c3, c4, c5))]
    p5 = laterals[2]
    p4 = keras.layers.Add(name="fpn_p4_add")([laterals[1], upsample_like(p5, laterals[1], "fpn_p5")])
    p3 = keras.layers.Add(name="fpn_p3_add")([laterals[0], upsample_like(p4, laterals[0], "fpn_p4")])
    outputs = [keras.layers.Conv2D(channels, 3, padding="same", name=f"fpn_output_p{i}")(p)
               for i, p in zip((3, 4, 5), (p3, p4, p5))]
    p6 = keras.layers.Conv2D(channels, 3, strides=2, padding="same", name="fpn_p6")(outputs[2])
    p7 = keras.layers.ReLU(name="fpn_p6_relu")(p6)
    p7 = keras.layers.Conv2D(channels, 3, strides=2, padding="same", name="fpn_p7")(p7)
    return outputs + [p6, p7]


def pan_neck(c3, c4, c5, channels):
    """YOLOv8's PAN neck on C3..C5 (strides 8, 16, 32): ``[P3, P4, P5, P6, P7]``, all ``channels`` wide.

    Top-down: P5's 1x1 reduction is upsampled and concatenated with C4, a C2f block fuses
    them; the same again into C3 gives P3. Bottom-up: a 3x3 stride-2 conv of P3 joins the
    top-down P4 (C2f: the output P4), a stride-2 conv of that joins the reduced C5 (the
    output P5). P6 and P7 are 3x3 stride-2 conv-BN-SiLU on P5 and P6. Every conv but the
    C2f's own is conv-BN-SiLU, as in YOLOv8.
    """
    top5 = conv_bn_silu(c5, channels, 1, "pan_reduce_c5")
    top4 = _c2f(keras.layers.Concatenate(name="pan_join_td4")(
        [upsample_like(top5, c4, "pan_td5"), c4]), channels, "pan_td4")
    p3 = _c2f(keras.layers.Concatenate(name="pan_join_td3")(
        [upsample_like(top4, c3, "pan_td4"), c3]), channels, "pan_out3")
    p4 = _c2f(keras.layers.Concatenate(name="pan_join_bu4")(
        [conv_bn_silu(p3, channels, 3, "pan_down3", strides=2, like=top4), top4]), channels, "pan_out4")
    p5 = _c2f(keras.layers.Concatenate(name="pan_join_bu5")(
        [conv_bn_silu(p4, channels, 3, "pan_down4", strides=2, like=top5), top5]), channels, "pan_out5")
    p6 = conv_bn_silu(p5, channels, 3, "pan_p6", strides=2)
    p7 = conv_bn_silu(p6, channels, 3, "pan_p7", strides=2)
    return [p3, p4, p5, p6, p7]


def conv_bn_silu(x, filters, kernel, name, strides=1, like=None):
    """Conv (no bias) + BatchNorm + SiLU; ``like``: crop a stride-2 output to that map's size (odd sizes)."""
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=0.97, epsilon=1e-3, name=f"{name}_bn")(x)
    x = keras.layers.Activation("silu", name=f"{name}_silu")(x)
    if like is not None and tuple(x.shape[1:3]) != tuple(like.shape[1:3]):
        x = keras.layers.Cropping2D(((0, x.shape[1] - like.shape[1]), (0, x.shape[2] - like.shape[2])),
                                    name=f"{name}_crop")(x)
    return x


def _c2f(x, filters, name):
    """A C2f block with one bottleneck (YOLOv8): two 1x1 halves, the second through a residual
    pair of 3x3 convs, the three parts concatenated and fused by a 1x1 conv. (YOLOv8 splits one
    1x1 conv's output in two; two 1x1 convs are the same and need no Lambda layer to save.)"""
    half = max(8, filters // 2)
    first = conv_bn_silu(x, half, 1, f"{name}_in_a")
    second = conv_bn_silu(x, half, 1, f"{name}_in_b")
    inner = conv_bn_silu(second, half, 3, f"{name}_b1")
    inner = conv_bn_silu(inner, half, 3, f"{name}_b2")
    inner = keras.layers.Add(name=f"{name}_residual")([second, inner])
    x = keras.layers.Concatenate(name=f"{name}_concat")([first, second, inner])
    return conv_bn_silu(x, filters, 1, f"{name}_out")
