"""Box encoding and anchor matching against hand-worked cases and a loop reference."""

import numpy as np
import pytest
from keras import ops

from kdet.boxes import iou_matrix_np
from kdet.matching import atss_match, decode_boxes, encode_boxes, match_anchors


def _match(gt_boxes, gt_classes, anchors, gt_ignore=None, threshold=0.5, negative_threshold=None):
    gt_boxes = np.asarray(gt_boxes, np.float32)
    gt_classes = np.asarray(gt_classes, np.int32)
    if gt_boxes.ndim == 2:  # single image
        gt_boxes, gt_classes = gt_boxes[None], gt_classes[None]
    if gt_ignore is None:
        gt_ignore = np.zeros(gt_classes.shape, bool)
    gt_ignore = np.asarray(gt_ignore, bool).reshape(gt_classes.shape)
    anchors = np.asarray(anchors, np.float32)
    if anchors.ndim == 2:
        anchors = anchors[None]
    boxes, labels = match_anchors(gt_boxes, gt_classes, gt_ignore, anchors, threshold, negative_threshold)
    return ops.convert_to_numpy(boxes), ops.convert_to_numpy(labels)


# ------------------------------------------------------------------ encoding
def test_encode_hand_computed():
    anchor = np.array([[0.2, 0.2, 0.6, 0.4]], np.float32)  # centre (0.4, 0.3), size (0.4, 0.2)
    gt = np.array([[0.3, 0.2, 0.7, 0.6]], np.float32)  # centre (0.5, 0.4), size (0.4, 0.4)
    # ((0.5-0.4)/(0.4*0.1), (0.4-0.3)/(0.2*0.1), log(0.4/0.4)/0.2, log(0.4/0.2)/0.2)
    expected = [[2.5, 5.0, 0.0, np.log(2.0) / 0.2]]
    np.testing.assert_allclose(ops.convert_to_numpy(encode_boxes(gt, anchor)), expected, rtol=1e-5, atol=1e-5)
    # Other variances scale the two parts independently.
    other = ops.convert_to_numpy(encode_boxes(gt, anchor, variances=(1.0, 1.0)))
    np.testing.assert_allclose(other, [[0.25, 0.5, 0.0, np.log(2.0)]], rtol=1e-5, atol=1e-6)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(1)
    def random_boxes(n):
        xy = rng.uniform(0, 0.8, (n, 2))
        return np.concatenate([xy, xy + rng.uniform(0.01, 0.2, (n, 2))], 1).astype(np.float32)
    boxes, anchors = random_boxes(50), random_boxes(50)
    decoded = decode_boxes(encode_boxes(boxes, anchors), anchors)
    np.testing.assert_allclose(ops.convert_to_numpy(decoded), boxes, atol=1e-5)


def test_decode_clamps_huge_scale_and_encode_of_empty_box_is_finite():
    anchor = np.array([[0.4, 0.4, 0.6, 0.6]], np.float32)
    decoded = ops.convert_to_numpy(decode_boxes(np.array([[0, 0, 1e4, 1e4]], np.float32), anchor))
    assert np.all(np.isfinite(decoded))
    np.testing.assert_allclose(decoded[0, 2] - decoded[0, 0], 0.2 * 1000 / 16, rtol=1e-4)
    assert np.all(np.isfinite(ops.convert_to_numpy(encode_boxes(np.zeros((1, 4), np.float32), anchor))))


# ------------------------------------------------------------------ matching
ANCHORS = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]


def test_each_gt_takes_its_overlapping_anchor():
    gt = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]
    boxes, labels = _match(gt, [2, 0], ANCHORS)
    # anchor 2 overlaps each GT with IoU 0.25 only: background.
    np.testing.assert_array_equal(labels, [[3, 1, 0]])
    np.testing.assert_allclose(boxes[0], [gt[0], gt[1], [0, 0, 0, 0]])


def test_threshold_is_inclusive():
    anchors = [[0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 1.0, 1.0]]
    # IoU 1, exactly 0.5 and 0 with the three anchors.
    _, labels = _match([[0.0, 0.0, 1.0, 0.5]], [4], anchors)
    np.testing.assert_array_equal(labels, [[5, 5, 0]])


def test_forced_best_anchor_below_threshold():
    # IoU with anchor 0 is 0.04/0.16 = 0.25 < 0.5, yet it is the GT's best anchor.
    anchors = [[0.0, 0.0, 0.4, 0.4], [0.6, 0.6, 1.0, 1.0]]
    _, labels = _match([[0.0, 0.0, 0.2, 0.2]], [1], anchors)
    np.testing.assert_array_equal(labels, [[2, 0]])


def test_two_gts_claiming_one_anchor_the_later_wins():
    anchors = [[0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]]
    a, b = [0.0, 0.0, 0.6, 0.6], [0.3, 0.3, 1.0, 1.0]  # IoU 0.36 and 0.49 with anchor 0
    boxes, labels = _match([a, b], [0, 1], anchors)
    np.testing.assert_array_equal(labels, [[2, 0]])
    np.testing.assert_allclose(boxes[0, 0], b)
    _, labels = _match([b, a], [1, 0], anchors)
    np.testing.assert_array_equal(labels, [[1, 0]])


def test_ignore_gt_makes_overlapping_anchor_ignored_but_claims_nothing():
    anchors = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0]]
    gt = [[0.0, 0.0, 0.5, 0.45],  # ignored, IoU 0.9 with anchor 0
          [0.5, 0.5, 0.75, 0.75],  # ignored, best IoU 0.25 with anchor 1: not forced
          [0.0, 0.5, 0.5, 1.0]]  # normal, anchor 2
    _, labels = _match(gt, [0, 1, 2], anchors, gt_ignore=[True, True, False])
    np.testing.assert_array_equal(labels, [[-1, 0, 3]])


def test_forced_claim_beats_ignore():
    anchors = [[0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 1.0, 1.0]]
    gt = [[0.0, 0.0, 0.5, 0.5],  # ignored, IoU 1 with anchor 0
          [0.0, 0.0, 0.3, 0.3]]  # normal, best anchor is anchor 0 (IoU 0.36)
    _, labels = _match(gt, [0, 1], anchors, gt_ignore=[True, False])
    np.testing.assert_array_equal(labels, [[2, 0]])


def test_negative_band_ignores_half_covering_anchors():
    gt = [[0.0, 0.0, 0.5, 0.5], [0.55, 0.55, 1.0, 1.0]]
    anchors = [[0.0, 0.0, 0.5, 0.5],    # IoU 1 with gt 0: positive
               [0.0, 0.0, 0.5, 0.3],    # IoU 0.6: positive
               [0.0, 0.0, 0.5, 0.225],  # IoU 0.45: in the 0.4..0.5 band -> ignored
               [0.0, 0.0, 0.5, 0.175],  # IoU 0.35: background
               [0.5, 0.5, 1.0, 1.0]]    # IoU 0.81 with gt 1, its best anchor: positive
    _, labels = _match(gt, [0, 1], anchors, negative_threshold=0.4)
    np.testing.assert_array_equal(labels, [[1, 1, -1, 0, 2]])
    _, labels = _match(gt, [0, 1], anchors)  # no band: the SSD rule
    np.testing.assert_array_equal(labels, [[1, 1, 0, 0, 2]])
    # A forced best anchor inside the band stays positive.
    _, labels = _match([[0.0, 0.0, 0.5, 0.5]], [0], [[0.0, 0.0, 0.5, 0.225]], negative_threshold=0.4)
    np.testing.assert_array_equal(labels, [[1]])


def test_padding_never_matches():
    # The padding row equals anchor 1 exactly; it must leave it background.
    gt = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]
    boxes, labels = _match(gt, [0, -1], ANCHORS)
    np.testing.assert_array_equal(labels, [[1, 0, 0]])
    np.testing.assert_allclose(boxes[0, 1], 0)
    # All padding: all background.
    _, labels = _match(gt, [-1, -1], ANCHORS)
    np.testing.assert_array_equal(labels, [[0, 0, 0]])
    # No ground-truth slots at all, batch of 2.
    boxes, labels = _match(np.zeros((2, 0, 4)), np.zeros((2, 0)), ANCHORS)
    assert boxes.shape == (2, 3, 4) and labels.shape == (2, 3)
    assert np.all(labels == 0) and np.all(boxes == 0)


def _reference_match(gt, classes, ignore, anchors, threshold):
    """ssd.pytorch's match(), with the loop over ground truths, plus the ignore rule."""
    labels = np.zeros(len(anchors), np.int64)
    valid = classes >= 0
    if not valid.any():
        return labels
    gt, classes, ignore = gt[valid], classes[valid], ignore[valid]
    iou = iou_matrix_np(gt, anchors)  # [M, A]
    best_gt, best_overlap = iou.argmax(0), iou.max(0)
    forced = np.zeros(len(anchors), bool)
    for j in range(len(gt)):
        if not ignore[j] and iou[j].max() > 0:
            best_gt[iou[j].argmax()] = j
            forced[iou[j].argmax()] = True
    for a in range(len(anchors)):
        if forced[a] or (best_overlap[a] >= threshold and not ignore[best_gt[a]]):
            labels[a] = classes[best_gt[a]] + 1
        elif best_overlap[a] >= threshold:
            labels[a] = -1
    return labels


def test_batch_matches_loop_reference_on_random_boxes():
    rng = np.random.default_rng(7)
    B, M, A = 4, 6, 40

    def random_boxes(*shape):
        xy = rng.uniform(0, 0.7, shape + (2,))
        return np.concatenate([xy, xy + rng.uniform(0.1, 0.3, shape + (2,))], -1).astype(np.float32)

    anchors, gt = random_boxes(A), random_boxes(B, M)
    gt[:, :, :2] = np.round(gt[:, :, :2], 1)  # some exact repeats make ties and overlaps likelier
    classes = rng.integers(0, 3, (B, M))
    classes[0, 4:] = -1
    classes[3, :] = -1
    ignore = rng.uniform(size=(B, M)) < 0.25
    boxes, labels = _match(gt, classes, anchors, gt_ignore=ignore, threshold=0.4)
    for b in range(B):
        np.testing.assert_array_equal(labels[b], _reference_match(gt[b], classes[b], ignore[b], anchors, 0.4))
    assert (labels > 0).sum() > 5 and (labels == -1).sum() > 0  # the case exercises every label
    # Positive boxes are ground truths of the matched class; others are zero.
    for b, a in zip(*np.nonzero(labels > 0)):
        rows = np.nonzero(np.all(np.isclose(gt[b], boxes[b, a]), axis=1))[0]
        assert len(rows) and (classes[b, rows] + 1 == labels[b, a]).any()
    assert np.all(boxes[labels <= 0] == 0)


def test_per_image_anchors_give_same_result_as_shared():
    rng = np.random.default_rng(3)
    anchors = np.sort(rng.uniform(0, 1, (1, 20, 4)).astype(np.float32).reshape(1, 20, 2, 2), axis=2)
    anchors = anchors.transpose(0, 1, 3, 2).reshape(1, 20, 4)
    gt = anchors[:, :3].repeat(2, axis=0) + 0.01
    classes = np.array([[0, 1, 2], [2, -1, 0]])
    shared = _match(gt, classes, anchors)[1]
    tiled = _match(gt, classes, anchors.repeat(2, axis=0))[1]
    np.testing.assert_array_equal(shared, tiled)


# ------------------------------------------------------------------ ATSS
def _grid(cells):
    """One square anchor per cell of a ``cells x cells`` grid over the unit image, row-major."""
    step = 1.0 / cells
    return [[x * step, y * step, (x + 1) * step, (y + 1) * step] for y in range(cells) for x in range(cells)]


TWO_LEVELS = np.array(_grid(4) + _grid(2), np.float32)  # 16 anchors of 0.25, then 4 of 0.5


def _atss(gt_boxes, gt_classes, anchors, levels, gt_ignore=None, top_k=3, forced_match=False):
    gt_boxes, gt_classes = np.asarray(gt_boxes, np.float32)[None], np.asarray(gt_classes, np.int32)[None]
    ignore = np.zeros(gt_classes.shape, bool) if gt_ignore is None else np.asarray(gt_ignore, bool)[None]
    boxes, labels = atss_match(gt_boxes, gt_classes, ignore, np.asarray(anchors, np.float32)[None], levels,
                               top_k=top_k, forced_match=forced_match)
    return ops.convert_to_numpy(boxes)[0], ops.convert_to_numpy(labels)[0]


def test_atss_thresholds_each_object_by_its_candidates():
    # Large object [0, 0, .5, .5]. Candidates (3 nearest centres per level, ties kept): the four
    # 0.25-cells inside it (IoU .25 each, all at distance .177) and 2x2 cells 0, 1, 2 (IoU 1, 0, 0).
    # Mean 2/7 = .286, sample std .336: threshold .622, so only the 0.5-cell (anchor 16) is positive.
    # Small object [.5, .5, .75, .75]: candidates cell 10 (IoU 1), its 4 neighbours (0) and 2x2 cells
    # 3, 1, 2 (IoU .25, 0, 0): threshold .156 + .352 = .508: cell 10 only. Padding row: nothing.
    gt = [[0, 0, 0.5, 0.5], [0.5, 0.5, 0.75, 0.75], [0, 0, 1, 1]]
    boxes, labels = _atss(gt, [2, 0, -1], TWO_LEVELS, [16, 4])
    expected = np.zeros(20, int)
    expected[16], expected[10] = 3, 1
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_allclose(boxes[[16, 10]], gt[:2])
    assert np.all(boxes[labels == 0] == 0)
    _, labels = _atss(gt, [2, 0, -1], TWO_LEVELS, [16, 4], gt_ignore=[False, True, False])
    assert labels[10] == -1 and labels[16] == 3 and (labels == 0).sum() == 18
    with pytest.raises(ValueError, match="sums to 16, but there are 20 anchors"):
        _atss(gt, [2, 0, -1], TWO_LEVELS, [16])


def test_atss_positive_needs_its_centre_inside_the_object():
    # [.2, .2, .55, .55] against the 0.5-cells only: candidate IoUs .319, .042, .042, .007 give a
    # threshold of .102 + .145 = .248; cell 0 (centre .25, .25) is positive. Shifted to start at .26,
    # cell 0's IoU .183 is still above the new threshold .092 + .064 = .157, but its centre is outside.
    labels = _atss([[0.2, 0.2, 0.55, 0.55]], [1], _grid(2), [4])[1]
    np.testing.assert_array_equal(labels, [2, 0, 0, 0])
    labels = _atss([[0.26, 0.26, 0.61, 0.61]], [1], _grid(2), [4])[1]
    np.testing.assert_array_equal(labels, [0, 0, 0, 0])


def _reference_atss(gt, classes, ignore, anchors, levels, top_k):
    """mmdetection's ATSSAssigner (loops, one ground truth at a time), plus kdet's ignore rule."""
    centre = lambda b: (b[..., :2] + b[..., 2:]) / 2
    overlaps = np.where(classes[None] >= 0, iou_matrix_np(anchors, gt), -np.inf)  # [A, M]
    positive_iou = np.full(overlaps.shape, -np.inf)
    for j in np.nonzero(classes >= 0)[0]:
        distance = np.linalg.norm(centre(anchors) - centre(gt[j]), axis=1)
        candidates, start = [], 0
        for count in levels:
            candidates += list(start + np.argsort(distance[start:start + count], kind="stable")[:top_k])
            start += count
        candidate_iou = overlaps[candidates, j]
        threshold = candidate_iou.mean() + candidate_iou.std(ddof=1)
        for a in candidates:
            inside = np.all(centre(anchors[a]) > gt[j, :2]) and np.all(centre(anchors[a]) < gt[j, 2:])
            if overlaps[a, j] >= threshold and inside:
                positive_iou[a, j] = overlaps[a, j]
    labels = np.zeros(len(anchors), np.int64)
    for a in np.nonzero(np.isfinite(positive_iou).any(axis=1))[0]:
        j = positive_iou[a].argmax()
        labels[a] = -1 if ignore[j] else classes[j] + 1
    return labels


def test_atss_matches_a_loop_reference_on_random_boxes():
    rng = np.random.default_rng(11)
    anchors = np.array(_grid(8) + _grid(4) + _grid(2), np.float32)  # one anchor per centre: no distance ties
    anchors += rng.uniform(-0.02, 0.02, anchors.shape).astype(np.float32)  # and no tied IoUs
    levels = [64, 16, 4]
    xy = rng.uniform(0, 0.7, (3, 5, 2))
    gt = np.concatenate([xy, xy + rng.uniform(0.05, 0.3, (3, 5, 2))], -1).astype(np.float32)
    classes = rng.integers(0, 3, (3, 5))
    classes[1, 3:] = -1
    ignore = rng.uniform(size=(3, 5)) < 0.2
    boxes, labels = atss_match(gt, classes, ignore, anchors[None], levels, top_k=5)
    labels = ops.convert_to_numpy(labels)
    for b in range(3):
        np.testing.assert_array_equal(labels[b], _reference_atss(gt[b], classes[b], ignore[b], anchors, levels, 5))
    assert (labels > 0).sum() > 10 and (labels == -1).sum() > 0


def test_atss_forced_match_gives_an_object_between_anchor_centres_its_best_anchor():
    # [.26, .26, .36, .36] holds no centre of the 0.25-grid (centres at .125, .375): ATSS leaves it without a
    # positive. Forced: it takes its best-IoU anchor, cell (1, 1) = index 5 (IoU .01 / .0625 = .16; the others 0).
    # The large object keeps exactly its ATSS positives; the padding row gets nothing.
    gt = [[0.26, 0.26, 0.36, 0.36], [0.5, 0.5, 1.0, 1.0], [0, 0, 1, 1]]
    _, plain = _atss(gt, [0, 1, -1], _grid(4), [16])
    assert not (plain == 1).any() and (plain == 2).sum() == 4   # cells 10, 11, 14, 15
    boxes, forced = _atss(gt, [0, 1, -1], _grid(4), [16], forced_match=True)
    expected = plain.copy()
    expected[5] = 1
    np.testing.assert_array_equal(forced, expected)
    np.testing.assert_allclose(boxes[5], gt[0])
    _, ignored = _atss(gt, [0, 1, -1], _grid(4), [16], gt_ignore=[True, False, False], forced_match=True)
    assert ignored[5] == -1 and (ignored == 2).sum() == 4


def test_alignment_power_matches_numpy_for_the_fast_and_the_general_exponents():
    from kdet.matching import _power

    x = np.array([0.0, 1e-4, 0.3, 0.77, 1.0], np.float32)
    for exponent in (0.5, 1, 2, 3, 6, 7, 8, 2.5, 9, 13):
        np.testing.assert_allclose(ops.convert_to_numpy(_power(x, exponent)), x.astype(np.float64) ** exponent,
                                   rtol=1e-5, atol=1e-12, err_msg=str(exponent))
