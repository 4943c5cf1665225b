"""Repeat-factor sampling against hand-computed factors."""

import numpy as np
import pytest

from kdet.data.records import Record
from kdet.data.sampling import image_class_fractions, oversample_rare_classes, repeat_factors, repeat_records


def _record(image_id, classes, difficult=None):
    n = len(classes)
    return Record(image_id=image_id, image_path=None, width=10, height=10,
                  boxes=np.tile([0, 0, 5, 5], (n, 1)), classes=classes,
                  difficult=difficult if difficult is not None else np.zeros(n, bool))


# 8 images: class 0 in 6 of them, class 1 in 2, class 2 in 1 (plus one difficult that doesn't count).
RECORDS = [_record(0, [0, 0]), _record(1, [0]), _record(2, [0, 1]), _record(3, [0]),
           _record(4, [0, 2]), _record(5, [0]), _record(6, [1, 1]), _record(7, [2], difficult=[True])]


def test_fractions_count_images_not_objects_and_skip_ignored():
    np.testing.assert_allclose(image_class_fractions(RECORDS, 3), [6 / 8, 2 / 8, 1 / 8])


def test_factors_by_hand():
    # t = 0.5: r_0 = max(1, sqrt(0.5 / 0.75)) = 1, r_1 = sqrt(0.5 / 0.25) = sqrt(2),
    # r_2 = sqrt(0.5 / 0.125) = 2; an image takes its rarest class's factor, 1 without objects.
    expected = [1, 1, np.sqrt(2), 1, 2, 1, np.sqrt(2), 1]
    np.testing.assert_allclose(repeat_factors(RECORDS, 3, threshold=0.5), expected)
    # A threshold below every class's fraction changes nothing.
    np.testing.assert_allclose(repeat_factors(RECORDS, 3, threshold=0.1), np.ones(8))


def test_repeat_records_rounds_stochastically_and_reproducibly():
    records = [_record(i, [0]) for i in range(4000)]
    factors = np.full(4000, 1.25)
    factors[0], factors[1] = 3.0, 1.0
    repeated = repeat_records(records, factors, seed=3)
    counts = np.bincount([r.image_id for r in repeated], minlength=4000)
    assert counts[0] == 3 and counts[1] == 1
    assert set(counts[2:].tolist()) == {1, 2}
    assert abs(counts[2:].mean() - 1.25) < 0.03  # expected 1.25, std of the mean ~0.007
    assert [r.image_id for r in repeat_records(records, factors, seed=3)] == [r.image_id for r in repeated]
    with pytest.raises(ValueError, match="repeat factor >= 1"):
        repeat_records(records[:2], [1.0, 0.5])


def test_oversampling_raises_the_rare_class_share():
    repeated, summary = oversample_rare_classes(RECORDS, 3, threshold=0.5, seed=0)
    ids = [r.image_id for r in repeated]
    assert ids.count(4) == 2 and ids.count(0) == 1  # factor 2 exactly; factor 1 exactly
    assert ids.count(2) in (1, 2) and ids.count(6) in (1, 2)
    assert "8 -> " in summary and "threshold 0.5" in summary
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        repeat_factors(RECORDS, 3, threshold=0.0)
