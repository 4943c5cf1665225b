"""tools/benchmark_race.py's pieces that need no training: the YOLO labels it writes from kdet's records,
the peer's predictions mapped onto kdet's ground truth, and the pycocotools scores of the table."""

import numpy as np
import pytest

from _helpers import load_tool
from kdet.data.coco import records_to_coco_json
from kdet.data.records import Record

race = load_tool("benchmark_race")


def records():
    return [Record(image_id="a", image_path="/data/a.jpg", width=200, height=100,
                   boxes=[[10, 20, 50, 60], [100, 0, 200, 100]], classes=[0, 2], difficult=[False, True]),
            Record(image_id="b", image_path="/data/b.jpg", width=100, height=100, boxes=[[0, 0, 30, 40]], classes=[1])]


def test_yolo_labels_are_normalised_centres_and_leave_ignored_boxes_out():
    # box 10..50 x 20..60 in 200 x 100: centre (30, 40) -> (0.15, 0.4), size 40 x 40 -> (0.2, 0.4)
    assert race.yolo_label_lines(records()[0]) == "0 0.150000 0.400000 0.200000 0.400000\n"
    assert race.yolo_label_lines(records()[1]) == "1 0.150000 0.200000 0.300000 0.400000\n"


def test_peer_predictions_score_on_kdets_ground_truth():
    ground_truth = records_to_coco_json(records(), ["x", "y", "z"])
    peer = dict(detections={
        "a.jpg": dict(boxes=[[10, 20, 50, 60], [0, 0, 5, 5]], scores=[0.9, 0.95], classes=[0, 0]),
        "b.jpg": dict(boxes=[[0, 0, 30, 40]], scores=[0.8], classes=[1])})
    results = race.ultralytics_results(peer, ground_truth)
    assert results[0] == dict(image_id=1, category_id=1, bbox=[10, 20, 40, 40], score=0.9)
    scores = race.coco_scores(ground_truth, results)
    # class x: a false positive ranked above its one true positive: precision 0.5 at recall 1 -> AP 0.5
    # (interpolated precision is 0.5 at every recall level); class y: exact -> 1; class z: only a difficult object
    assert scores["AP50_per_class"][:2] == pytest.approx([0.5, 1.0])
    assert np.isnan(scores["AP50_per_class"][2])
    assert scores["AP50"] == pytest.approx(0.75) and scores["AP"] == pytest.approx(0.75)
