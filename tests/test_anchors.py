"""Default boxes: scales, hand-computed boxes, order, clipping, count, the layer."""

import math

import keras
import numpy as np
import pytest

from kdet.models.anchors import (SSD300_ASPECT_RATIOS, AnchorBoxes, boxes_per_location,
                                 default_boxes, ssd_scales)


def test_ssd_scales_match_ssd_pytorch_voc():
    # ssd.pytorch VOC config: min_sizes [30, 60, 111, 162, 213, 264], max_sizes [..., 315] on 300.
    expected = [s / 300 for s in (30, 60, 111, 162, 213, 264, 315)]
    np.testing.assert_allclose(ssd_scales(), expected, atol=1e-9)


def test_ssd_scales_without_first_scale_are_linear():
    np.testing.assert_allclose(ssd_scales(3, 0.2, 0.8, first_scale=None), [0.2, 0.5, 0.8, 1.1])
    assert len(ssd_scales(5)) == 6


def test_boxes_per_location():
    assert boxes_per_location(SSD300_ASPECT_RATIOS) == [4, 6, 6, 6, 4, 4]


def test_two_by_two_map_by_hand():
    boxes = default_boxes([2], [0.5, 0.7], [[2]], clip=False)
    extra = math.sqrt(0.5 * 0.7) / 2          # half side of the sqrt(s_k s_k+1) square
    w2, h2 = 0.5 * math.sqrt(2) / 2, 0.5 / math.sqrt(2) / 2   # half sizes of ratio 2
    expected = []
    for cy in (0.25, 0.75):                    # rows first, then columns
        for cx in (0.25, 0.75):
            expected += [
                [cx - 0.25, cy - 0.25, cx + 0.25, cy + 0.25],        # ratio 1, s_k
                [cx - extra, cy - extra, cx + extra, cy + extra],    # ratio 1, sqrt(s_k s_k+1)
                [cx - w2, cy - h2, cx + w2, cy + h2],                # ratio 2 (wide)
                [cx - h2, cy - w2, cx + h2, cy + w2],                # ratio 1/2 (tall)
            ]
    assert boxes.shape == (16, 4) and boxes.dtype == np.float32
    np.testing.assert_allclose(boxes, expected, atol=1e-6)
    # first cell, written as plain numbers
    np.testing.assert_allclose(boxes[0], [0.0, 0.0, 0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(boxes[2], [0.25 - 0.353553, 0.25 - 0.176777,
                                          0.25 + 0.353553, 0.25 + 0.176777], atol=1e-6)


def test_clipping_keeps_corners_in_image():
    raw = default_boxes([2], [0.5, 0.7], [[2]], clip=False)
    clipped = default_boxes([2], [0.5, 0.7], [[2]], clip=True)
    assert raw.min() < 0 and raw.max() > 1
    np.testing.assert_allclose(clipped, np.clip(raw, 0, 1))
    # cell (0, 0), ratio 2: x_min = 0.25 - 0.3536 < 0 -> 0
    np.testing.assert_allclose(clipped[2], [0.0, 0.25 - 0.176777, 0.25 + 0.353553, 0.25 + 0.176777],
                               atol=1e-6)


def test_order_maps_then_rows_then_columns():
    boxes = default_boxes([(2, 3), 1], [0.2, 0.4, 0.6], [[], [3]], clip=False)
    assert len(boxes) == 2 * 3 * 2 + 1 * 4
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    first = centres[:12:2]                     # first box of each cell of the 2x3 map
    np.testing.assert_allclose(first, [[1 / 6, 0.25], [0.5, 0.25], [5 / 6, 0.25],
                                       [1 / 6, 0.75], [0.5, 0.75], [5 / 6, 0.75]], atol=1e-6)
    np.testing.assert_allclose(centres[12:], 0.5, atol=1e-6)  # the 1x1 map comes last
    sizes = boxes[12:, 2:] - boxes[12:, :2]
    np.testing.assert_allclose(sizes, [[0.4, 0.4], [math.sqrt(0.24)] * 2,
                                       [0.4 * math.sqrt(3), 0.4 / math.sqrt(3)],
                                       [0.4 / math.sqrt(3), 0.4 * math.sqrt(3)]], atol=1e-6)


def test_steps_set_the_centres():
    boxes = default_boxes([2], [0.1, 0.2], [[]], clip=False, steps=[8 / 300])
    centres = (boxes[::2, :2] + boxes[::2, 2:]) / 2
    np.testing.assert_allclose(centres, [[4 / 300, 4 / 300], [12 / 300, 4 / 300],
                                         [4 / 300, 12 / 300], [12 / 300, 12 / 300]], atol=1e-6)


def test_ssd300_has_8732_boxes():
    boxes = default_boxes([38, 19, 10, 5, 3, 1], ssd_scales(), SSD300_ASPECT_RATIOS)
    assert boxes.shape == (8732, 4)
    assert boxes.min() >= 0 and boxes.max() <= 1
    # the single conv11 cell: its square box of scale 0.88 is centred
    np.testing.assert_allclose(boxes[-4], [0.06, 0.06, 0.94, 0.94], atol=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="scales"):
        default_boxes([2, 1], [0.1, 0.2], [[2], [2]])
    with pytest.raises(ValueError, match="aspect-ratio"):
        default_boxes([2, 1], [0.1, 0.2, 0.3], [[2]])


def test_layer_equals_numpy_and_serializes():
    layer = AnchorBoxes([0.2, 0.5, 0.9], [[2], [2, 3]], clip=True, name="anchors")
    maps = [np.zeros((3, 4, 5, 2), "float32"), np.zeros((3, 2, 1, 7), "float32")]
    out = keras.ops.convert_to_numpy(layer(maps))
    expected = default_boxes([(4, 5), (2, 1)], [0.2, 0.5, 0.9], [[2], [2, 3]], clip=True)
    assert out.shape == (3, len(expected), 4)
    for batch_item in out:
        np.testing.assert_allclose(batch_item, expected, atol=1e-7)
    clone = AnchorBoxes.from_config(layer.get_config())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone(maps)), out)


def test_layer_in_functional_model_reloads(tmp_path):
    inputs = keras.Input((8, 8, 3))
    small = keras.layers.MaxPooling2D(4)(inputs)
    anchors = AnchorBoxes([0.3, 0.6, 0.9], [[2], []])([inputs, small])
    model = keras.Model(inputs, anchors)
    assert model.output_shape == (None, 8 * 8 * 4 + 2 * 2 * 2, 4)
    path = tmp_path / "anchors.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    out = keras.ops.convert_to_numpy(reloaded(np.zeros((2, 8, 8, 3), "float32")))
    np.testing.assert_allclose(out[1], default_boxes([8, 2], [0.3, 0.6, 0.9], [[2], []]))
