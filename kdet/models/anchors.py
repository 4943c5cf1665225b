"""SSD default boxes (anchors): scales, boxes and the ``AnchorBoxes`` layer.

Boxes are normalised ``xyxy`` (docs/CONVENTIONS.md). Their order matches the
heads' outputs: map by map, cells row-major (y, then x), and within a cell

    ratio 1 at scale s_k, ratio 1 at sqrt(s_k * s_{k+1}), then r and 1/r
    for each aspect ratio r of that map,

as in ssd.pytorch ``PriorBox`` and torchvision ``DefaultBoxGenerator``. A box
of scale s and ratio r has normalised width ``s * sqrt(r)`` and height
``s / sqrt(r)`` (relative to image width and height respectively, like
torchvision; on a square input they are square in pixels for r = 1).
"""

import math
import numbers

import keras
import numpy as np
from keras import ops

# The paper's SSD300 aspect ratios, torchvision style (1 and 1' are implicit).
SSD300_ASPECT_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]


def ssd_scales(num_maps=6, s_min=0.2, s_max=0.9, first_scale=0.1):
    """Box scales s_1..s_{m+1} (fractions of the image side), ``num_maps + 1`` values.

    Convention of the SSD paper's Caffe code (``ssd_pascal.py``), which
    ssd.pytorch's ``PriorBox`` config reproduces as pixel sizes on 300x300:
    the first map (conv4_3) gets ``first_scale``; the remaining ``m - 1`` maps
    are spaced linearly from ``s_min`` with a step of
    ``floor(100 * (s_max - s_min) / (m - 2)) / 100`` (whole percents), and one
    more step past the last map gives s_{m+1} for its extra square box
    ``sqrt(s_m * s_{m+1})``. The defaults give

        [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05]

    = ssd.pytorch VOC ``min_sizes`` [30, 60, 111, 162, 213, 264] / 300 plus
    ``max_sizes[-1]`` 315 / 300. (torchvision's ``ssd300_vgg16`` uses the COCO
    variant ``[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]``: pass it as
    ``anchor_scales`` explicitly if wanted.) With ``first_scale=None`` all
    ``m`` maps are spaced linearly from ``s_min`` to ``s_max`` the same way.
    """
    if num_maps < 1:
        raise ValueError(f"ssd_scales: num_maps must be >= 1, got {num_maps}")
    linear_maps = num_maps - 1 if first_scale is not None else num_maps
    head = [] if first_scale is None else [float(first_scale)]
    if linear_maps == 0:
        return head + [float(s_min)]
    if linear_maps == 1:
        step = s_max - s_min
    else:
        percent = round(100 * (s_max - s_min), 6)  # round away float noise first
        step = math.floor(percent / (linear_maps - 1)) / 100
    linear = [s_min + i * step for i in range(linear_maps + 1)]
    return [round(s, 6) for s in head + linear]


def boxes_per_location(aspect_ratios):
    """Boxes per cell for each map: two squares plus r and 1/r per ratio."""
    return [2 + 2 * len(ratios) for ratios in aspect_ratios]


def _pair(value):
    if isinstance(value, numbers.Number):
        return value, value
    if len(value) != 2:
        raise ValueError(f"expected a number or a pair (h, w), got {value!r}")
    return value[0], value[1]


def _cell_box_sizes(scale, next_scale, ratios):
    """``[n, 2]`` (width, height) of the boxes of one cell, in head order."""
    sizes = [(scale, scale)]
    extra = math.sqrt(scale * next_scale)
    sizes.append((extra, extra))
    for r in ratios:
        root = math.sqrt(r)
        sizes.append((scale * root, scale / root))
        sizes.append((scale / root, scale * root))
    return np.asarray(sizes, dtype=np.float64)


def default_boxes(feature_map_sizes, scales, aspect_ratios, clip=True, steps=None):
    """All default boxes ``[A, 4]`` float32, normalised ``xyxy``, in head order.

    Args:
        feature_map_sizes: per map an int (square) or ``(height, width)``.
        scales: ``len(feature_map_sizes) + 1`` scales (see ``ssd_scales``).
        aspect_ratios: per map a list of ratios r > 0 (each adds r and 1/r).
        clip: clip the corners to ``[0, 1]``. (ssd.pytorch clamps the
            centre form instead; clipping corners keeps boxes in the image.)
        steps: per map the distance between cell centres as a fraction of the
            image, a number or ``(step_y, step_x)``; ``None`` means
            ``1 / map size`` (the paper). ssd.pytorch's pixel steps
            [8, 16, 32, 64, 100, 300] on 300x300 are ``[s / 300 for s in ...]``.
            Centres are ``(i + 0.5) * step``.
    """
    num_maps = len(feature_map_sizes)
    if len(aspect_ratios) != num_maps:
        raise ValueError(
            f"default_boxes: {num_maps} feature maps but {len(aspect_ratios)} aspect-ratio lists")
    if len(scales) != num_maps + 1:
        raise ValueError(
            f"default_boxes: need {num_maps + 1} scales for {num_maps} maps "
            f"(the last one sizes the extra square box), got {len(scales)}")
    if steps is not None and len(steps) != num_maps:
        raise ValueError(f"default_boxes: {num_maps} feature maps but {len(steps)} steps")

    all_boxes = []
    for k, size in enumerate(feature_map_sizes):
        height, width = (int(v) for v in _pair(size))
        step_y, step_x = (1.0 / height, 1.0 / width) if steps is None else _pair(steps[k])
        cy, cx = np.meshgrid((np.arange(height) + 0.5) * step_y,
                             (np.arange(width) + 0.5) * step_x, indexing="ij")
        centres = np.stack([cx.ravel(), cy.ravel()], axis=-1)          # [cells, 2]
        sizes = _cell_box_sizes(scales[k], scales[k + 1], aspect_ratios[k])  # [n, 2]
        centres = np.repeat(centres, len(sizes), axis=0)
        sizes = np.tile(sizes, (height * width, 1))
        all_boxes.append(np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=-1))
    boxes = np.concatenate(all_boxes, axis=0)
    if clip:
        boxes = np.clip(boxes, 0.0, 1.0)
    return boxes.astype(np.float32)


@keras.saving.register_keras_serializable(package="kdet")
class AnchorBoxes(keras.layers.Layer):
    """Default boxes for a list of feature maps, broadcast to the batch.

    Called on the source feature maps (``[B, H_k, W_k, C_k]``, static H and W),
    returns ``[B, A, 4]`` normalised ``xyxy`` boxes equal to
    ``default_boxes([(H_k, W_k), ...], scales, aspect_ratios, clip, steps)``.
    The boxes are constants: the layer has no weights.
    """

    def __init__(self, scales, aspect_ratios, clip=True, steps=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.scales = [float(s) for s in scales]
        self.aspect_ratios = [[float(r) for r in ratios] for ratios in aspect_ratios]
        self.clip = bool(clip)
        self.steps = None if steps is None else [
            float(s) if isinstance(s, numbers.Number) else [float(v) for v in s] for s in steps]

    def boxes_for(self, feature_map_sizes):
        """The numpy boxes ``[A, 4]`` for the given ``(H, W)`` sizes."""
        return default_boxes(feature_map_sizes, self.scales, self.aspect_ratios,
                             clip=self.clip, steps=self.steps)

    @staticmethod
    def _map_sizes(shapes):
        sizes = [tuple(shape[1:3]) for shape in shapes]
        if any(d is None for size in sizes for d in size):
            raise ValueError(f"AnchorBoxes needs static feature-map sizes, got {sizes}")
        return sizes

    def call(self, feature_maps):
        boxes = self.boxes_for(self._map_sizes([ops.shape(f) for f in feature_maps]))
        boxes = ops.convert_to_tensor(boxes, dtype=self.compute_dtype)
        batch = ops.shape(feature_maps[0])[0]
        return ops.broadcast_to(ops.expand_dims(boxes, 0), (batch,) + tuple(boxes.shape))

    def compute_output_shape(self, input_shapes):
        num_boxes = len(self.boxes_for(self._map_sizes(input_shapes)))
        return (input_shapes[0][0], num_boxes, 4)

    def get_config(self):
        config = super().get_config()
        config.update(scales=self.scales, aspect_ratios=self.aspect_ratios,
                      clip=self.clip, steps=self.steps)
        return config
