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


def test_keras_cv_peer_trains_every_epoch_in_full(tmp_path):
    """With steps_per_epoch, a finite tf.data dataset runs dry in every second epoch: the peer would
    get empty epochs (and the table twice its real images/s). Every epoch must run all its steps."""
    import types

    import cv2
    import keras
    from keras import ops

    train = []
    for k in range(20):
        path = str(tmp_path / f"{k}.jpg")
        cv2.imwrite(path, np.full((40, 40, 3), 10 * k, np.uint8))
        train.append(Record(image_id=str(k), image_path=path, width=40, height=40, boxes=[[5, 5, 20, 25]], classes=[0]))

    class CountingDetector(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)
            self.steps_run = keras.Variable(0, dtype="int64", trainable=False)

        def call(self, images):
            return self.dense(ops.mean(images, axis=(1, 2)))

        def train_step(self, data):
            self.steps_run.assign_add(1)
            return {"loss": 0.0}

        def predict(self, images, verbose=0):  # no detections
            n = int(images.shape[0])
            return dict(num_detections=np.zeros(n, np.int32), boxes=np.zeros((n, 1, 4)), classes=np.zeros((n, 1)),
                        confidence=np.zeros((n, 1)))

    model = CountingDetector()
    model.compile(optimizer="sgd", jit_compile=False)
    args = types.SimpleNamespace(imgsz=32, budget=0.1)
    recipe = dict(data=dict(class_names=["x"], batch_size=4, max_boxes=4))
    test = train[:2]
    row, results = race.run_keras_cv(args, lambda num_classes, max_det: model, recipe, train, test, 10,
                                     records_to_coco_json(test, ["x"]))
    assert results == []
    assert row["epochs"] >= 2  # the case that fails without .repeat()
    # every epoch but the last runs in full (the budget cuts the last one at the step that uses it up)
    assert (row["epochs"] - 1) * 5 < int(model.steps_run.numpy()) <= row["epochs"] * 5
