"""decode_detections against tf.image.non_max_suppression and hand-made cases."""

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from kdet.postprocess import decode_detections

C = 3


def _numpy(result):
    return {k: ops.convert_to_numpy(v) for k, v in result.items()}


def _random_predictions(seed, batch=2, anchors=120, classes=C):
    """Anchors crowded into a small area so that NMS has plenty to suppress."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-0.05, 0.6, (anchors, 2))
    anchor_boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.4, (anchors, 2))], 1)
    y_pred = np.zeros((batch, anchors, 4 + 1 + classes + 4), np.float32)
    y_pred[..., :4] = rng.normal(0, 0.5, (batch, anchors, 4))
    y_pred[..., 4:5 + classes] = rng.normal(0, 2, (batch, anchors, 1 + classes))
    y_pred[..., 5 + classes:] = anchor_boxes
    return y_pred


def _reference(y_pred, score_threshold, iou_threshold, max_detections, top_k, per_class_top_k=False,
               class_agnostic=False):
    """Independent decoding in numpy, NMS by tf.image.non_max_suppression per class."""
    out = []
    num_classes = y_pred.shape[-1] - 9
    for image in y_pred.astype(np.float64):
        off, logits, anc = image[:, :4], image[:, 4:5 + num_classes], image[:, 5 + num_classes:]
        aw, ah = anc[:, 2] - anc[:, 0], anc[:, 3] - anc[:, 1]
        cx = (anc[:, 0] + anc[:, 2]) / 2 + off[:, 0] * 0.1 * aw
        cy = (anc[:, 1] + anc[:, 3]) / 2 + off[:, 1] * 0.1 * ah
        w, h = aw * np.exp(off[:, 2] * 0.2), ah * np.exp(off[:, 3] * 0.2)
        boxes = np.clip(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), 0, 1)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        scores = probs[:, 1:]
        anchor_idx, class_idx = np.meshgrid(np.arange(len(boxes)), np.arange(num_classes), indexing="ij")
        anchor_idx, class_idx, flat = anchor_idx.ravel(), class_idx.ravel(), scores.ravel()
        if per_class_top_k:
            chosen = np.concatenate([np.nonzero(class_idx == c)[0][np.argsort(-scores[:, c])[:top_k]]
                                     for c in range(num_classes)])
        else:
            chosen = np.argsort(-flat)[:top_k]
        chosen = chosen[flat[chosen] > score_threshold]
        kept = []
        groups = [None] if class_agnostic else range(num_classes)
        for c in groups:
            idx = chosen if c is None else chosen[class_idx[chosen] == c]
            if len(idx) == 0:
                continue
            sel = tf.image.non_max_suppression(
                boxes[anchor_idx[idx]][:, [1, 0, 3, 2]].astype(np.float32), flat[idx].astype(np.float32),
                max_output_size=len(idx), iou_threshold=iou_threshold).numpy()
            kept.extend(idx[sel])
        kept = np.array(sorted(kept, key=lambda i: -flat[i])[:max_detections], int)
        out.append((boxes[anchor_idx[kept]], flat[kept], class_idx[kept]))
    return out


@pytest.mark.parametrize(
    "options",
    [
        dict(score_threshold=0.05, iou_threshold=0.45, max_detections=50, pre_nms_top_k=200),
        dict(score_threshold=0.3, iou_threshold=0.3, max_detections=300, pre_nms_top_k=100),
        dict(score_threshold=0.05, iou_threshold=0.5, max_detections=40, pre_nms_top_k=60, per_class_top_k=True),
        dict(score_threshold=0.05, iou_threshold=0.45, max_detections=30, pre_nms_top_k=200, class_agnostic=True),
    ],
)
def test_matches_tf_nms_reference(options):
    y_pred = _random_predictions(seed=len(str(options)))
    got = _numpy(decode_detections(y_pred, **options))
    expected = _reference(
        y_pred, options["score_threshold"], options["iou_threshold"], options["max_detections"],
        options["pre_nms_top_k"], options.get("per_class_top_k", False), options.get("class_agnostic", False),
    )
    K = options["max_detections"]
    for b, (boxes, scores, classes) in enumerate(expected):
        n = len(scores)
        assert 0 < n and got["num_detections"][b] == n
        assert got["boxes"].shape == (2, K, 4) and got["classes"].dtype == np.int32
        np.testing.assert_allclose(got["scores"][b, :n], scores, rtol=1e-5)
        np.testing.assert_array_equal(got["classes"][b, :n], classes)
        np.testing.assert_allclose(got["boxes"][b, :n], boxes, atol=1e-5)
        # Padding rows.
        assert np.all(got["scores"][b, n:] == 0) and np.all(got["classes"][b, n:] == -1)
        assert np.all(got["boxes"][b, n:] == 0)


def test_nms_actually_suppresses():
    # Without suppression the reference would keep more: make sure the case is not trivial.
    y_pred = _random_predictions(seed=5)
    strict = _numpy(decode_detections(y_pred, iou_threshold=0.3, max_detections=100, pre_nms_top_k=100))
    loose = _numpy(decode_detections(y_pred, iou_threshold=1.0, max_detections=100, pre_nms_top_k=100))
    assert np.all(strict["num_detections"] < 0.7 * loose["num_detections"])


def _hand_case():
    """One image, two classes, three anchors: two overlapping boxes of class 0, one of class 1."""
    anchors = np.array([[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5], [0.6, 0.6, 0.9, 0.9]], np.float32)
    probs = np.array([[0.1, 0.8, 0.1], [0.21, 0.7, 0.09], [0.5, 0.005, 0.495]])
    y_pred = np.concatenate([np.zeros((3, 4)), np.log(probs), anchors], 1)[None].astype(np.float32)
    return y_pred


def test_hand_case_values_and_padding():
    got = _numpy(decode_detections(_hand_case(), score_threshold=0.01, iou_threshold=0.45, max_detections=5))
    # Anchor 1 (IoU 0.905 with anchor 0, same class) is suppressed; anchor 0's class-1 score 0.1 stays,
    # while anchor 1's class-1 score 0.09 is suppressed by it.
    assert got["num_detections"].tolist() == [3]
    np.testing.assert_allclose(got["scores"][0], [0.8, 0.495, 0.1, 0, 0], rtol=1e-5)
    np.testing.assert_array_equal(got["classes"][0], [0, 1, 1, -1, -1])
    np.testing.assert_allclose(got["boxes"][0, :3], _hand_case()[0, [0, 2, 0], -4:], atol=1e-6)
    assert np.all(got["boxes"][0, 3:] == 0)
    agnostic = _numpy(decode_detections(_hand_case(), class_agnostic=True, max_detections=5))
    # Class-agnostic: the class-1 box on anchor 0 is suppressed by the class-0 box there.
    np.testing.assert_array_equal(agnostic["classes"][0], [0, 1, -1, -1, -1])


def test_boxes_clipped_and_nothing_above_threshold():
    y_pred = _hand_case()
    y_pred[0, 0, :4] = [-30, -30, 5, 5]  # far outside the image, huge
    got = _numpy(decode_detections(y_pred, max_detections=4))
    assert got["boxes"].min() >= 0 and got["boxes"].max() <= 1
    empty = _numpy(decode_detections(y_pred, score_threshold=0.9, max_detections=4))
    assert empty["num_detections"].tolist() == [0]
    assert np.all(empty["classes"] == -1) and np.all(empty["scores"] == 0)


def test_xla_compiles_with_unknown_batch_and_matches_eager():
    y_pred = _random_predictions(seed=9, batch=3, anchors=50)
    fn = tf.function(lambda p: decode_detections(p, max_detections=20, pre_nms_top_k=40), jit_compile=True,
                     input_signature=[tf.TensorSpec((None,) + y_pred.shape[1:], tf.float32)])
    compiled, eager = _numpy(fn(y_pred)), _numpy(decode_detections(y_pred, max_detections=20, pre_nms_top_k=40))
    for key in eager:
        np.testing.assert_allclose(compiled[key], eager[key], rtol=1e-5, atol=1e-6)


def test_bad_shape_is_rejected():
    with pytest.raises(ValueError, match="4 \\+ \\(1 \\+ C\\) \\+ 4"):
        decode_detections(np.zeros((1, 10, 9), np.float32))


def test_count_candidates_counts_pairs_above_the_threshold_over_all_classes_or_per_class():
    from kdet.postprocess import count_candidates

    # 1 image, 3 anchors, 2 classes; sigmoid scores by hand: logit 0 -> 0.5, 3 -> 0.953, -5 -> 0.0067
    logits = np.array([[[9.0, 3.0, 0.0], [9.0, 0.0, -5.0], [9.0, -5.0, 3.0]]])  # background logit unused
    y_pred = np.concatenate([np.zeros((1, 3, 4)), logits, np.zeros((1, 3, 4))], -1).astype("float32")
    assert ops.convert_to_numpy(count_candidates(y_pred, 0.01, "sigmoid")).tolist() == [4]  # 0.953, 0.5, 0.5, 0.953
    assert ops.convert_to_numpy(count_candidates(y_pred, 0.6, "sigmoid")).tolist() == [2]
    assert ops.convert_to_numpy(count_candidates(y_pred, 0.01, "sigmoid", per_class=True)).tolist() == [2]
    # softmax: background 9 dominates; only the scores above 0.01 count: exp(3) / (exp(9) + 1 + exp(3)) = 0.0025
    assert ops.convert_to_numpy(count_candidates(y_pred, 0.01, "softmax")).tolist() == [0]
    assert ops.convert_to_numpy(count_candidates(y_pred, 0.001, "softmax")).tolist() == [2]
