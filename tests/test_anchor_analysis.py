from pathlib import Path

import numpy as np
import pytest

from kdet.analysis.anchors import (anchor_coverage, clusters_to_ssd, fit_anchors, format_coverage,
                                   kmeans_boxes, recipe_snippet, wh_iou)
from kdet.data.records import Record
from kdet.models.anchors import default_boxes, ssd_scales

REPO = Path(__file__).resolve().parents[1]


from _helpers import load_tool as _load_tool  # noqa: E402
ANCHORS = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.25, 0.25, 0.75, 0.75]])


def _hand_records():
    # image 1 (100x100): b1 = A1 exactly (IoU 1); b2 = [50,50,100,75] vs A2: 1250 / 2500 = 0.5
    #   (vs A3: 625 / 3125 = 0.2); b4 = whole image: 2500 / 10000 = 0.25 with every anchor;
    #   plus a difficult box and a degenerate one, both left out.
    one = Record(1, None, 100, 100,
                 boxes=[[0, 0, 50, 50], [50, 50, 100, 75], [0, 0, 100, 100], [0, 0, 50, 50], [10, 10, 10, 30]],
                 classes=[0, 1, 1, 1, 0], difficult=[False, False, False, True, False])
    # image 2 (200 wide, 100 high): b3 = [0,0,40,20] -> normalised [0,0,0.2,0.2]: vs A1 0.04/0.25 = 0.16
    two = Record(2, None, 200, 100, boxes=[[0, 0, 40, 20]], classes=[0])
    return [one, two]


def test_coverage_hand_case():
    cov = anchor_coverage(_hand_records(), ANCHORS, image_size=100, class_names=["a", "b"])
    assert cov["num_anchors"] == 3
    np.testing.assert_allclose(sorted(cov["best_iou"]), [0.16, 0.25, 0.5, 1.0])
    assert cov["overall"] == pytest.approx(dict(boxes=4, covered=0.5, mean_best_iou=(1 + 0.5 + 0.25 + 0.16) / 4))
    assert cov["per_class"]["a"] == pytest.approx(dict(boxes=2, covered=0.5, mean_best_iou=0.58))
    assert cov["per_class"]["b"] == pytest.approx(dict(boxes=2, covered=0.5, mean_best_iou=0.375))
    # areas at the 100x100 input: b3 400 px (small), b1 2500 and b2 1250 (medium), b4 10000 (large)
    assert cov["per_size"]["small"] == pytest.approx(dict(boxes=1, covered=0.0, mean_best_iou=0.16))
    assert cov["per_size"]["medium"] == pytest.approx(dict(boxes=2, covered=1.0, mean_best_iou=0.75))
    assert cov["per_size"]["large"] == pytest.approx(dict(boxes=1, covered=0.0, mean_best_iou=0.25))
    # a 30x30 input makes all four boxes small (b4: 900 px < 1024); a (h, w) pair is accepted
    small = anchor_coverage(_hand_records(), ANCHORS, image_size=(30, 30), class_names=["a", "b"])
    assert small["per_size"]["small"]["boxes"] == 4 and small["per_size"]["large"]["boxes"] == 0
    text = format_coverage(cov, small)
    assert "50.0%" in text and "0.478" in text
    assert "positives_per_box" not in cov["overall"] and "pos@" not in text


def test_positives_per_box_at_the_loss_iou():
    # IoU >= 0.15: b1 only A1 (A3: 625 / 4375 = 0.143); b2 A2 and A3 (0.5, 0.2); b4 all three (0.25);
    # b3 A1 (0.16). Boxes without such an anchor still count 1 (the forced best-anchor match).
    cov = anchor_coverage(_hand_records(), ANCHORS, image_size=100, class_names=["a", "b"], match_iou=0.15)
    assert cov["match_iou"] == 0.15
    assert cov["overall"]["positives_per_box"] == pytest.approx((1 + 2 + 3 + 1) / 4)
    assert cov["per_class"]["a"]["positives_per_box"] == pytest.approx(1.0)
    assert cov["per_class"]["b"]["positives_per_box"] == pytest.approx(2.5)
    strict = anchor_coverage(_hand_records(), ANCHORS, image_size=100, class_names=["a", "b"], match_iou=0.6)
    assert strict["overall"]["positives_per_box"] == pytest.approx(1.0)
    assert "pos@0.15" in format_coverage(cov, strict) and "1.8" in format_coverage(cov)


def test_wh_iou():
    # (4, 2) vs (2, 4) at one centre: intersection 2*2 = 4, union 8 + 8 - 4 = 12
    np.testing.assert_allclose(wh_iou([[4, 2]], [[2, 4], [4, 2]]), [[1 / 3, 1.0]])


def _three_cluster_wh(seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.05, 0.05], [0.2, 0.1], [0.4, 0.6]])
    return np.concatenate([c * rng.uniform(0.9, 1.1, (60, 2)) for c in centres]), centres


def test_kmeans_deterministic_and_finds_clusters():
    wh, centres = _three_cluster_wh()
    c1, iou1 = kmeans_boxes(wh, 3, seed=7)
    c2, iou2 = kmeans_boxes(wh, 3, seed=7)
    np.testing.assert_array_equal(c1, c2)
    assert iou1 == iou2 > 0.85
    np.testing.assert_allclose(c1, centres, rtol=0.06)   # sorted by area like the centres
    with pytest.raises(ValueError, match="at least k=3"):
        kmeans_boxes(wh[:2], 3)


def test_clusters_to_ssd_hand_case():
    defaults = ssd_scales()      # [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05]
    # (0.05, 0.05): scale 0.05, ratio 1 -> map 0 (nearest 0.1); (0.3, 0.15): scale 0.2121, ratio 2 -> map 1
    scales, ratios, notes = clusters_to_ssd([[0.05, 0.05], [0.3, 0.15]], defaults, [38, 19, 10, 5, 3, 1],
                                            default_aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]])
    assert scales == pytest.approx([0.05, 0.2121, 0.37, 0.54, 0.71, 0.88, 1.05], abs=1e-4)
    assert ratios == [[], [2.0], [2.0, 3.0], [2.0, 3.0], [2.0], [2.0]]
    assert notes == []
    # a tiny cluster below the first map's cell step (1/38 = 0.026) is reported
    _, _, notes = clusters_to_ssd([[0.01, 0.01]], defaults, [38, 19, 10, 5, 3, 1])
    assert len(notes) == 1 and "cell step" in notes[0]
    assert recipe_snippet([0.05, 0.2], [[], [2.0, 3.0]]) == \
        "model=dict(anchor_scales=[0.05, 0.2], aspect_ratios=[[], [2, 3]])"


def _small_box_records(n=40, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        size = rng.uniform(0.04, 0.06, (5, 1)) * 300
        corner = rng.uniform(0, 300 - 20, (5, 2))
        boxes = np.concatenate([corner, corner + size * rng.uniform(0.8, 1.25, (5, 2))], axis=1)
        records.append(Record(i, None, 300, 300, boxes=boxes, classes=np.zeros(5, np.int32)))
    return records


def test_fit_improves_coverage_of_small_boxes():
    maps = [38, 19, 10]
    scales, ratios = ssd_scales(num_maps=3), [[2], [2], [2]]
    fit = fit_anchors(_small_box_records(), 300, maps, scales, ratios, ["dot"], k=3, seed=0)
    before, after = fit.before["overall"], fit.after["overall"]
    assert before["covered"] < 0.05          # 12-18 px boxes vs 30 px anchors: IoU <= 0.36
    assert after["covered"] > before["covered"] + 0.5
    assert after["mean_best_iou"] > before["mean_best_iou"]
    assert fit.scales[0] == pytest.approx(0.05, abs=0.01)
    # "after" is the coverage of the real default boxes of the proposed parameters
    again = anchor_coverage(_small_box_records(), default_boxes(maps, fit.scales, fit.aspect_ratios),
                            300, ["dot"])
    assert again["overall"] == pytest.approx(after)
    assert "anchor_scales=[" in fit.to_text()
    refit = fit_anchors(_small_box_records(), 300, maps, scales, ratios, ["dot"], k=3, seed=0)
    assert refit.scales == fit.scales and refit.aspect_ratios == fit.aspect_ratios


def test_tool_with_explicit_feature_maps(tmp_path):
    analyze_anchors = _load_tool("analyze_anchors")

    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        "import numpy as np\nfrom kdet.data.records import Record\n"
        "class Source:\n    class_names = ['dot']\n"
        "    def records(self):\n        rng = np.random.default_rng(1)\n"
        "        return [Record(i, None, 300, 300, boxes=[[x, x, x + 15, x + 15]], classes=[0])"
        " for i, x in enumerate(rng.uniform(0, 280, 30))]\n"
        "recipe = dict(model=dict(image_size=300, anchor_scales=[0.1, 0.2, 0.9, 1.6],"
        " aspect_ratios=[[2], [2], [2]]), data=dict(train=Source()))\n")
    out = tmp_path / "out"
    assert analyze_anchors.main([str(recipe), "--k", "2", "--feature-maps", "38,19,10", "--out", str(out)]) == 0
    text = (out / "anchors.txt").read_text()
    assert "model=dict(anchor_scales=[" in text and "assigner" not in text
    assert (out / "anchor_fit.json").is_file()
    recipe.write_text(recipe.read_text() + "recipe['loss'] = dict(assigner='atss')\n")
    assert analyze_anchors.main([str(recipe), "--k", "2", "--feature-maps", "38,19,10", "--out", str(out)]) == 0
    assert "note: the recipe's loss uses assigner='atss'" in (out / "anchors.txt").read_text()


def test_bccd_fit_beats_default_on_platelets(bccd):
    from kdet.data.audit import read_voc_annotation

    names = ["RBC", "WBC", "Platelets"]
    records = []
    for image_id in (bccd / "ImageSets/Main/test.txt").read_text().split():
        raw = read_voc_annotation(bccd, image_id)
        records.append(Record(image_id, raw.image_path, raw.width, raw.height, raw.boxes,
                              [names.index(n) for n in raw.names]))
    maps = [38, 19, 10, 5, 3, 1]
    ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
    fit = fit_anchors(records, 300, maps, ssd_scales(), ratios, names, seed=0)
    before, after = fit.before["per_class"]["Platelets"], fit.after["per_class"]["Platelets"]
    assert after["covered"] > before["covered"] + 0.2
    assert fit.after["overall"]["covered"] >= fit.before["overall"]["covered"]
    assert fit.after["num_anchors"] <= fit.before["num_anchors"]
