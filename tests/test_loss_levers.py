"""The modern one-stage levers of MultiBoxLoss: IoU-family box losses, sigmoid class losses
(focal, quality focal, varifocal), the task-aligned assigner and the sigmoid-scoring model."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from kdet.losses import MultiBoxLoss, paired_iou_losses, score_activation
from kdet.matching import task_aligned_match
from test_loss import ANCHORS, C, _case

LN2 = math.log(2.0)


# ------------------------------------------------------------------ numpy references
def _np_iou_losses(p, t):
    """(1 - GIoU, 1 - DIoU, 1 - CIoU) of two boxes, written out from the papers."""
    p, t = np.asarray(p, np.float64), np.asarray(t, np.float64)
    wp, hp, wt, ht = p[2] - p[0], p[3] - p[1], t[2] - t[0], t[3] - t[1]
    iw = max(0.0, min(p[2], t[2]) - max(p[0], t[0]))
    ih = max(0.0, min(p[3], t[3]) - max(p[1], t[1]))
    inter = iw * ih
    union = wp * hp + wt * ht - inter
    iou = inter / union
    ew, eh = max(p[2], t[2]) - min(p[0], t[0]), max(p[3], t[3]) - min(p[1], t[1])
    giou = iou - (ew * eh - union) / (ew * eh)
    rho2 = ((p[0] + p[2]) / 2 - (t[0] + t[2]) / 2) ** 2 + ((p[1] + p[3]) / 2 - (t[1] + t[3]) / 2) ** 2
    diou = iou - rho2 / (ew ** 2 + eh ** 2)
    v = 4 / math.pi ** 2 * (math.atan(wt / ht) - math.atan(wp / hp)) ** 2
    ciou = diou - v / (1 - iou + v) * v
    return 1 - giou, 1 - diou, 1 - ciou


def _np_decode(offsets, anchor):
    aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
    cx = (anchor[0] + anchor[2]) / 2 + offsets[0] * 0.1 * aw
    cy = (anchor[1] + anchor[3]) / 2 + offsets[1] * 0.1 * ah
    w, h = aw * math.exp(offsets[2] * 0.2), ah * math.exp(offsets[3] * 0.2)
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _np_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _np_sigmoid_loss(logits, labels, quality, kind):
    """Focal / QFL / VFL summed over non-ignored anchors and classes, divided by the positives (loops)."""
    total = 0.0
    for b in range(labels.shape[0]):
        for a in range(labels.shape[1]):
            if labels[b, a] < 0:
                continue
            for c in range(logits.shape[-1] - 1):
                x = float(logits[b, a, 1 + c])
                p = 1 / (1 + math.exp(-x))
                y = 1.0 if labels[b, a] == c + 1 else 0.0
                if kind != "focal":
                    y *= quality[b, a]
                bce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
                if kind == "focal":
                    p_t = p if y == 1 else 1 - p
                    total += (0.25 if y == 1 else 0.75) * (1 - p_t) ** 2 * bce
                elif kind == "quality_focal":
                    total += abs(y - p) ** 2 * bce
                elif kind == "quality_bce":
                    total += bce
                else:
                    total += (y if y > 0 else 0.75 * p ** 2) * bce
    return total / max((labels > 0).sum(), 1)


def _np_tal(gt, classes, ignore, anchors, pred_boxes, scores, top_k, alpha=1.0, beta=6.0, with_owner=False):
    """Task-aligned assignment of one image, loops: (labels, soft targets[, each anchor's object or -1])."""
    A, M = len(anchors), len(gt)
    iou = np.array([[_np_iou(pred_boxes[a], gt[m]) for m in range(M)] for a in range(A)])
    align = np.zeros((A, M))
    for m in range(M):
        if classes[m] < 0:
            continue
        for a in range(A):
            cx, cy = (anchors[a, 0] + anchors[a, 2]) / 2, (anchors[a, 1] + anchors[a, 3]) / 2
            if gt[m, 0] < cx < gt[m, 2] and gt[m, 1] < cy < gt[m, 3]:
                align[a, m] = scores[a, classes[m]] ** alpha * iou[a, m] ** beta
    candidate = np.zeros((A, M), bool)
    for m in range(M):
        for a in np.argsort(-align[:, m])[:top_k]:
            candidate[a, m] = align[a, m] > 0
    labels, owner = np.zeros(A, np.int64), np.full(A, -1)
    for a in np.nonzero(candidate.any(axis=1))[0]:
        m = max(np.nonzero(candidate[a])[0], key=lambda j: iou[a, j])
        labels[a] = -1 if ignore[m] else classes[m] + 1
        owner[a] = -1 if ignore[m] else m
    soft = np.zeros(A)
    for m in set(owner[owner >= 0]):
        mine = owner == m
        soft[mine] = align[mine, m] * iou[mine, m].max() / align[mine, m].max()
    return (labels, soft, owner) if with_owner else (labels, soft)


# ------------------------------------------------------------------ IoU-family box losses
PAIRS = np.array([[0, 0, 2, 2], [0, 0, 4, 2], [0, 0, 1, 1]], np.float32)
TARGETS = np.array([[1, 1, 3, 3], [0, 0, 2, 4], [2, 0, 3, 1]], np.float32)


def test_iou_losses_hand_computed():
    # pair 0: IoU 1/7, enclosing 3x3 (area 9, diagonal^2 18), centre gap^2 2, same aspect (v = 0)
    # pair 1: IoU 4/12, enclosing 4x4, centre gap^2 2, aspect 2:1 vs 1:2
    # pair 2: disjoint, enclosing 3x1 (area 3, diagonal^2 10), union 2, centre gap^2 4
    v = 4 / math.pi ** 2 * (math.atan(2.0) - math.atan(0.5)) ** 2
    expected = dict(
        giou=[1 / 7 - 2 / 9, 1 / 3 - 4 / 16, 0 - 1 / 3],
        diou=[1 / 7 - 2 / 18, 1 / 3 - 2 / 32, 0 - 4 / 10],
        ciou=[1 / 7 - 2 / 18, 1 / 3 - 2 / 32 - v / (2 / 3 + v) * v, 0 - 4 / 10],  # v = 0 for pairs 0 and 2
    )
    assert abs(expected["ciou"][1] - 0.237082) < 1e-6
    for kind, values in expected.items():
        got = ops.convert_to_numpy(paired_iou_losses(PAIRS, TARGETS, kind))
        np.testing.assert_allclose(got, 1 - np.array(values), atol=1e-6, err_msg=kind)


def test_iou_losses_match_numpy_on_random_boxes():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 0.8, (2, 200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.01, 0.5, (2, 200, 2))], -1).astype(np.float32)
    expected = np.array([_np_iou_losses(p, t) for p, t in zip(boxes[0], boxes[1])])
    for k, kind in enumerate(("giou", "diou", "ciou")):
        got = ops.convert_to_numpy(paired_iou_losses(boxes[0], boxes[1], kind))
        np.testing.assert_allclose(got, expected[:, k], atol=2e-5, err_msg=kind)
    assert np.ptp(expected[:, 2] - expected[:, 1]) > 0.01  # the aspect term matters on these boxes


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_iou_box_loss_in_the_multibox_loss(kind):
    y_true, y_pred, labels, matched = _case()
    loss = MultiBoxLoss(box_loss=kind)
    parts = loss.components(y_true, y_pred)
    index = list(zip(*np.nonzero(labels > 0)))
    k = ("giou", "diou", "ciou").index(kind)
    loc = sum(_np_iou_losses(_np_decode(y_pred[b, a, :4], ANCHORS[a]), matched[b, a])[k] for b, a in index) / 3
    np.testing.assert_allclose(float(parts["loc"]), loc, rtol=1e-5)
    plain = MultiBoxLoss().components(y_true, y_pred)
    np.testing.assert_allclose(float(parts["conf"]), float(plain["conf"]), rtol=1e-6)
    assert loss.box_weight == 2.0 and MultiBoxLoss(box_loss=kind, box_weight=5.0).box_weight == 5.0
    np.testing.assert_allclose(float(parts["loss"]), float(plain["conf"]) + 2.0 * loc, rtol=1e-5)


@pytest.mark.parametrize("kind", ["giou", "ciou"])
def test_smooth_l1_plus_iou_box_loss_is_the_sum_of_both_terms(kind):
    y_true, y_pred, _, _ = _case()
    smooth = float(MultiBoxLoss().components(y_true, y_pred)["loc"])
    iou = float(MultiBoxLoss(box_loss=kind).components(y_true, y_pred)["loc"])
    both = MultiBoxLoss(box_loss=f"smooth_l1+{kind}")
    assert both.box_weight == 1.0 and both.iou_weight == 2.0
    np.testing.assert_allclose(float(both.components(y_true, y_pred)["loc"]), smooth + 2.0 * iou, rtol=1e-5)
    heavier = MultiBoxLoss(box_loss=f"smooth_l1+{kind}", iou_weight=5.0, box_weight=0.5)
    parts = heavier.components(y_true, y_pred)
    np.testing.assert_allclose(float(parts["loc"]), smooth + 5.0 * iou, rtol=1e-5)
    np.testing.assert_allclose(float(parts["loss"]), float(parts["conf"]) + 0.5 * float(parts["loc"]), rtol=1e-5)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(heavier))
    assert restored.get_config() == heavier.get_config()


def test_iou_box_loss_gradient_is_finite_and_reaches_positive_offsets_only():
    y_true, y_pred, labels, _ = _case()
    y_pred = y_pred.copy()
    y_pred[0, 0, :4] = [50.0, -50.0, 80.0, -80.0]  # a wild background anchor (log-scale clamped)
    y_pred[0, 2, 2:4] = [-60.0, 40.0]  # a positive whose box collapses to a sliver
    for kind in ("giou", "diou", "ciou", "smooth_l1+ciou"):
        x = tf.Variable(y_pred)
        with tf.GradientTape() as tape:
            value = MultiBoxLoss(box_loss=kind)(y_true, x)
        grad = tape.gradient(value, x).numpy()
        assert np.isfinite(float(value)) and np.all(np.isfinite(grad)), kind
        assert np.all(np.any(grad[..., :4] != 0, axis=-1)[labels == 0] == False), kind  # noqa: E712
        assert np.any(grad[1, 10, :4] != 0), kind


# ------------------------------------------------------------------ sigmoid class losses
def test_focal_loss_hand_computed_at_zero_logits():
    y_true, y_pred, labels, _ = _case()
    y_pred = y_pred.copy()
    y_pred[..., 4:4 + 1 + C] = 0.0  # every class probability 0.5
    conf = float(MultiBoxLoss(cls_loss="focal").components(y_true, y_pred)["conf"])
    # 3 positives (one target-1 term each), 1 ignored anchor, 28 background anchors;
    # target-1 term 0.25 * 0.5^2 * ln 2, target-0 term 0.75 * 0.5^2 * ln 2: 3 + 2 * 28 = 59 of those.
    expected = (3 * 0.25 * 0.25 * LN2 + 59 * 0.75 * 0.25 * LN2) / 3
    np.testing.assert_allclose(conf, expected, rtol=1e-6)


@pytest.mark.parametrize("kind", ["focal", "quality_focal", "varifocal", "quality_bce"])
def test_sigmoid_losses_match_numpy_reference(kind):
    y_true, y_pred, labels, matched = _case(seed=5)
    quality = np.zeros(labels.shape)
    for b, a in zip(*np.nonzero(labels > 0)):
        quality[b, a] = _np_iou(_np_decode(y_pred[b, a, :4], ANCHORS[a]), matched[b, a])
    assert 0.05 < quality[labels > 0].min() and quality.max() < 0.95  # a soft target, not 0 or 1
    parts = MultiBoxLoss(cls_loss=kind).components(y_true, y_pred)
    np.testing.assert_allclose(float(parts["conf"]), _np_sigmoid_loss(y_pred[..., 4:7], labels, quality, kind),
                               rtol=1e-5)


def test_quality_softmax_splits_each_positive_target_by_its_iou():
    """Positives: IoU(predicted box, object) on the class, the rest on background; the mined
    negatives are those of plain softmax (the background losses are the same)."""
    y_true, y_pred, labels, matched = _case(seed=5)
    plain = MultiBoxLoss(cls_loss="softmax").components(y_true, y_pred)
    quality = MultiBoxLoss(cls_loss="quality_softmax").components(y_true, y_pred)
    log_probs = y_pred[..., 4:7] - np.log(np.exp(y_pred[..., 4:7]).sum(-1, keepdims=True))
    delta, ious = 0.0, []
    for b, a in zip(*np.nonzero(labels > 0)):
        iou = _np_iou(_np_decode(y_pred[b, a, :4], ANCHORS[a]), matched[b, a])
        on_class, on_background = -log_probs[b, a, labels[b, a]], -log_probs[b, a, 0]
        delta += iou * on_class + (1 - iou) * on_background - on_class
        ious.append(iou)
    assert 0.05 < min(ious) and max(ious) < 0.95  # a soft target, not 0 or 1
    num_pos = (labels > 0).sum()
    np.testing.assert_allclose(float(quality["conf"]), float(plain["conf"]) + delta / num_pos, rtol=1e-5)
    np.testing.assert_allclose(float(quality["loc"]), float(plain["loc"]), rtol=1e-6)
    assert score_activation("quality_softmax") == "softmax"


def test_sigmoid_loss_ignores_ignored_anchors_and_uses_every_other_one():
    y_true, y_pred, labels, _ = _case()
    for kind in ("focal", "quality_focal", "varifocal"):
        x = tf.Variable(y_pred)
        with tf.GradientTape() as tape:
            value = MultiBoxLoss(cls_loss=kind)(y_true, x)
        grad = tape.gradient(value, x).numpy()[..., 4:7]
        assert np.all(grad[1, 12] == 0), kind              # the ignored anchor
        assert np.all(grad[..., 0] == 0), kind             # the background logit is unused
        assert np.all(np.any(grad[labels >= 0] != 0, axis=-1)), kind  # no mining: every other anchor


def test_score_activation_and_bad_names():
    assert score_activation("softmax") == "softmax"
    assert {score_activation(k) for k in ("focal", "quality_focal", "varifocal", "quality_bce")} == {"sigmoid"}
    with pytest.raises(ValueError, match="cls_loss"):
        MultiBoxLoss(cls_loss="bce")
    with pytest.raises(ValueError, match="box_loss"):
        MultiBoxLoss(box_loss="iou")
    loss = MultiBoxLoss(box_loss="ciou", cls_loss="varifocal", assigner="tal", tal_top_k=9)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert restored.get_config() == loss.get_config() and restored.score_activation == "sigmoid"


# ------------------------------------------------------------------ task-aligned assigner
def _tal_hand_case():
    """4 anchors in a row; objects A (class 0), C (class 2) and an ignore object B (class 1)."""
    anchors = np.array([[i / 4, 0, (i + 1) / 4, 1] for i in range(4)], np.float32)
    gt = np.array([[[0, 0.2, 0.5, 0.8],       # A: centres of anchors 0, 1 inside
                    [0.5, 0.2, 1.0, 0.8],     # B (ignore): anchors 2, 3
                    [0.2, 0.1, 0.6, 0.9],     # C: anchor 1 only
                    [0, 0, 0, 0]]], np.float32)  # padding
    classes, ignore = np.array([[0, 1, 2, -1]]), np.array([[False, True, False, False]])
    pred = np.array([[[0, 0.2, 0.5, 0.8],        # IoU 1 with A
                      [0.25, 0.2, 0.5, 0.8],     # IoU 0.5 with A, 0.46875 with C
                      [0.5, 0, 0.75, 1], [0.75, 0, 1, 1]]], np.float32)  # IoU 0.375 with B
    scores = np.array([[[0.5, 0, 0], [0.1, 0, 0.9], [0, 0.6, 0], [0, 0.3, 0]]], np.float32)
    return gt, classes, ignore, anchors[None], pred, scores


def test_tal_hand_worked():
    case = _tal_hand_case()
    boxes, labels, soft = map(ops.convert_to_numpy, task_aligned_match(*case, top_k=2))
    # alignment s * IoU^6: A: anchor 0 0.5, anchor 1 0.1/64; C: anchor 1 0.9 * 0.46875^6 = 0.00966 (higher),
    # but anchor 1's predicted box overlaps A more (0.5 > 0.46875): it goes to A, C gets none.
    np.testing.assert_array_equal(labels[0], [1, 1, -1, -1])
    np.testing.assert_allclose(soft[0], [1.0, (0.1 / 64) / 0.5, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(boxes[0, :2], case[0][0, [0, 0]])
    np.testing.assert_array_equal(boxes[0, 2:], 0)
    boxes, labels, soft = map(ops.convert_to_numpy, task_aligned_match(*case, top_k=1))
    # top 1: A keeps anchor 0; C takes anchor 1 (its only candidate, now unclaimed by A); B anchor 2 (0.6 > 0.3)
    np.testing.assert_array_equal(labels[0], [1, 3, -1, 0])
    np.testing.assert_allclose(soft[0], [1.0, 0.46875, 0, 0], rtol=1e-5)


def test_tal_matches_a_loop_reference_on_random_boxes():
    rng = np.random.default_rng(7)
    grid = [[x / 8, y / 8, (x + 1) / 8, (y + 1) / 8] for y in range(8) for x in range(8)]
    anchors = np.array(grid + [[x / 4, y / 4, (x + 1) / 4, (y + 1) / 4] for y in range(4) for x in range(4)],
                       np.float32)
    anchors += rng.uniform(-0.01, 0.01, anchors.shape).astype(np.float32)
    B, A, M = 3, len(anchors), 6
    xy = rng.uniform(0, 0.6, (B, M, 2))
    gt = np.concatenate([xy, xy + rng.uniform(0.1, 0.4, (B, M, 2))], -1).astype(np.float32)
    classes = rng.integers(0, 3, (B, M))
    classes[1, 4:] = -1
    ignore = rng.uniform(size=(B, M)) < 0.2
    centre = (anchors[None, :, :2] + anchors[None, :, 2:]) / 2 + rng.normal(0, 0.03, (B, A, 2))
    size = (anchors[None, :, 2:] - anchors[None, :, :2]) * rng.uniform(0.7, 2.0, (B, A, 2))
    pred = np.concatenate([centre - size / 2, centre + size / 2], -1).astype(np.float32)
    scores = rng.uniform(0.01, 1, (B, A, 3)).astype(np.float32)
    boxes, labels, soft = map(ops.convert_to_numpy, task_aligned_match(
        gt, classes, ignore, anchors[None], pred, scores, top_k=5, alpha=0.5, beta=4.0))
    for b in range(B):
        ref_labels, ref_soft = _np_tal(gt[b], classes[b], ignore[b], anchors, pred[b], scores[b], 5, 0.5, 4.0)
        np.testing.assert_array_equal(labels[b], ref_labels)
        np.testing.assert_allclose(soft[b], ref_soft, rtol=1e-4, atol=1e-7)
    assert (labels > 0).sum() > 20 and (labels == -1).sum() > 0 and len(np.unique(soft)) > 20


def test_tal_compiles_under_xla_with_a_dynamic_box_count():
    case = _tal_hand_case()
    fn = tf.function(lambda *a: task_aligned_match(*a, top_k=2), jit_compile=True, input_signature=[
        tf.TensorSpec((None, None, 4), tf.float32), tf.TensorSpec((None, None), tf.int64),
        tf.TensorSpec((None, None), tf.bool), tf.TensorSpec((1, 4, 4), tf.float32),
        tf.TensorSpec((None, 4, 4), tf.float32), tf.TensorSpec((None, 4, 3), tf.float32)])
    for m in (4, 3):  # with and without the padding row
        got = fn(case[0][:, :m], case[1][:, :m], case[2][:, :m], *case[3:])
        want = task_aligned_match(case[0][:, :m], case[1][:, :m], case[2][:, :m], *case[3:], top_k=2)
        for g, w in zip(got, want):
            np.testing.assert_allclose(ops.convert_to_numpy(g), ops.convert_to_numpy(w), rtol=1e-6)
    empty = task_aligned_match(np.zeros((1, 0, 4), np.float32), np.zeros((1, 0), int), np.zeros((1, 0), bool),
                               *case[3:])
    assert not np.any(ops.convert_to_numpy(empty[1]))


def test_tal_in_the_loss_uses_its_labels_and_soft_targets():
    y_true, y_pred, _, _ = _case(seed=2)
    y_true, y_pred = y_true.copy(), y_pred.copy()
    y_true[0, 2] = [0.0, 0.0, 0.25, 0.5, 1, 0]  # covers half of anchors 0 and 1: both predict IoU 0.5
    y_pred[0, :2, :4] = 0.0
    # top 1 by sigmoid score: anchor 0 (sigmoid(2) 0.88 > sigmoid(1) 0.73); by softmax it would be
    # anchor 1 (0.05 < 0.73): the assigner must score as the model does.
    y_pred[0, 0, 4:7], y_pred[0, 1, 4:7] = [5.0, -8.0, 2.0], [-5.0, -8.0, 1.0]
    loss = MultiBoxLoss(cls_loss="quality_focal", assigner="tal", tal_top_k=1)
    logits = y_pred[..., 4:7].astype(np.float64)
    scores = 1 / (1 + np.exp(-logits[..., 1:]))
    pred = np.array([[_np_decode(y_pred[b, a, :4], ANCHORS[a]) for a in range(16)] for b in range(2)])
    classes = np.round(y_true[..., 4]).astype(int)
    ref = [_np_tal(y_true[b, :, :4], classes[b], y_true[b, :, 5] > 0.5, ANCHORS, pred[b], scores[b], 1)
           for b in range(2)]
    labels, soft = np.stack([r[0] for r in ref]), np.stack([r[1] for r in ref])
    assert labels[0, 0] == 2 and labels[0, 1] == 0 and labels[1, 12] == -1
    parts = loss.components(y_true, y_pred)
    # divided by the soft targets' sum (YOLOv8), not by the positives (what _np_sigmoid_loss does)
    expected = _np_sigmoid_loss(y_pred[..., 4:7], labels, soft, "quality_focal") * (labels > 0).sum() / max(soft.sum(), 1)
    assert soft.sum() > 1.0
    np.testing.assert_allclose(float(parts["conf"]), expected, rtol=1e-4)
    assert float(parts["num_positives"]) == (labels > 0).sum()
    compiled = tf.function(lambda t, p: loss(t, p), jit_compile=True, input_signature=[
        tf.TensorSpec((None, None, 6), tf.float32), tf.TensorSpec((None, 16, 11), tf.float32)])
    np.testing.assert_allclose(float(compiled(y_true, y_pred)), float(parts["loss"]), rtol=1e-5)


def test_alignment_box_weighting_is_the_soft_target_weighted_mean_of_the_box_losses():
    y_true, y_pred, _, _ = _case(seed=3)
    y_true = y_true.copy()
    y_true[0, 2] = [0.0, 0.0, 0.375, 0.5, 1, 0]  # covers anchors 0-2: several positives with unequal targets
    scores = 1 / (1 + np.exp(-y_pred[..., 5:7].astype(np.float64)))
    pred = np.array([[_np_decode(y_pred[b, a, :4], ANCHORS[a]) for a in range(16)] for b in range(2)])
    classes = np.round(y_true[..., 4]).astype(int)
    losses, soft = [], []
    for b in range(2):
        labels, targets, owner = _np_tal(y_true[b, :, :4], classes[b], y_true[b, :, 5] > 0.5, ANCHORS, pred[b],
                                         scores[b], 3, alpha=0.5, with_owner=True)
        for a in np.nonzero(labels > 0)[0]:
            losses.append(_np_iou_losses(pred[b, a], y_true[b, owner[a], :4])[0])  # 1 - GIoU
            soft.append(targets[a])
    losses, soft = np.array(losses), np.array(soft)
    assert len(losses) >= 4 and soft.sum() > 1.0 and soft.std() > 0.1

    def loc(weighting):
        loss = MultiBoxLoss(cls_loss="quality_focal", assigner="tal", tal_top_k=3, tal_alpha=0.5, box_loss="giou",
                            box_weighting=weighting)
        return float(loss.components(y_true, y_pred)["loc"])

    np.testing.assert_allclose(loc("equal"), losses.mean(), rtol=1e-4)
    # YOLOv8's box loss: sum(target * loss) / max(sum(target), 1)
    np.testing.assert_allclose(loc("alignment"), (soft * losses).sum() / soft.sum(), rtol=1e-4)
    assert abs(loc("alignment") - loc("equal")) > 0.01
    restored = MultiBoxLoss.from_config(MultiBoxLoss(assigner="tal", box_weighting="alignment").get_config())
    assert restored.box_weighting == "alignment"
    with pytest.raises(ValueError, match="assigner='tal'"):
        MultiBoxLoss(box_weighting="alignment")
    with pytest.raises(ValueError, match="box_weighting"):
        MultiBoxLoss(assigner="tal", box_weighting="iou")


# ------------------------------------------------------------------ the sigmoid-scoring model
def test_sigmoid_model_scores_in_detect_and_the_exported_savedmodel(tmp_path):
    from kdet.export import export_saved_model
    from kdet.models.ssd import SSD

    model = SSD(num_classes=2, image_size=64, backbone="vgg16_bn", width_multiplier=0.125, score_activation="sigmoid")
    assert SSD.from_config(model.get_config()).score_activation == "sigmoid"
    images = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3)).astype("uint8")
    raw = ops.convert_to_numpy(model(images.astype("float32")))
    bias = ops.convert_to_numpy(model.get_layer("class_head_0").bias)
    np.testing.assert_allclose(bias, math.log(0.01 / 0.99), rtol=1e-6)  # RetinaNet's prior probability 0.01
    # iou_threshold 1: no suppression, so the top 10 are the 10 best sigmoid values whatever the random weights
    # (an earlier test's draws change them; two top boxes can overlap above 0.45)
    dets = model.detect(images, score_threshold=0.0, max_detections=10, iou_threshold=1.0)
    top = 1 / (1 + np.exp(-raw[0, :, 5:7]))
    np.testing.assert_allclose(np.sort(ops.convert_to_numpy(dets["scores"][0]))[::-1], np.sort(top.ravel())[::-1][:10],
                               rtol=1e-5)  # sigmoid of the class logits, not a softmax with background
    export_dir = export_saved_model(model, str(tmp_path / "sm"), ["a", "b"], score_threshold=0.0, max_detections=10,
                                    iou_threshold=1.0)
    served = tf.saved_model.load(export_dir).signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(served["detection_scores"].numpy(), ops.convert_to_numpy(dets["scores"]), rtol=1e-5)
    with pytest.raises(ValueError, match="score_activation"):
        SSD(num_classes=2, image_size=64, backbone="vgg16_bn", width_multiplier=0.125, score_activation="relu")


def test_engine_builds_a_sigmoid_model_for_a_sigmoid_class_loss():
    from kdet.config import merge
    from kdet.defaults import default_recipe
    from kdet.engine import RecipeError, build_model

    recipe = merge(default_recipe(), dict(model=dict(backbone="vgg16_bn", image_size=64, width_multiplier=0.125,
                                                     backbone_weights=None), loss=dict(cls_loss="focal")))
    assert build_model(recipe, ["a", "b"]).score_activation == "sigmoid"
    recipe["loss"]["cls_loss"] = "softmax"
    assert build_model(recipe, ["a", "b"]).score_activation == "softmax"
    recipe["loss"]["cls_loss"] = "sigmoid"
    with pytest.raises(RecipeError, match="cls_loss"):
        build_model(recipe, ["a", "b"])
