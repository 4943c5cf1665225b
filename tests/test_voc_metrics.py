"""VOC AP / mAP against hand-computed cases and a literal transcription of voc_eval.py."""

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from kdet.boxes import voc_to_xyxy
from kdet.data.records import Record
from kdet.metrics import voc



from _helpers import box, det, gt  # noqa: E402


# Four objects; five detections by score: TP, FP, TP, FP, TP.
#   cumulative TP 1 1 2 2 3, FP 0 1 1 2 2
#   precision 1, 1/2, 2/3, 2/4, 3/5;  recall 1/4, 1/4, 2/4, 2/4, 3/4
#   envelope: recall (0, .25] -> 1, (.25, .5] -> 2/3, (.5, .75] -> 3/5, beyond -> 0
#   all-point AP = .25 * 1 + .25 * 2/3 + .25 * 3/5 = 0.566666...
#   11-point: t = 0, .1, .2 -> 1;  .3, .4, .5 -> 2/3;  .6, .7 -> 3/5;  .8, .9, 1 -> 0
#             AP = (3 + 3 * 2/3 + 2 * 3/5) / 11 = 6.2 / 11 = 0.563636...
# The detections are split over two images, so the ranking has to be global.
FOUR_GT = [gt([box(0, 0), box(20, 20)], [0, 0]), gt([box(0, 0), box(20, 20)], [0, 0])]
FIVE_DETS = [det([box(0, 0), box(50, 50), box(20, 20)], [0.9, 0.6, 0.5], [0, 0, 0]),
             det([box(60, 60), box(0, 0)], [0.8, 0.7], [0, 0])]


def test_all_point_ap_hand_case():
    result = voc.voc_evaluate(FOUR_GT, FIVE_DETS, ["cell"])
    assert result["AP"]["cell"] == pytest.approx(0.25 + 0.25 * 2 / 3 + 0.25 * 3 / 5)
    assert result["mAP"] == pytest.approx(0.5666666667)
    assert result["num_positives"] == {"cell": 4}
    assert result["num_detections"] == {"cell": 5}


def test_eleven_point_ap_hand_case():
    result = voc.voc_evaluate(FOUR_GT, FIVE_DETS, ["cell"], use_07_metric=True)
    assert result["AP"]["cell"] == pytest.approx(6.2 / 11)


def test_average_precision_exact_recall_reaches_eleven_point_sample():
    # recall 3/10 must count as reaching t = 0.3 (np.arange(0., 1.1, .1) would miss it):
    # precision 1 for t = 0 .. 0.3 (4 samples), 0 beyond -> 4/11.
    recall = np.array([1, 2, 3]) / 10
    assert voc.average_precision(recall, np.ones(3), use_07_metric=True) == pytest.approx(4 / 11)
    assert voc.average_precision(recall, np.ones(3)) == pytest.approx(0.3)


def test_difficult_objects_are_neither_tp_nor_fp():
    # Image: a normal object and a difficult one. Detections: 0.9 on the difficult
    # object (ignored), 0.8 on the normal one (TP), 0.7 on nothing (FP).
    # Remaining ranking TP, FP with 1 positive: precision 1, 1/2 at recall 1, 1 -> AP 1.
    # (Counting the difficult hit as FP would give 0.5; as a positive, recall could not reach 1.)
    gts = [gt([box(0, 0), box(30, 30)], [0, 0], difficult=[False, True])]
    dets = [det([box(30, 30), box(0, 0), box(60, 60)], [0.9, 0.8, 0.7], [0, 0, 0])]
    result = voc.voc_evaluate(gts, dets, ["cell"])
    assert result["num_positives"]["cell"] == 1
    assert result["AP"]["cell"] == pytest.approx(1.0)
    # Same with a Record as ground truth, whose iscrowd objects are ignored too.
    record = Record("a", None, 100, 100, boxes=gts[0]["boxes"], classes=[0, 0], iscrowd=[False, True])
    assert voc.voc_evaluate([record], dets, ["cell"])["AP"]["cell"] == pytest.approx(1.0)
    # Without the flag the 0.9 detection is a TP: P 1, 1, 2/3 at R .5, 1, 1 -> AP 1 too, but 2 positives.
    plain = voc.voc_evaluate([gt(gts[0]["boxes"], [0, 0])], dets, ["cell"])
    assert plain["num_positives"]["cell"] == 2


def test_duplicate_detection_is_a_false_positive():
    # Objects A, B. Detections: A 0.9 (TP), A again 0.8 (duplicate: FP), B 0.7 (TP).
    #   precision 1, 1/2, 2/3 at recall .5, .5, 1
    #   all-point: .5 * 1 + .5 * 2/3 = 0.8333;  11-point: (6 * 1 + 5 * 2/3) / 11 = 0.848485
    gts = [gt([box(0, 0), box(30, 30)], [0, 0])]
    dets = [det([box(0, 0), [0, 0.5, 10, 10.5], box(30, 30)], [0.9, 0.8, 0.7], [0, 0, 0])]
    assert voc.voc_evaluate(gts, dets, ["c"])["AP"]["c"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc.voc_evaluate(gts, dets, ["c"], use_07_metric=True)["AP"]["c"] == pytest.approx(
        (6 + 5 * 2 / 3) / 11)


def test_greedy_match_to_best_object_even_if_taken():
    # Overlapping objects A = (0,0,10,10), B = (0,2,10,12). The second detection overlaps
    # A best (IoU 9.5/10.5 = .905) and B enough (8.5/11.5 = .739); A is taken, so VOC
    # calls it a FP instead of falling back to B (COCO would match B).
    # Ranking TP, FP with 2 positives: precision 1 at recall .5 -> AP 0.5.
    gts = [gt([[0, 0, 10, 10], [0, 2, 10, 12]], [0, 0])]
    dets = [det([[0, 0, 10, 10], [0, 0.5, 10, 10.5]], [0.9, 0.8], [0, 0])]
    assert voc.voc_evaluate(gts, dets, ["c"])["AP"]["c"] == pytest.approx(0.5)


def test_iou_uses_continuous_boxes_and_threshold_parameter():
    # Object (0,0,2,2), detection (0,0,2,1): continuous IoU = 2/4 = 0.5 (the classic +1
    # areas would say 3*2 / (3*3) = 0.667). At 0.5 it is a TP (devkit tests >=), at 0.6 a FP.
    gts = [gt([[0, 0, 2, 2]], [0])]
    dets = [det([[0, 0, 2, 1]], [0.9], [0])]
    assert voc.voc_evaluate(gts, dets, ["c"], iou_threshold=0.5)["mAP"] == pytest.approx(1.0)
    assert voc.voc_evaluate(gts, dets, ["c"], iou_threshold=0.6)["mAP"] == pytest.approx(0.0)


def test_map50_and_map50_95():
    # One object (0,0,25,25), one detection (0,0,25,17): IoU 17/25 = 0.68.
    # TP at 0.50, 0.55, 0.60, 0.65 (AP 1), FP at 0.70 .. 0.95 (AP 0) -> mAP50-95 = 4/10.
    gts = [gt([[0, 0, 25, 25]], [0])]
    dets = [det([[0, 0, 25, 17]], [0.9], [0])]
    assert voc.mAP50(gts, dets, ["c"]) == pytest.approx(1.0)
    assert voc.mAP50_95(gts, dets, ["c"]) == pytest.approx(0.4)
    assert voc.COCO_IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_classes_without_positives_are_left_out_of_the_mean():
    # Class "a": perfect (AP 1). Class "b": one object, only a wrong box (AP 0).
    # Class "c": no objects, one detection -> AP NaN, not in the mean. mAP = (1 + 0) / 2.
    gts = [gt([box(0, 0), box(30, 30)], [0, 1])]
    dets = [det([box(0, 0), box(60, 60), box(80, 80)], [0.9, 0.8, 0.7], [0, 1, 2])]
    result = voc.voc_evaluate(gts, dets, ["a", "b", "c"])
    assert result["AP"]["a"] == 1.0 and result["AP"]["b"] == 0.0
    assert np.isnan(result["AP"]["c"])
    assert result["mAP"] == pytest.approx(0.5)


def test_no_detections_and_padding_rows():
    gts = [gt([box(0, 0)], [0])]
    assert voc.voc_evaluate(gts, [det(np.zeros((0, 4)), [], [])], ["c"])["mAP"] == 0.0
    padded = det([box(0, 0), [0, 0, 0, 0]], [0.9, 0.0], [0, -1])  # class -1 = padding
    assert voc.voc_evaluate(gts, [padded], ["c"])["num_detections"]["c"] == 1


def test_bad_input_errors_are_clear():
    gts = [gt([box(0, 0)], [0])]
    with pytest.raises(ValueError, match="one entry per image"):
        voc.voc_evaluate(gts, [], ["c"])
    with pytest.raises(ValueError, match="class id 3"):
        voc.voc_evaluate(gts, [det([box(0, 0)], [0.9], [3])], ["c"])
    with pytest.raises(ValueError, match="detections of image 0 is malformed"):
        voc.voc_evaluate(gts, [det([box(0, 0)], [0.9, 0.8], [0])], ["c"])


def test_detections_from_padded_scales_to_pixels():
    padded = dict(
        boxes=np.array([[[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1], [0, 0, 0, 0]],
                        [[0.5, 0.5, 1.0, 1.0], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32),
        scores=np.array([[0.9, 0.4, 0.0], [0.7, 0.0, 0.0]], np.float32),
        classes=np.array([[1, 0, -1], [2, -1, -1]], np.int32),
        num_detections=np.array([2, 1], np.int32))
    records = [Record("a", None, 200, 100), Record("b", None, 64, 32)]
    dets = voc.detections_from_padded(padded, records)
    assert len(dets) == 2
    np.testing.assert_allclose(dets[0]["boxes"], [[20, 20, 100, 60], [0, 0, 200, 100]])
    np.testing.assert_allclose(dets[1]["boxes"], [[32, 16, 64, 32]])
    np.testing.assert_array_equal(dets[0]["classes"], [1, 0])
    np.testing.assert_allclose(dets[1]["scores"], [0.7])
    # A list of batches concatenates; without sizes the boxes stay normalised.
    two = voc.detections_from_padded([padded, padded])
    assert len(two) == 4 and two[2]["boxes"][0, 2] == pytest.approx(0.5)


# --------------------------------------------- cross-check against voc_eval.py
def classic_voc_eval(gts, dets, class_id, ovthresh, use_07_metric):
    """py-faster-rcnn's voc_eval.py, transcribed loop for loop, with the +1 pixel
    areas removed (kdet boxes are continuous), ``>=`` as in the devkit, a stable
    sort, and 11-point samples k/10."""
    class_recs, npos = [], 0
    for g in gts:
        m = np.asarray(g["classes"]) == class_id
        difficult = np.asarray(g["difficult"], bool)[m]
        npos += int((~difficult).sum())
        class_recs.append(dict(bbox=np.asarray(g["boxes"])[m], difficult=difficult, det=[False] * int(m.sum())))
    image_ids, confidence, BB = [], [], []
    for i, d in enumerate(dets):
        for b, s, c in zip(d["boxes"], d["scores"], d["classes"]):
            if c == class_id:
                image_ids.append(i), confidence.append(s), BB.append(b)
    if not BB:
        return 0.0
    sorted_ind = np.argsort(-np.array(confidence), kind="stable")
    BB = np.array(BB)[sorted_ind]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin, 0.0)
            ih = np.maximum(iymax - iymin, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0]) * (bb[3] - bb[1]) + (BBGT[:, 2] - BBGT[:, 0]) * (BBGT[:, 3] - BBGT[:, 1]) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax >= ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(11) / 10:
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def random_case(rng, num_images=25, num_classes=3):
    gts, dets = [], []
    for _ in range(num_images):
        n = rng.integers(0, 7)
        xy = rng.uniform(0, 80, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (n, 2))], 1)
        classes = rng.integers(0, num_classes, n)
        gts.append(dict(boxes=boxes, classes=classes, difficult=rng.random(n) < 0.15))
        # Jittered copies (0-2 per object: misses and duplicates, 20% relabelled) plus clutter.
        repeats = rng.integers(0, 3, n)
        copies = np.repeat(boxes, repeats, axis=0)
        k = len(copies)
        copies = copies + rng.normal(0, 3, (k, 4))
        copy_classes = np.where(rng.random(k) < 0.2, rng.integers(0, num_classes, k), np.repeat(classes, repeats))
        m = rng.integers(0, 5)
        clutter_xy = rng.uniform(0, 80, (m, 2))
        clutter = np.concatenate([clutter_xy, clutter_xy + rng.uniform(5, 30, (m, 2))], 1)
        d_boxes = np.concatenate([copies, clutter])
        d_classes = np.concatenate([copy_classes, rng.integers(0, num_classes, m)]).astype(int)
        scores = np.round(rng.random(len(d_boxes)), 1)  # one decimal: many ties
        dets.append(dict(boxes=d_boxes, scores=scores, classes=d_classes))
    return gts, dets


def test_matches_classic_voc_eval_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(4):
        gts, dets = random_case(rng)
        for thr in (0.5, 0.7):
            for use_07 in (False, True):
                result = voc.voc_evaluate(gts, dets, ["a", "b", "c"], thr, use_07)
                for c, name in enumerate("abc"):
                    if result["num_positives"][name]:
                        expected = classic_voc_eval(gts, dets, c, thr, use_07)
                        assert result["AP"][name] == pytest.approx(expected, abs=1e-12), (thr, use_07, name)


# ------------------------------------------------------------------ real data
def read_bccd(bccd, split="test"):
    names = ["RBC", "WBC", "Platelets"]
    gts = []
    for image_id in (bccd / "ImageSets/Main" / f"{split}.txt").read_text().split():
        root = ET.parse(bccd / "Annotations" / f"{image_id}.xml").getroot()
        objects = root.findall("object")
        boxes = voc_to_xyxy([[float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
                             for o in objects])
        gts.append(dict(boxes=boxes, classes=[names.index(o.find("name").text.strip()) for o in objects],
                        difficult=[o.findtext("difficult", "0").strip() == "1" for o in objects]))
    return gts, names


def test_bccd_ground_truth_as_detections_scores_perfectly(bccd):
    gts, names = read_bccd(bccd)
    rng = np.random.default_rng(1)
    # Every object found with a high score, plus low-score clutter far from ... anything ranked last.
    dets = [dict(boxes=np.concatenate([g["boxes"], [[0, 0, 1, 1]]]),
                 scores=np.r_[rng.uniform(0.5, 1, len(g["boxes"])), 0.1],
                 classes=np.r_[g["classes"], 0]) for g in gts]
    result = voc.voc_evaluate(gts, dets, names)
    assert result["num_positives"]["RBC"] + result["num_positives"]["WBC"] > len(gts)
    assert result["AP"] == {n: pytest.approx(1.0) for n in names}
    assert voc.mAP50_95(gts, dets, names) == pytest.approx(1.0)
    # Dropping every second RBC halves RBC recall: all-point AP = 1 * (found / positives).
    half = [dict(d, boxes=d["boxes"][keep], scores=d["scores"][keep], classes=d["classes"][keep])
            for d in dets for keep in [~((d["classes"] == 0) & (np.arange(len(d["classes"])) % 2 == 1))]]
    found = sum(int(((h["classes"] == 0) & (h["scores"] > 0.2)).sum()) for h in half)
    npos = result["num_positives"]["RBC"]
    assert voc.voc_evaluate(gts, half, names)["AP"]["RBC"] == pytest.approx(found / npos)
