"""The SSD MultiBox loss (``keras.ops`` only) and a non-finite check.

Layouts follow docs/CONVENTIONS.md: ``y_true [B, M, 6]`` (normalised xyxy,
class id, ignore flag; padding rows have class -1) and
``y_pred [B, A, 4 + (1 + C) + 4]`` (encoded offsets, logits with background
first, anchors in normalised xyxy).
"""

import threading

import keras
import numpy as np
from keras import ops

from kdet.data.class_weights import class_weight_vector
from kdet.matching import (DEFAULT_VARIANCES, atss_match, decode_boxes, encode_boxes, match_anchors,
                           task_aligned_match)

IOU_BOX_LOSSES = ("giou", "diou", "ciou")
# "smooth_l1+ciou" etc.: smooth L1 on the offsets plus iou_weight x the IoU-family term on the decoded boxes
# (DETR's L1 + GIoU, YOLOX's late L1 beside its IoU loss): the offsets keep smooth L1's steady gradient,
# the IoU term aims the boxes at what AP counts.
BOX_LOSSES = ("smooth_l1",) + IOU_BOX_LOSSES + tuple(f"smooth_l1+{kind}" for kind in IOU_BOX_LOSSES)
BOX_WEIGHTINGS = ("equal", "alignment")
# loss.box_weight=None: 1 for smooth L1 (as before); 2 for the IoU family, mmdetection's GIoU weight
# beside sigmoid class losses (ATSS, GFL, VFNet): 1 - GIoU is a few times smaller than SSD's smooth L1
# on variance-scaled offsets, so the box term keeps a similar share of the gradient.
DEFAULT_BOX_WEIGHTS = dict(smooth_l1=1.0, giou=2.0, diou=2.0, ciou=2.0,
                           **{f"smooth_l1+{kind}": 1.0 for kind in IOU_BOX_LOSSES})
DEFAULT_IOU_WEIGHT = 2.0                 # the IoU term of "smooth_l1+<iou>" (mmdetection's GIoU weight)
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0     # RetinaNet
QFL_BETA = 2.0                           # GFL
VFL_ALPHA, VFL_GAMMA = 0.75, 2.0         # VarifocalNet


def score_activation(cls_loss):
    """How the model turns class logits into scores for ``loss.cls_loss``: ``"softmax"`` or ``"sigmoid"``."""
    return class_loss_fn(cls_loss, "loss.cls_loss").activation


def numeric_class_weights(class_weights, num_classes=None, class_names=None):
    """``class_weights`` as a list of ``1 + C`` floats (background first), or ``None``.

    Accepts a sequence of length ``1 + C`` or ``C`` (background then gets 1.0),
    or a dict by class name (and optionally ``"background"``); missing names get
    1.0. ``"auto"`` must be resolved from data first
    (``kdet.data.class_weights.resolve_class_weights``).
    """
    if isinstance(class_weights, str):
        raise ValueError(
            f"MultiBoxLoss: class_weights={class_weights!r} must be resolved to numbers before "
            "building the loss (the training code turns 'auto' into a list from the data)."
        )
    return class_weight_vector(class_weights, class_names, num_classes)


def paired_iou_losses(pred, target, kind):
    """``1 - GIoU / DIoU / CIoU`` (``kind`` "giou" | "diou" | "ciou") of paired ``xyxy`` boxes ``[..., 4]``.

    GIoU (Rezatofighi et al. 2019): IoU minus the share of the enclosing box
    the union leaves empty. DIoU (Zheng et al. 2020): IoU minus the squared
    centre distance over the enclosing box's squared diagonal. CIoU: DIoU minus
    ``alpha * v``, ``v`` the aspect-ratio mismatch ``4/pi^2 (atan(w_t/h_t) -
    atan(w_p/h_p))^2`` and ``alpha = v / (1 - IoU + v)`` held constant in the
    gradient (the paper's rule). Finite for empty boxes too (the zero targets
    of non-positive anchors): every ratio has an epsilon below.
    """
    eps = 1e-9
    wh_p = ops.maximum(pred[..., 2:] - pred[..., :2], 0.0)
    wh_t = ops.maximum(target[..., 2:] - target[..., :2], 0.0)
    inter_wh = ops.maximum(ops.minimum(pred[..., 2:], target[..., 2:]) - ops.maximum(pred[..., :2], target[..., :2]), 0.0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = wh_p[..., 0] * wh_p[..., 1] + wh_t[..., 0] * wh_t[..., 1] - inter
    iou = inter / (union + eps)
    enclose_wh = ops.maximum(pred[..., 2:], target[..., 2:]) - ops.minimum(pred[..., :2], target[..., :2])
    if kind == "giou":
        enclose = enclose_wh[..., 0] * enclose_wh[..., 1]
        return 1.0 - (iou - (enclose - union) / (enclose + eps))
    centre_gap = (pred[..., :2] + pred[..., 2:] - target[..., :2] - target[..., 2:]) / 2
    distance = ops.sum(ops.square(centre_gap), axis=-1) / (ops.sum(ops.square(enclose_wh), axis=-1) + eps)
    if kind == "diou":
        return 1.0 - (iou - distance)
    if kind != "ciou":
        raise ValueError(f"paired_iou_losses: kind must be 'giou', 'diou' or 'ciou', got {kind!r}")
    v = (4 / np.pi ** 2) * ops.square(ops.arctan(wh_t[..., 0] / (wh_t[..., 1] + eps))
                                      - ops.arctan(wh_p[..., 0] / (wh_p[..., 1] + eps)))
    alpha = ops.stop_gradient(v / (1.0 - iou + v + eps))
    return 1.0 - (iou - distance - alpha * v)


def paired_iou(pred, target):
    """IoU of paired ``xyxy`` boxes ``[..., 4]`` (0 where the union is empty)."""
    inter_wh = ops.maximum(ops.minimum(pred[..., 2:], target[..., 2:]) - ops.maximum(pred[..., :2], target[..., :2]), 0.0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    area = lambda b: ops.maximum(b[..., 2] - b[..., 0], 0.0) * ops.maximum(b[..., 3] - b[..., 1], 0.0)
    union = area(pred) + area(target) - inter
    return ops.where(union > 0, inter / ops.maximum(union, 1e-12), 0.0)


def smooth_l1(x, beta=1.0):
    """Elementwise smooth L1 (Huber with slope 1): ``0.5 x^2 / beta`` below ``beta``."""
    abs_x = ops.abs(x)
    return ops.where(abs_x < beta, 0.5 * ops.square(x) / beta, abs_x - 0.5 * beta)


# ------------------------------------------------------------------ assigners and class losses
# Both are plain functions with one signature each, named by the recipe (``loss.assigner``,
# ``loss.cls_loss``) and looked up here; ``MultiBoxLoss`` calls them without knowing which one
# it holds. A new one is a function registered with `register_assigner` / `register_class_loss`
# (then ``loss.assigner`` / ``loss.cls_loss`` may name it); the loss's body does not change.
#
# assigner(loss, gt_boxes, gt_classes, gt_ignore, anchors, pred_boxes, class_scores)
#     -> (matched_boxes [B, A, 4], labels [B, A] (-1 ignored, 0 background, c + 1 class c),
#         soft_targets [B, A] or None)
#   ``pred_boxes`` decoded and ``class_scores()`` (the model's class probabilities [B, A, C]) are
#   gradient-free; ``loss`` holds the settings (``loss.iou_threshold``, ``loss.atss_top_k``, ...).
#   Attributes: ``soft_targets`` (True: its soft targets, a normalised alignment, divide the
#   sigmoid class losses and the aligned box loss instead of the positive count, YOLOv8's
#   ``target_scores_sum``), ``check(loss)`` (raises ValueError for settings it cannot work with).
#
# class_loss(loss, logits, labels, quality, num_pos_per_image) -> the summed class loss (a scalar,
#     divided by the positive count afterwards)
#   ``logits [B, A, 1 + C]`` (background first), ``quality [B, A]``: the assigner's soft targets or
#   the IoU of each predicted box with its object (None for a loss that does not ask for it).
#   Attributes: ``activation`` ("softmax" | "sigmoid": how the model scores, ``SSD.score_activation``),
#   ``needs_quality``, ``over_soft_targets`` (divided by an assigner's soft targets' sum).
ASSIGNER_FNS = {}
CLASS_LOSS_FNS = {}


def register_assigner(name, fn, soft_targets=False, check=None):
    """``fn`` (the assigner signature above) as ``loss.assigner=name``; returns ``fn``."""
    fn.assigner_name, fn.soft_targets, fn.check = name, bool(soft_targets), check or (lambda loss: None)
    ASSIGNER_FNS[name] = fn
    return fn


def register_class_loss(name, fn, activation, needs_quality=True, over_soft_targets=False):
    """``fn`` (the class-loss signature above) as ``loss.cls_loss=name``; returns ``fn``."""
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    fn.class_loss_name, fn.activation = name, activation
    fn.needs_quality, fn.over_soft_targets = bool(needs_quality), bool(over_soft_targets)
    CLASS_LOSS_FNS[name] = fn
    return fn


def assigner_fn(assigner, what="MultiBoxLoss: assigner"):
    """The registered assigner named ``assigner`` (or ``assigner`` itself, a registered function)."""
    return _registered(assigner, ASSIGNER_FNS, "assigner_name", what)


def class_loss_fn(cls_loss, what="MultiBoxLoss: cls_loss"):
    """The registered class loss named ``cls_loss`` (or ``cls_loss`` itself, a registered function)."""
    return _registered(cls_loss, CLASS_LOSS_FNS, "class_loss_name", what)


def _registered(value, registry, name_attribute, what):
    if callable(value) and getattr(value, name_attribute, None) in registry:
        return value
    if isinstance(value, str) and value in registry:
        return registry[value]
    raise ValueError(f"{what} must be one of {tuple(registry)}, got {value!r}")


def max_iou_assigner(loss, gt_boxes, gt_classes, gt_ignore, anchors, pred_boxes, class_scores):
    """SSD's: :func:`kdet.matching.match_anchors` (``loss.iou_threshold``, ``loss.negative_iou_threshold``)."""
    matched_boxes, labels = match_anchors(gt_boxes, gt_classes, gt_ignore, anchors, loss.iou_threshold,
                                          loss.negative_iou_threshold)
    return matched_boxes, labels, None


def atss_assigner(loss, gt_boxes, gt_classes, gt_ignore, anchors, pred_boxes, class_scores):
    """ATSS: :func:`kdet.matching.atss_match` (``loss.anchors_per_level``, ``atss_top_k``, ``atss_forced_match``)."""
    matched_boxes, labels = atss_match(gt_boxes, gt_classes, gt_ignore, anchors, loss.anchors_per_level,
                                       loss.atss_top_k, forced_match=loss.atss_forced_match)
    return matched_boxes, labels, None


def _check_atss(loss):
    if loss.anchors_per_level is None:
        raise ValueError("MultiBoxLoss: assigner='atss' needs anchors_per_level (the model's "
                         "SSD.anchors_per_level: how many anchors each feature map holds)")


def task_aligned_assigner(loss, gt_boxes, gt_classes, gt_ignore, anchors, pred_boxes, class_scores):
    """YOLOv8's task-aligned assigner: :func:`kdet.matching.task_aligned_match` (``loss.tal_top_k``,
    ``tal_alpha``, ``tal_beta``); its normalised alignment is the soft target."""
    return task_aligned_match(gt_boxes, gt_classes, gt_ignore, anchors, pred_boxes, class_scores(),
                              loss.tal_top_k, loss.tal_alpha, loss.tal_beta)


register_assigner("max_iou", max_iou_assigner)
register_assigner("atss", atss_assigner, check=_check_atss)
register_assigner("tal", task_aligned_assigner, soft_targets=True)


def softmax_class_loss(loss, logits, labels, quality, num_pos_per_image):
    """Cross-entropy on positives and hard-mined negatives (SSD)."""
    return loss.softmax_cross_entropy(logits, labels, num_pos_per_image)


def quality_softmax_class_loss(loss, logits, labels, quality, num_pos_per_image):
    """The same, a positive's target split: ``quality`` on its class, the rest on background (GFL, for softmax)."""
    return loss.softmax_cross_entropy(logits, labels, num_pos_per_image, quality)


def _sigmoid_class_loss(per_class_loss):
    """A sigmoid class loss over every non-ignored anchor and class, summed, from
    ``per_class_loss(class_logits, prob, one_hot, quality) -> [B, A, C]``.

    The background logit is unused: background is an all-zero target. ``quality [B, A]``
    (0 off the positives) is the soft target of positives (IoU or normalised alignment).
    """
    def class_loss(loss, logits, labels, quality, num_pos_per_image):
        quality = ops.where(labels > 0, quality, 0.0)
        class_logits = logits[..., 1:]
        num_classes = class_logits.shape[-1]
        one_hot = ops.one_hot(ops.maximum(labels - 1, 0), num_classes) * ops.expand_dims(
            ops.cast(labels > 0, "float32"), -1)
        prob = ops.sigmoid(class_logits)
        per_class = per_class_loss(class_logits, prob, one_hot, quality)
        per_anchor = ops.sum(per_class, axis=-1) * loss.class_weights_of(ops.maximum(labels, 0), logits.shape[-1])
        return ops.sum(ops.where(labels >= 0, per_anchor, 0.0))

    class_loss.__doc__ = per_class_loss.__doc__
    return class_loss


def _focal(class_logits, prob, one_hot, quality):
    """Focal loss (RetinaNet)."""
    target = one_hot
    bce = ops.softplus(class_logits) - class_logits * target
    p_t = prob * target + (1.0 - prob) * (1.0 - target)
    alpha_t = FOCAL_ALPHA * target + (1.0 - FOCAL_ALPHA) * (1.0 - target)
    return alpha_t * ops.power(1.0 - p_t, FOCAL_GAMMA) * bce


def _soft_bce(class_logits, one_hot, quality):
    target = one_hot * ops.expand_dims(quality, -1)
    return target, ops.softplus(class_logits) - class_logits * target


def _quality_focal(class_logits, prob, one_hot, quality):
    """Quality focal loss (GFL): the positive's target is its quality."""
    target, bce = _soft_bce(class_logits, one_hot, quality)
    return ops.power(ops.abs(target - prob), QFL_BETA) * bce


def _varifocal(class_logits, prob, one_hot, quality):
    """Varifocal loss (VarifocalNet): positives weighted by their quality, negatives focally down-weighted."""
    target, bce = _soft_bce(class_logits, one_hot, quality)
    return ops.where(target > 0, target, VFL_ALPHA * ops.power(prob, VFL_GAMMA)) * bce


def _quality_bce(class_logits, prob, one_hot, quality):
    """Binary cross-entropy on the soft target, no focal factor (YOLOv8)."""
    return _soft_bce(class_logits, one_hot, quality)[1]


register_class_loss("softmax", softmax_class_loss, "softmax", needs_quality=False)
register_class_loss("quality_softmax", quality_softmax_class_loss, "softmax")
register_class_loss("focal", _sigmoid_class_loss(_focal), "sigmoid", over_soft_targets=True)
register_class_loss("quality_focal", _sigmoid_class_loss(_quality_focal), "sigmoid", over_soft_targets=True)
register_class_loss("varifocal", _sigmoid_class_loss(_varifocal), "sigmoid", over_soft_targets=True)
register_class_loss("quality_bce", _sigmoid_class_loss(_quality_bce), "sigmoid", over_soft_targets=True)
ASSIGNERS = tuple(ASSIGNER_FNS)          # the built-in names (a registered one is in ASSIGNER_FNS)
CLASS_LOSSES = tuple(CLASS_LOSS_FNS)
SOFTMAX_LOSSES = tuple(name for name, fn in CLASS_LOSS_FNS.items() if fn.activation == "softmax")


@keras.saving.register_keras_serializable(package="kdet")
class MultiBoxLoss(keras.losses.Loss):
    """SSD MultiBox loss: smooth L1 on positives + CE with hard negative mining.

    ``loss = (conf + alpha * box_weight * loc) / max(num_positives, 1)`` where the sums and
    the positive count run over the whole batch (ssd.pytorch). Under a
    ``tf.distribute`` strategy the count is the global batch's (summed over the
    replicas, as mmdetection's ``reduce_mean``): each replica's loss is its share
    of the global batch's loss, and as Keras sums the replicas' gradients of a
    scalar loss (it scales only per-sample losses by 1 / replicas), training
    equals single-device training with the same global batch. Anchors are
    matched with :func:`kdet.matching.match_anchors`; ignore anchors count
    neither as positives nor as negatives. Per image, the ``neg_pos_ratio *
    num_positives`` background anchors with the highest background loss are
    the negatives (at least ``min_negatives``, at most all background anchors).
    ``negative_iou_threshold`` (e.g. 0.4) keeps anchors that half cover an
    object out of the negatives (see ``match_anchors``).
    ``assigner="atss"`` matches with :func:`kdet.matching.atss_match` instead
    (a threshold per object from its ``atss_top_k`` nearest anchors per level; with
    ``atss_forced_match`` an object left without a positive takes its best-IoU anchor;
    ``iou_threshold`` and ``negative_iou_threshold`` then do not apply); it
    needs ``anchors_per_level`` (``SSD.anchors_per_level``).

    ``class_weights`` multiply each anchor's cross-entropy by the weight of its
    target class (background weight for negatives); see
    :func:`numeric_class_weights` for the accepted forms.

    Modern one-stage levers (recipe keys ``loss.*``, kdet/defaults.py):
    ``box_loss`` "smooth_l1" (on encoded offsets) or "giou" / "diou" / "ciou"
    on the decoded boxes (:func:`paired_iou_losses`), weighted by ``alpha *
    box_weight``; ``cls_loss`` "softmax" (CE + hard negative mining),
    "quality_softmax" (the same, but a positive's target puts the IoU of its
    predicted box on its class and the rest on background, so scores rank
    boxes by how well they fit, as GFL's quality focal loss does) or the
    sigmoid losses "focal" (RetinaNet), "quality_focal" (GFL: the positive's
    target is the IoU of its predicted box), "varifocal" (VarifocalNet) and
    "quality_bce" (YOLOv8: binary cross-entropy on the same soft target, no focal factor),
    which use every non-ignored anchor, background as an all-zero target, and
    need a model scoring with sigmoid (``SSD(score_activation="sigmoid")``,
    :func:`score_activation`); ``assigner="tal"`` is the task-aligned assigner
    (:func:`kdet.matching.task_aligned_match`, ``tal_top_k``, ``tal_alpha``,
    ``tal_beta``), whose normalised alignment is the soft target of the
    quality losses, which are then divided by the soft targets' sum instead
    of the positive count (YOLOv8's ``target_scores_sum``);
    ``box_weighting="alignment"`` also weights each positive's box loss by its
    soft target (a mean weighted by them, as YOLOv8's box loss).

    Reduction: ``call`` already returns the batch's SSD loss as a scalar, so
    Keras's reduction leaves it unchanged ("sum_over_batch_size" divides a
    single value by 1). ``sample_weight`` is not meaningful here: leave it unset.
    """

    def __init__(
        self,
        class_weights=None,
        class_names=None,
        num_classes=None,
        alpha=1.0,
        neg_pos_ratio=3,
        min_negatives=0,
        iou_threshold=0.5,
        negative_iou_threshold=None,
        variances=DEFAULT_VARIANCES,
        assigner="max_iou",
        atss_top_k=9,
        atss_forced_match=False,
        anchors_per_level=None,
        box_loss="smooth_l1",
        box_weight=None,
        iou_weight=DEFAULT_IOU_WEIGHT,
        cls_loss="softmax",
        tal_top_k=13,
        tal_alpha=1.0,
        tal_beta=6.0,
        box_weighting="equal",
        name="multibox_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.class_names = list(class_names) if class_names is not None else None
        self.num_classes = num_classes if num_classes is not None else (
            len(self.class_names) if self.class_names is not None else None
        )
        self.class_weights = numeric_class_weights(class_weights, self.num_classes, self.class_names)
        self.alpha = float(alpha)
        self.neg_pos_ratio = float(neg_pos_ratio)
        self.min_negatives = int(min_negatives)
        self.iou_threshold = float(iou_threshold)
        self.negative_iou_threshold = None if negative_iou_threshold is None else float(negative_iou_threshold)
        self.variances = tuple(float(v) for v in variances)
        self._assign = assigner_fn(assigner)
        self.assigner = self._assign.assigner_name
        self.atss_top_k = int(atss_top_k)
        self.atss_forced_match = bool(atss_forced_match)
        self.anchors_per_level = None if anchors_per_level is None else [int(n) for n in anchors_per_level]
        self._assign.check(self)
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"MultiBoxLoss: box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        self._class_loss = class_loss_fn(cls_loss, "loss.cls_loss")
        self.score_activation = self._class_loss.activation
        self.box_loss, self.cls_loss = box_loss, self._class_loss.class_loss_name
        self.box_weight = DEFAULT_BOX_WEIGHTS[box_loss] if box_weight is None else float(box_weight)
        self.iou_weight = float(iou_weight)
        # the parts of box_loss: smooth L1 on the offsets and / or one IoU-family term (weighted in a sum)
        self._with_smooth_l1 = box_loss.startswith("smooth_l1")
        self._iou_kind = box_loss.split("+")[-1] if box_loss.split("+")[-1] in IOU_BOX_LOSSES else None
        self._iou_term_weight = self.iou_weight if "+" in box_loss else 1.0
        self.tal_top_k, self.tal_alpha, self.tal_beta = int(tal_top_k), float(tal_alpha), float(tal_beta)
        if box_weighting not in BOX_WEIGHTINGS:
            raise ValueError(f"MultiBoxLoss: box_weighting must be one of {BOX_WEIGHTINGS}, got {box_weighting!r}")
        if box_weighting == "alignment" and not self._assign.soft_targets:
            raise ValueError("MultiBoxLoss: box_weighting='alignment' weights positives by the task-aligned "
                             f"assigner's soft targets: it needs assigner='tal' (got {self.assigner!r})")
        self.box_weighting = box_weighting

    def call(self, y_true, y_pred):
        parts = self.components(y_true, y_pred)
        # for MultiBoxParts in the same step (no second matching); per thread, as a mirrored
        # strategy traces its replicas in parallel threads
        self._last_parts = {**getattr(self, "_last_parts", {}), threading.get_ident(): (y_pred, parts)}
        return parts["loss"]

    def components(self, y_true, y_pred):
        """The loss and its parts, as a dict of scalars for logging.

        ``loss``, ``loc`` and ``conf`` (``loss = conf + alpha * box_weight * loc``, both
        already divided by the positive count) and ``num_positives``.
        """
        y_true = ops.convert_to_tensor(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        _check_shapes(y_true, y_pred)
        num_logits = y_pred.shape[-1] - 8
        if self.num_classes is not None and num_logits != self.num_classes + 1:
            raise ValueError(
                f"MultiBoxLoss: y_pred has {num_logits} logits per anchor, expected "
                f"{self.num_classes + 1} (background + {self.num_classes} classes)."
            )
        offsets, logits = y_pred[..., :4], y_pred[..., 4:4 + num_logits]
        anchors = ops.stop_gradient(y_pred[..., 4 + num_logits:])
        pred_boxes = decode_boxes(offsets, anchors, self.variances)

        gt_classes = ops.cast(ops.round(y_true[..., 4]), "int32")
        gt = (y_true[..., :4], gt_classes, y_true[..., 5] > 0.5, anchors)
        matched_boxes, labels, quality = self._assign(
            self, *gt, ops.stop_gradient(pred_boxes), lambda: self._class_scores(ops.stop_gradient(logits)))
        positive = labels > 0
        num_pos_per_image = ops.sum(ops.cast(positive, "float32"), axis=1)
        num_pos = ops.maximum(_sum_over_replicas(ops.stop_gradient(ops.sum(num_pos_per_image))), 1.0)

        if self._assign.soft_targets:  # YOLOv8's target_scores_sum: divides its class and box losses
            soft_target_sum = ops.maximum(
                _sum_over_replicas(ops.stop_gradient(ops.sum(ops.where(positive, quality, 0.0)))), 1.0)

        loc = self._box_losses(offsets, pred_boxes, matched_boxes, anchors)
        if self.box_weighting == "alignment":  # YOLOv8: positives weighted by their soft target, over its sum
            loc = ops.sum(ops.where(positive, quality, 0.0) * loc) * num_pos / soft_target_sum
        else:
            loc = ops.sum(ops.where(positive, loc, 0.0))
        if self._class_loss.needs_quality and quality is None:  # IoU of the predicted box with its object (GFL)
            quality = ops.stop_gradient(paired_iou(pred_boxes, matched_boxes))
        conf = self._class_loss(self, logits, labels, quality, num_pos_per_image)
        if self._assign.soft_targets and self._class_loss.over_soft_targets:
            conf = conf * num_pos / soft_target_sum  # YOLOv8: over the soft targets' sum (small, normalised)

        loc, conf = loc / num_pos, conf / num_pos
        weight = self.alpha * self.box_weight
        return {"loss": conf + weight * loc, "loc": loc, "conf": conf, "num_positives": ops.sum(num_pos_per_image)}

    def _class_scores(self, logits):
        """Class probabilities ``[B, A, C]`` as the model scores them (without the background)."""
        if self.score_activation == "sigmoid":
            return ops.sigmoid(logits[..., 1:])
        return ops.softmax(logits, axis=-1)[..., 1:]

    def _box_losses(self, offsets, pred_boxes, matched_boxes, anchors):
        """Per-anchor box loss ``[B, A]`` (meaningful on positives only)."""
        loss = 0.0
        if self._with_smooth_l1:  # summed over the 4 encoded offsets
            targets = encode_boxes(matched_boxes, anchors, self.variances)
            loss = ops.sum(smooth_l1(offsets - ops.stop_gradient(targets)), axis=-1)
        if self._iou_kind is not None:
            iou_loss = paired_iou_losses(pred_boxes, ops.stop_gradient(matched_boxes), self._iou_kind)
            loss = loss + self._iou_term_weight * iou_loss
        return loss

    def softmax_cross_entropy(self, logits, labels, num_pos_per_image, quality=None):
        """Weighted CE on positives and hard-mined negatives (SSD), summed.

        With ``quality [B, A]`` (the IoU of each positive's predicted box) a positive's target is
        split: ``quality`` on its class, the rest on background (GFL's soft target, for softmax).
        """
        positive = labels > 0
        log_probs = ops.log_softmax(logits, axis=-1)
        target = ops.maximum(labels, 0)
        ce = -ops.squeeze(ops.take_along_axis(log_probs, ops.expand_dims(target, -1), axis=-1), -1)
        if quality is not None:
            on_class = ops.where(positive, quality, 1.0)
            ce = on_class * ce - (1.0 - on_class) * log_probs[..., 0]
        negatives = self.hard_negatives(ops.stop_gradient(-log_probs[..., 0]), labels == 0, num_pos_per_image)
        ce = ce * self.class_weights_of(target, logits.shape[-1])
        return ops.sum(ops.where(ops.logical_or(positive, negatives), ce, 0.0))

    def hard_negatives(self, background_loss, candidates, num_pos_per_image):
        """Per image, the ``ratio * num_pos`` candidates with the highest background loss."""
        num_candidates = ops.sum(ops.cast(candidates, "float32"), axis=1)
        num_neg = ops.maximum(self.neg_pos_ratio * num_pos_per_image, float(self.min_negatives))
        num_neg = ops.minimum(num_neg, num_candidates)
        # Background loss is >= 0, so -1 ranks non-candidates last.
        ranked_loss = ops.where(candidates, background_loss, -1.0)
        order = ops.argsort(-ranked_loss, axis=1)
        rank = ops.argsort(order, axis=1)  # rank of each anchor in descending loss order
        return ops.logical_and(candidates, ops.cast(rank, "float32") < ops.expand_dims(num_neg, 1))

    def class_weights_of(self, target, num_logits):
        """Each anchor's class weight ``[B, A]`` for its target class ``target`` (1.0 without class weights)."""
        if self.class_weights is None:
            return 1.0
        weights = self.class_weights
        if len(weights) == num_logits - 1:  # foreground-only list, num_classes unknown at build time
            weights = [1.0] + list(weights)
        if len(weights) != num_logits:
            raise ValueError(
                f"MultiBoxLoss: class_weights has {len(self.class_weights)} entries but y_pred has "
                f"{num_logits} logits (background + {num_logits - 1} classes)."
            )
        return ops.take(ops.convert_to_tensor(weights, "float32"), target)

    def get_config(self):
        config = super().get_config()
        config.update(
            class_weights=self.class_weights,
            class_names=self.class_names,
            num_classes=self.num_classes,
            alpha=self.alpha,
            neg_pos_ratio=self.neg_pos_ratio,
            min_negatives=self.min_negatives,
            iou_threshold=self.iou_threshold,
            negative_iou_threshold=self.negative_iou_threshold,
            variances=list(self.variances),
            assigner=self.assigner,
            atss_top_k=self.atss_top_k,
            atss_forced_match=self.atss_forced_match,
            anchors_per_level=self.anchors_per_level,
            box_loss=self.box_loss,
            box_weight=self.box_weight,
            iou_weight=self.iou_weight,
            cls_loss=self.cls_loss,
            tal_top_k=self.tal_top_k,
            tal_alpha=self.tal_alpha,
            tal_beta=self.tal_beta,
            box_weighting=self.box_weighting,
        )
        return config


@keras.saving.register_keras_serializable(package="kdet")
class MultiBoxParts(keras.metrics.Metric):
    """The MultiBox loss's parts as logged metrics: ``loc``, ``conf``, ``positives_per_image``.

    Epoch means over the steps (as Keras logs ``loss``), so ``log.csv`` and
    TensorBoard get them every epoch: ``loss = conf + alpha * loc``, and
    ``positives_per_image`` is the number of positive anchors per image (a
    starving classifier shows here first). Pass it to ``compile(metrics=[...])``
    with the same ``MultiBoxLoss``; it reuses the parts that loss computed in the
    same step and only recomputes them when it was not called on that ``y_pred``.
    """

    def __init__(self, loss=None, name="multibox_parts", **kwargs):
        super().__init__(name=name, **kwargs)
        if isinstance(loss, dict):
            loss = keras.saving.deserialize_keras_object(loss)
        self.loss = loss if loss is not None else MultiBoxLoss()
        self._sums = {key: self.add_variable((), initializer="zeros", name=key)
                      for key in ("loc", "conf", "positives_per_image")}
        self._steps = self.add_variable((), initializer="zeros", name="steps")

    def update_state(self, y_true, y_pred, sample_weight=None):
        last = getattr(self.loss, "_last_parts", {}).get(threading.get_ident())
        parts = last[1] if last is not None and last[0] is y_pred else self.loss.components(y_true, y_pred)
        batch = ops.cast(ops.shape(y_pred)[0], "float32")
        # a replica's loc and conf are its share of the global batch's: Keras averages the logs over replicas
        share = float(_replicas_in_sync())
        values = dict(loc=parts["loc"] * share, conf=parts["conf"] * share,
                      positives_per_image=parts["num_positives"] / batch)
        for key, variable in self._sums.items():
            variable.assign_add(ops.cast(ops.stop_gradient(values[key]), "float32"))
        self._steps.assign_add(1.0)

    def result(self):
        steps = ops.maximum(self._steps, 1.0)
        return {key: variable / steps for key, variable in self._sums.items()}

    def reset_state(self):
        for variable in list(self._sums.values()) + [self._steps]:
            variable.assign(0.0)

    def get_config(self):
        return dict(name=self.name, loss=keras.saving.serialize_keras_object(self.loss))


def check_finite(values, step=None):
    """Raise ``FloatingPointError`` if any of ``values`` (dict name -> number/array) is not finite.

    Host-side helper for a training callback: the message names the step, the
    offending entries and the usual causes.
    """
    bad = sorted(name for name, value in values.items() if not np.all(np.isfinite(np.asarray(value, dtype=np.float64))))
    if not bad:
        return
    where = f" at step {step}" if step is not None else ""
    raise FloatingPointError(
        f"non-finite {', '.join(bad)}{where}. Likely causes: learning rate too high (try a lower "
        "rate or a longer warmup), ground-truth boxes with zero or negative width/height or "
        "outside [0, 1] after augmentation, or float16 overflow under mixed precision."
    )


def _sum_over_replicas(value):
    """``value`` summed over the tf.distribute replicas (itself outside a multi-replica step).

    The one TensorFlow op of the loss (no ``keras.ops`` form); under JAX a data-parallel
    step is one program over the whole batch, which needs nothing.
    """
    context = _replica_context()
    if context is None:
        return value
    import tensorflow as tf

    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _replicas_in_sync():
    context = _replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def _replica_context():
    """The tf.distribute replica context of a step with more than one replica, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def _check_shapes(y_true, y_pred):
    """Clear errors for targets / predictions not laid out as docs/CONVENTIONS.md says (static shapes)."""
    if len(y_true.shape) != 3 or y_true.shape[-1] not in (None, 6):
        raise ValueError(
            f"MultiBoxLoss: y_true of shape {tuple(y_true.shape)} is not [B, max_boxes, 6] "
            "(normalised x1, y1, x2, y2, class id, ignore flag; padding rows class -1), see docs/CONVENTIONS.md")
    if len(y_pred.shape) != 3 or (y_pred.shape[-1] is not None and y_pred.shape[-1] < 10):
        raise ValueError(
            f"MultiBoxLoss: y_pred of shape {tuple(y_pred.shape)} is not [B, A, 4 + (1 + C) + 4] with C >= 1 "
            "(the SSD model's output), see docs/CONVENTIONS.md")
