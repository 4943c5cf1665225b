import numpy as np
import pytest

from kdet.data.class_weights import (class_counts, effective_number_weights, format_class_weights,
                                     inverse_frequency_weights, resolve_class_weights)
from kdet.data.records import Record

NAMES = ["a", "b", "c"]


def _record(classes, difficult=None):
    n = len(classes)
    return Record(image_id=len(classes), image_path=None, width=10, height=10,
                  boxes=np.tile([0, 0, 5, 5], (n, 1)), classes=classes,
                  difficult=difficult if difficult is not None else np.zeros(n, bool))


def test_class_counts_skips_ignored_objects():
    records = [_record([0, 0, 1]), _record([2, 0], difficult=[False, True]), _record([])]
    assert class_counts(records, 3).tolist() == [2, 1, 1]
    assert class_counts(records, 3, include_ignored=True).tolist() == [3, 1, 1]
    with pytest.raises(ValueError, match="outside 0..1"):
        class_counts(records, 2)


def test_inverse_frequency_by_hand():
    # 1/n = 0.01, 0.04, 0.1; their mean is 0.05 -> divided by it: 0.2, 0.8, 2.0
    np.testing.assert_allclose(inverse_frequency_weights([100, 25, 10]), [0.2, 0.8, 2.0])
    np.testing.assert_allclose(inverse_frequency_weights([100, 25, 10], normalize=False),
                               [0.01, 0.04, 0.1])


def test_effective_number_by_hand():
    # beta = 0.9: (1 - 0.9) / (1 - 0.9**n) for n = 1, 2, 10:
    #   0.1 / 0.1 = 1;  0.1 / 0.19 = 0.5263158;  0.1 / (1 - 0.3486784) = 0.1535340
    raw = [1.0, 0.5263158, 0.1535340]
    np.testing.assert_allclose(effective_number_weights([1, 2, 10], beta=0.9, normalize=False), raw,
                               rtol=1e-6)
    # mean of raw = 0.5599499 -> normalised 1.7858740, 0.9399337, 0.2741924 (mean 1)
    w = effective_number_weights([1, 2, 10], beta=0.9)
    np.testing.assert_allclose(w, [1.7858740, 0.9399337, 0.2741924], rtol=1e-6)
    assert w.mean() == pytest.approx(1.0)
    # beta = 0 weights every class equally
    np.testing.assert_allclose(effective_number_weights([1, 2, 10], beta=0.0), [1, 1, 1])


def test_absent_class_gets_rarest_weight():
    np.testing.assert_allclose(inverse_frequency_weights([10, 0], normalize=False), [0.1, 0.1])
    np.testing.assert_allclose(inverse_frequency_weights([0, 0]), [1, 1])


def test_resolve_forms():
    assert resolve_class_weights(None, NAMES) is None
    assert resolve_class_weights([1, 2, 3], NAMES) == [1.0, 1.0, 2.0, 3.0]
    assert resolve_class_weights([0.5, 1, 2, 3], NAMES) == [0.5, 1.0, 2.0, 3.0]
    assert resolve_class_weights({"b": 4, "background": 0.5}, NAMES) == [0.5, 1.0, 4.0, 1.0]
    with pytest.raises(ValueError, match="expected 3"):
        resolve_class_weights([1, 2], NAMES)
    with pytest.raises(ValueError, match="not in class_names"):
        resolve_class_weights({"zebra": 2}, NAMES)
    with pytest.raises(ValueError, match="needs the training records"):
        resolve_class_weights("auto", NAMES)
    with pytest.raises(ValueError, match="unknown class_weights"):
        resolve_class_weights("balanced", NAMES)


def test_resolve_from_records():
    # counts a=4, b=2, c=1 -> inverse frequency 0.25, 0.5, 1 (mean 7/12) -> 3/7, 6/7, 12/7
    records = [_record([0, 0, 0, 1]), _record([0, 1, 2])]
    w = resolve_class_weights("inverse_frequency", NAMES, records)
    np.testing.assert_allclose(w, [1.0, 3 / 7, 6 / 7, 12 / 7])
    auto = resolve_class_weights("auto", NAMES, records, method="effective_number", beta=0.9)
    # effective numbers: (0.1/(1-0.9**4), 0.1/0.19, 1) = (0.2907822, 0.5263158, 1.0)
    raw = np.array([0.2907822, 0.5263158, 1.0])
    np.testing.assert_allclose(auto, [1.0, *(raw / raw.mean())], rtol=1e-6)


def test_format_table():
    text = format_class_weights([1.0, 0.5, 2.0, 1.5], NAMES, counts=[10, 40, 5])
    lines = text.splitlines()
    assert lines[2].split() == ["background", "-", "1.0000"]
    assert lines[4].split() == ["b", "40", "2.0000"]
    assert "none" in format_class_weights(None, NAMES)
