"""Box convention and conversions. See docs/CONVENTIONS.md for the rules.

kdet boxes are corners ``xyxy`` in continuous coordinates: absolute pixels in
records, normalised to ``[0, 1]`` on the model side. The numpy helpers here
convert at the data edges; the ``keras.ops`` helpers serve model-side code.
"""

import numpy as np


# ---------------------------------------------------------------- numpy edges
def voc_to_xyxy(voc_boxes):
    """PASCAL VOC 1-based inclusive pixel indices -> kdet pixel corners."""
    b = np.asarray(voc_boxes, dtype=np.float32).reshape(-1, 4)
    return np.stack([b[:, 0] - 1, b[:, 1] - 1, b[:, 2], b[:, 3]], axis=1)


def xyxy_to_voc(boxes):
    """kdet pixel corners -> PASCAL VOC 1-based inclusive pixel indices."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.stack([b[:, 0] + 1, b[:, 1] + 1, b[:, 2], b[:, 3]], axis=1)


def coco_to_xyxy(coco_boxes):
    """COCO ``[x, y, w, h]`` -> kdet pixel corners."""
    b = np.asarray(coco_boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)


def xyxy_to_coco(boxes):
    """kdet pixel corners -> COCO ``[x, y, w, h]``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def yolo_to_xyxy(yolo_boxes, width, height):
    """YOLO txt ``(cx, cy, w, h)`` normalised to the image -> kdet pixel corners (float64)."""
    b = np.asarray(yolo_boxes, dtype=np.float64).reshape(-1, 4)
    cx, cy, w, h = b[:, 0] * width, b[:, 1] * height, b[:, 2] * width, b[:, 3] * height
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def xyxy_to_yolo(boxes, width, height):
    """kdet pixel corners -> YOLO txt ``(cx, cy, w, h)`` normalised to the image (float64)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([(b[:, 0] + b[:, 2]) / 2 / width, (b[:, 1] + b[:, 3]) / 2 / height,
                     (b[:, 2] - b[:, 0]) / width, (b[:, 3] - b[:, 1]) / height], axis=1)


def normalize(boxes, width, height):
    """Pixel corners -> normalised corners."""
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / scale


def denormalize(boxes, width, height):
    """Normalised corners -> pixel corners."""
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale


def xyxy_to_yxyx(boxes):
    """kdet corners -> TF Object Detection API order ``(ymin, xmin, ymax, xmax)``."""
    b = np.asarray(boxes)
    return b[..., [1, 0, 3, 2]]


def box_area_np(boxes):
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def iou_matrix_np(boxes_a, boxes_b):
    """Pairwise IoU ``[len(a), len(b)]`` of corner boxes, in float64."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area_np(a)[:, None] + box_area_np(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# ------------------------------------------------------------ keras.ops (model)
# keras is imported inside the functions so host-side users (metrics, audits,
# the eval tool) do not pay the backend import.
def box_area(boxes):
    """Area of corner boxes ``[..., 4]`` (0 for inverted boxes)."""
    from keras import ops

    w = ops.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    h = ops.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return w * h


def iou_matrix(boxes_a, boxes_b):
    """Pairwise IoU of ``[..., N, 4]`` and ``[..., M, 4]`` -> ``[..., N, M]``."""
    from keras import ops

    # one coordinate at a time on [..., N, M]: no [..., N, M, 2] intermediates (3x faster on a CPU)
    ax1, ay1, ax2, ay2 = (ops.expand_dims(boxes_a[..., i], -1) for i in range(4))
    bx1, by1, bx2, by2 = (ops.expand_dims(boxes_b[..., i], -2) for i in range(4))
    inter = (ops.maximum(ops.minimum(ax2, bx2) - ops.maximum(ax1, bx1), 0.0)
             * ops.maximum(ops.minimum(ay2, by2) - ops.maximum(ay1, by1), 0.0))
    union = ops.expand_dims(box_area(boxes_a), -1) + ops.expand_dims(box_area(boxes_b), -2) - inter
    return ops.where(union > 0, inter / ops.maximum(union, 1e-12), 0.0)


def xyxy_to_cxcywh(boxes):
    from keras import ops

    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    return ops.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes):
    from keras import ops

    cx, cy, w, h = (boxes[..., i] for i in range(4))
    return ops.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)
