"""MultiBoxLoss against a plain-numpy re-implementation on a hand-made case."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdet.losses import MultiBoxLoss, check_finite, numeric_class_weights

C = 2  # foreground classes
# 16 disjoint anchors: two rows of 8 cells, each 1/8 wide and 1/2 high.
ANCHORS = np.array(
    [[i / 8, r / 2, (i + 1) / 8, (r + 1) / 2] for r in range(2) for i in range(8)], np.float32
)


def _case(seed=0):
    """Two images; the matching is known by construction (GTs sit on single anchors).

    Image 0: class 1 exactly on anchor 2, class 0 slightly shifted on anchor 5.
    Image 1: class 0 on anchor 10, an ignore GT on anchor 12, one padding row.
    """
    shifted = ANCHORS[5] + np.array([0.01, 0.02, 0.0, -0.03], np.float32)
    y_true = np.zeros((2, 3, 6), np.float32)
    y_true[..., 4] = -1
    y_true[0, 0] = [*ANCHORS[2], 1, 0]
    y_true[0, 1] = [*shifted, 0, 0]
    y_true[1, 0] = [*ANCHORS[10] + 0.005, 0, 0]
    y_true[1, 1] = [*ANCHORS[12], 1, 1]
    labels = np.zeros((2, 16), np.int64)
    labels[0, 2], labels[0, 5], labels[1, 10], labels[1, 12] = 2, 1, 1, -1
    matched = np.zeros((2, 16, 4), np.float32)
    matched[0, 2], matched[0, 5], matched[1, 10] = ANCHORS[2], shifted, ANCHORS[10] + 0.005

    rng = np.random.default_rng(seed)
    y_pred = np.zeros((2, 16, 4 + 1 + C + 4), np.float32)
    y_pred[..., :4] = rng.normal(0, 1.5, (2, 16, 4))  # some |x| > 1 to use both smooth-L1 branches
    y_pred[..., 4:7] = rng.normal(0, 2, (2, 16, 3))
    y_pred[1, 12, 4] = -20.0  # the ignored anchor has the worst background loss: must not be mined
    y_pred[..., 7:] = ANCHORS
    return y_true, y_pred, labels, matched


def _numpy_loss(y_pred, labels, matched, weights=(1.0, 1.0, 1.0), alpha=1.0, ratio=3, min_negatives=0):
    """The SSD loss written out plainly, loops over images and anchors."""
    weights = np.asarray(weights, np.float64)
    loc_total = conf_total = 0.0
    for b in range(len(labels)):
        offsets, logits = y_pred[b, :, :4].astype(np.float64), y_pred[b, :, 4:7].astype(np.float64)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        positives = np.nonzero(labels[b] > 0)[0]
        for a in positives:
            g, an = matched[b, a].astype(np.float64), ANCHORS[a].astype(np.float64)
            gw, gh, aw, ah = g[2] - g[0], g[3] - g[1], an[2] - an[0], an[3] - an[1]
            target = [((g[0] + g[2]) / 2 - (an[0] + an[2]) / 2) / (aw * 0.1),
                      ((g[1] + g[3]) / 2 - (an[1] + an[3]) / 2) / (ah * 0.1),
                      np.log(gw / aw) / 0.2, np.log(gh / ah) / 0.2]
            d = np.abs(offsets[a] - target)
            loc_total += np.sum(np.where(d < 1, 0.5 * d ** 2, d - 0.5))
            conf_total += -log_probs[a, labels[b, a]] * weights[labels[b, a]]
        candidates = np.nonzero(labels[b] == 0)[0]
        hardest = candidates[np.argsort(log_probs[candidates, 0])]  # most negative log p(bg) first
        for a in hardest[: max(ratio * len(positives), min_negatives)]:
            conf_total += -log_probs[a, 0] * weights[0]
    num_pos = max((labels > 0).sum(), 1)
    return (conf_total + alpha * loc_total) / num_pos, loc_total / num_pos, conf_total / num_pos


def test_matches_numpy_reference():
    y_true, y_pred, labels, matched = _case()
    parts = MultiBoxLoss().components(y_true, y_pred)
    total, loc, conf = _numpy_loss(y_pred, labels, matched)
    np.testing.assert_allclose(float(parts["loss"]), total, rtol=1e-5)
    np.testing.assert_allclose(float(parts["loc"]), loc, rtol=1e-5)
    np.testing.assert_allclose(float(parts["conf"]), conf, rtol=1e-5)
    assert float(parts["num_positives"]) == 3
    np.testing.assert_allclose(float(MultiBoxLoss()(y_true, y_pred)), total, rtol=1e-5)


def test_alpha_and_negative_ratio():
    y_true, y_pred, labels, matched = _case(seed=1)
    value = float(MultiBoxLoss(alpha=2.5, neg_pos_ratio=1)(y_true, y_pred))
    np.testing.assert_allclose(value, _numpy_loss(y_pred, labels, matched, alpha=2.5, ratio=1)[0], rtol=1e-5)
    # Ratio larger than the candidates available: every background anchor is a negative.
    value = float(MultiBoxLoss(neg_pos_ratio=100)(y_true, y_pred))
    np.testing.assert_allclose(value, _numpy_loss(y_pred, labels, matched, ratio=100)[0], rtol=1e-5)


def test_min_negatives_by_hand():
    y_true, y_pred, labels, matched = _case(seed=3)
    # image 0: 2 positives -> max(1 * 2, 5) = 5 negatives; image 1: 1 positive -> 5
    value = float(MultiBoxLoss(neg_pos_ratio=1, min_negatives=5)(y_true, y_pred))
    np.testing.assert_allclose(value, _numpy_loss(y_pred, labels, matched, ratio=1, min_negatives=5)[0], rtol=1e-5)
    assert abs(value - _numpy_loss(y_pred, labels, matched, ratio=1)[0]) > 1e-3
    # no positives at all: the loss is the min_negatives hardest background anchors (over a count of 1)
    empty = y_true.copy()
    empty[..., 4] = -1
    none = np.zeros_like(labels)
    value = float(MultiBoxLoss(min_negatives=4)(empty, y_pred))
    np.testing.assert_allclose(value, _numpy_loss(y_pred, none, matched, min_negatives=4)[0], rtol=1e-5)
    assert value > 0 and float(MultiBoxLoss()(empty, y_pred)) == 0.0


def test_negative_iou_threshold_keeps_half_covering_anchors_out_of_the_negatives():
    y_true, y_pred, labels, matched = _case(seed=4)
    # a third object in image 0 covers anchor 3 and 80% of anchor 4: IoU 1/1.8 = 0.556 with anchor 3
    # (positive), 0.8/1.8 = 0.444 with anchor 4 (in the 0.4..0.5 band)
    box = np.array([3 / 8, 0.0, 4.8 / 8, 0.5], np.float32)
    y_true[0, 2] = [*box, 0, 0]
    labels[0, 3], matched[0, 3] = 1, box
    y_pred[0, 4, 4] = -15.0  # anchor 4 has the worst background loss: the first mined negative, unless banded
    plain = float(MultiBoxLoss()(y_true, y_pred))
    np.testing.assert_allclose(plain, _numpy_loss(y_pred, labels, matched)[0], rtol=1e-5)
    banded_labels = labels.copy()
    banded_labels[0, 4] = -1
    banded = float(MultiBoxLoss(negative_iou_threshold=0.4)(y_true, y_pred))
    np.testing.assert_allclose(banded, _numpy_loss(y_pred, banded_labels, matched)[0], rtol=1e-5)
    assert plain - banded > 1.0  # anchor 4's -log p(background) ~ 15+, over 4 positives
    # a band starting above 0.444 leaves anchor 4 a negative
    np.testing.assert_allclose(float(MultiBoxLoss(negative_iou_threshold=0.45)(y_true, y_pred)), plain, rtol=1e-6)


def test_class_weights_forms():
    y_true, y_pred, labels, matched = _case(seed=2)
    expected = _numpy_loss(y_pred, labels, matched, weights=(0.5, 2.0, 3.0))[0]
    unweighted = _numpy_loss(y_pred, labels, matched)[0]
    assert abs(expected - unweighted) > 1e-3
    full = float(MultiBoxLoss(class_weights=[0.5, 2.0, 3.0])(y_true, y_pred))
    np.testing.assert_allclose(full, expected, rtol=1e-5)
    # Foreground-only list: background weight 1.
    expected_fg = _numpy_loss(y_pred, labels, matched, weights=(1.0, 2.0, 3.0))[0]
    np.testing.assert_allclose(float(MultiBoxLoss(class_weights=[2.0, 3.0])(y_true, y_pred)), expected_fg, rtol=1e-5)
    by_name = MultiBoxLoss(class_weights={"wbc": 3.0, "rbc": 2.0}, class_names=["rbc", "wbc"])
    np.testing.assert_allclose(float(by_name(y_true, y_pred)), expected_fg, rtol=1e-5)
    assert by_name.class_weights == [1.0, 2.0, 3.0]


def test_class_weight_errors():
    with pytest.raises(ValueError, match="resolved"):
        MultiBoxLoss(class_weights="auto")
    with pytest.raises(ValueError, match="class_names"):
        MultiBoxLoss(class_weights={"a": 2.0})
    with pytest.raises(ValueError, match="not in class_names"):
        MultiBoxLoss(class_weights={"zebra": 2.0}, class_names=["a", "b"])
    with pytest.raises(ValueError, match="expected 2"):
        MultiBoxLoss(class_weights=[1, 2, 3, 4], num_classes=2)
    with pytest.raises(ValueError, match=">= 0"):
        numeric_class_weights([1.0, -1.0], num_classes=2)
    y_true, y_pred, _, _ = _case()
    with pytest.raises(ValueError, match="logits"):
        MultiBoxLoss(class_weights=[1, 2, 3, 4, 5])(y_true, y_pred)


def test_zero_positives_gives_zero_loss_and_finite_gradient():
    _, y_pred, _, _ = _case()
    y_true = np.zeros((2, 3, 6), np.float32)
    y_true[..., 4] = -1  # all padding
    y_pred = tf.Variable(y_pred)
    with tf.GradientTape() as tape:
        value = MultiBoxLoss()(y_true, y_pred)
    grad = tape.gradient(value, y_pred).numpy()
    assert float(value) == 0.0 and np.all(np.isfinite(grad))
    # With min_negatives the loss trains background on empty images, still finite.
    with tf.GradientTape() as tape:
        value = MultiBoxLoss(min_negatives=4)(y_true, y_pred)
    grad = tape.gradient(value, y_pred).numpy()
    assert float(value) > 0 and np.all(np.isfinite(grad)) and np.any(grad != 0)
    assert np.all(grad[..., 7:] == 0)  # no gradient into the anchors


def test_gradient_only_reaches_positives_and_mined_negatives():
    y_true, y_pred, labels, _ = _case()
    y_pred = tf.Variable(y_pred)
    with tf.GradientTape() as tape:
        value = MultiBoxLoss(neg_pos_ratio=1)(y_true, y_pred)
    grad = tape.gradient(value, y_pred).numpy()
    touched = np.any(grad[..., 4:7] != 0, axis=-1)
    assert touched.sum() == 2 * (labels > 0).sum()  # 3 positives + 3 negatives
    assert not touched[1, 12]  # the ignored anchor
    assert np.all(np.any(grad[..., :4] != 0, axis=-1) == (labels > 0))


def test_xla_compiles_and_matches_eager():
    y_true, y_pred, _, _ = _case()
    loss = MultiBoxLoss(class_weights=[0.5, 2.0, 3.0])
    # Unknown batch and box-slot counts, as a padded_batch pipeline may give.
    compiled = tf.function(lambda t, p: loss(t, p), jit_compile=True, input_signature=[
        tf.TensorSpec((None, None, 6), tf.float32), tf.TensorSpec((None, 16, 11), tf.float32)])
    np.testing.assert_allclose(float(compiled(y_true, y_pred)), float(loss(y_true, y_pred)), rtol=1e-5)


def test_serialization_and_compile():
    loss = MultiBoxLoss(class_weights={"b": 2.0}, class_names=["a", "b"], alpha=2.0, negative_iou_threshold=0.4)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, MultiBoxLoss)
    assert restored.get_config() == loss.get_config()
    assert restored.negative_iou_threshold == 0.4

    # Plain model.compile / evaluate with the conventions' layouts.
    y_true, y_pred, _, _ = _case()
    inputs = keras.Input((16, 11))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))
    model.compile(loss=MultiBoxLoss())
    value = model.evaluate(y_pred, y_true, batch_size=2, verbose=0)
    np.testing.assert_allclose(value, float(MultiBoxLoss()(y_true, y_pred)), rtol=1e-5)


def test_atss_assigner_trains_on_the_atss_matches():
    from kdet.matching import atss_match

    y_true, y_pred, _, _ = _case()
    boxes, labels = atss_match(y_true[..., :4], np.round(y_true[..., 4]).astype(int), y_true[..., 5] > 0.5,
                               ANCHORS[None], [8, 8], top_k=3)
    labels = keras.ops.convert_to_numpy(labels)
    assert (labels > 0).sum() == 3 and labels[1, 12] == -1
    loss = MultiBoxLoss(assigner="atss", anchors_per_level=[8, 8], atss_top_k=3)
    expected = _numpy_loss(y_pred, labels, keras.ops.convert_to_numpy(boxes))[0]
    np.testing.assert_allclose(float(loss(y_true, y_pred)), expected, rtol=1e-5)
    compiled = tf.function(lambda t, p: loss(t, p), jit_compile=True, input_signature=[
        tf.TensorSpec((None, None, 6), tf.float32), tf.TensorSpec((None, 16, 11), tf.float32)])
    np.testing.assert_allclose(float(compiled(y_true, y_pred)), expected, rtol=1e-5)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert restored.get_config() == loss.get_config() and restored.anchors_per_level == [8, 8]
    with pytest.raises(ValueError, match="anchors_per_level"):
        MultiBoxLoss(assigner="atss")
    with pytest.raises(ValueError, match="assigner"):
        MultiBoxLoss(assigner="max-iou")


def test_check_finite():
    check_finite({"loss": 1.0, "loc": np.array([0.5])}, step=3)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 12.*learning rate"):
        check_finite({"loss": float("nan"), "conf": 1.0}, step=12)
