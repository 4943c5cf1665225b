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
from kdet.matching import DEFAULT_VARIANCES, atss_match, encode_boxes, match_anchors

ASSIGNERS = ("max_iou", "atss")


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


def smooth_l1(x, beta=1.0):
    """Elementwise smooth L1 (Huber with slope 1): ``0.5 x^2 / beta`` below ``beta``."""
    abs_x = ops.abs(x)
    return ops.where(abs_x < beta, 0.5 * ops.square(x) / beta, abs_x - 0.5 * beta)


@keras.saving.register_keras_serializable(package="kdet")
class MultiBoxLoss(keras.losses.Loss):
    """SSD MultiBox loss: smooth L1 on positives + CE with hard negative mining.

    ``loss = (conf + alpha * loc) / max(num_positives, 1)`` where the sums and
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
    (a threshold per object from its ``atss_top_k`` nearest anchors per level;
    ``iou_threshold`` and ``negative_iou_threshold`` then do not apply); it
    needs ``anchors_per_level`` (``SSD.anchors_per_level``).

    ``class_weights`` multiply each anchor's cross-entropy by the weight of its
    target class (background weight for negatives); see
    :func:`numeric_class_weights` for the accepted forms.

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
        anchors_per_level=None,
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
        if assigner not in ASSIGNERS:
            raise ValueError(f"MultiBoxLoss: assigner must be one of {ASSIGNERS}, got {assigner!r}")
        if assigner == "atss" and anchors_per_level is None:
            raise ValueError("MultiBoxLoss: assigner='atss' needs anchors_per_level (the model's "
                             "SSD.anchors_per_level: how many anchors each feature map holds)")
        self.assigner = assigner
        self.atss_top_k = int(atss_top_k)
        self.anchors_per_level = None if anchors_per_level is None else [int(n) for n in anchors_per_level]

    def call(self, y_true, y_pred):
        parts = self.components(y_true, y_pred)
        # for MultiBoxParts in the same step (no second matching); per thread, as a mirrored
        # strategy traces its replicas in parallel threads
        self._last_parts = {**getattr(self, "_last_parts", {}), threading.get_ident(): (y_pred, parts)}
        return parts["loss"]

    def components(self, y_true, y_pred):
        """The loss and its parts, as a dict of scalars for logging.

        ``loss``, ``loc`` and ``conf`` (``loss = conf + alpha * loc``, both
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

        gt_classes = ops.cast(ops.round(y_true[..., 4]), "int32")
        matched_boxes, labels = self._match(y_true[..., :4], gt_classes, y_true[..., 5] > 0.5, anchors)
        positive = labels > 0
        num_pos_per_image = ops.sum(ops.cast(positive, "float32"), axis=1)
        num_pos = ops.maximum(_sum_over_replicas(ops.stop_gradient(ops.sum(num_pos_per_image))), 1.0)

        # Localisation: smooth L1 summed over the 4 offsets of positive anchors.
        targets = encode_boxes(matched_boxes, anchors, self.variances)
        loc = ops.sum(smooth_l1(offsets - ops.stop_gradient(targets)), axis=-1)
        loc = ops.sum(ops.where(positive, loc, 0.0))

        # Classification: weighted CE on positives and mined negatives.
        log_probs = ops.log_softmax(logits, axis=-1)
        target = ops.maximum(labels, 0)
        ce = -ops.squeeze(ops.take_along_axis(log_probs, ops.expand_dims(target, -1), axis=-1), -1)
        negatives = self._hard_negatives(ops.stop_gradient(-log_probs[..., 0]), labels == 0, num_pos_per_image)
        ce = ce * self._weights(target, num_logits)
        conf = ops.sum(ops.where(ops.logical_or(positive, negatives), ce, 0.0))

        loc, conf = loc / num_pos, conf / num_pos
        return {"loss": conf + self.alpha * loc, "loc": loc, "conf": conf, "num_positives": ops.sum(num_pos_per_image)}

    def _match(self, gt_boxes, gt_classes, gt_ignore, anchors):
        if self.assigner == "atss":
            return atss_match(gt_boxes, gt_classes, gt_ignore, anchors, self.anchors_per_level, self.atss_top_k)
        return match_anchors(gt_boxes, gt_classes, gt_ignore, anchors, self.iou_threshold,
                             self.negative_iou_threshold)

    def _hard_negatives(self, background_loss, candidates, num_pos_per_image):
        """Per image, the ``ratio * num_pos`` candidates with the highest background loss."""
        num_candidates = ops.sum(ops.cast(candidates, "float32"), axis=1)
        num_neg = ops.maximum(self.neg_pos_ratio * num_pos_per_image, float(self.min_negatives))
        num_neg = ops.minimum(num_neg, num_candidates)
        # Background loss is >= 0, so -1 ranks non-candidates last.
        ranked_loss = ops.where(candidates, background_loss, -1.0)
        order = ops.argsort(-ranked_loss, axis=1)
        rank = ops.argsort(order, axis=1)  # rank of each anchor in descending loss order
        return ops.logical_and(candidates, ops.cast(rank, "float32") < ops.expand_dims(num_neg, 1))

    def _weights(self, target, num_logits):
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
            anchors_per_level=self.anchors_per_level,
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
