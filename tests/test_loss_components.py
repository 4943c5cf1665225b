"""Assigners and class losses are functions of one signature each, named by the recipe: a new one is
registered and MultiBoxLoss uses it without a change to its body."""

import numpy as np
import pytest

from kdet import losses
from kdet.losses import MultiBoxLoss

ANCHORS = np.array([[i / 8, r / 2, (i + 1) / 8, (r + 1) / 2] for r in range(2) for i in range(8)], np.float32)


def _case(seed=0):
    y_true = np.zeros((2, 3, 6), np.float32)
    y_true[..., 4] = -1
    y_true[0, 0] = [*ANCHORS[2], 1, 0]
    y_true[0, 1] = [*(ANCHORS[5] + np.array([0.01, 0.02, 0.0, -0.03], np.float32)), 0, 0]
    y_true[1, 0] = [*ANCHORS[10] + 0.005, 0, 0]
    rng = np.random.default_rng(seed)
    y_pred = np.zeros((2, 16, 4 + 3 + 4), np.float32)
    y_pred[..., :4] = rng.normal(0, 1.5, (2, 16, 4))
    y_pred[..., 4:7] = rng.normal(0, 2, (2, 16, 3))
    y_pred[..., 7:] = ANCHORS
    return y_true, y_pred


@pytest.fixture
def registered():
    """Registers under temporary names; removed afterwards."""
    names = []

    def register(kind, name, fn, **kw):
        names.append((kind, name))
        if kind == "assigner":
            return losses.register_assigner(name, fn, **kw)
        return losses.register_class_loss(name, fn, **kw)

    yield register
    for kind, name in names:
        (losses.ASSIGNER_FNS if kind == "assigner" else losses.CLASS_LOSS_FNS).pop(name, None)


def test_builtins_are_registered_functions_the_recipe_names():
    assert losses.ASSIGNERS == ("max_iou", "atss", "tal")
    assert losses.CLASS_LOSSES == ("softmax", "quality_softmax", "focal", "quality_focal", "varifocal", "quality_bce")
    assert losses.SOFTMAX_LOSSES == ("softmax", "quality_softmax")
    assert losses.ASSIGNER_FNS["tal"].soft_targets and not losses.ASSIGNER_FNS["max_iou"].soft_targets
    assert [losses.score_activation(n) for n in ("softmax", "focal")] == ["softmax", "sigmoid"]
    loss = MultiBoxLoss(num_classes=2, assigner="tal", cls_loss="varifocal")
    assert (loss.assigner, loss.cls_loss, loss.score_activation) == ("tal", "varifocal", "sigmoid")
    with pytest.raises(ValueError, match="assigner must be one of"):
        MultiBoxLoss(num_classes=2, assigner="nearest")


def test_a_new_assigner_and_class_loss_plug_in(registered):
    calls = []

    def counting_assigner(loss, gt_boxes, gt_classes, gt_ignore, anchors, pred_boxes, class_scores):
        calls.append("assign")
        return losses.max_iou_assigner(loss, gt_boxes, gt_classes, gt_ignore, anchors, pred_boxes, class_scores)

    def halved_softmax(loss, logits, labels, quality, num_pos_per_image):
        calls.append("cls")
        return 0.5 * loss.softmax_cross_entropy(logits, labels, num_pos_per_image)

    registered("assigner", "counting", counting_assigner)
    registered("class_loss", "halved_softmax", halved_softmax, activation="softmax", needs_quality=False)
    y_true, y_pred = _case()
    base = MultiBoxLoss(num_classes=2).components(y_true, y_pred)
    plugged = MultiBoxLoss(num_classes=2, assigner="counting", cls_loss="halved_softmax")
    parts = plugged.components(y_true, y_pred)
    assert calls == ["assign", "cls"]
    np.testing.assert_allclose(float(parts["loc"]), float(base["loc"]), rtol=1e-6)
    np.testing.assert_allclose(float(parts["conf"]), 0.5 * float(base["conf"]), rtol=1e-6)
    assert plugged.get_config()["assigner"] == "counting" and plugged.get_config()["cls_loss"] == "halved_softmax"
    assert MultiBoxLoss(num_classes=2, assigner=counting_assigner).assigner == "counting"  # the function itself
