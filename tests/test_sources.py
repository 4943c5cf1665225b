"""Sources agree on the same tiny dataset; COCO ids/results; concat; TFDS via mock data."""

import copy
import io
import json

import numpy as np
import pytest
from PIL import Image

from kdet.data.coco import COCO_CLASSES, records_to_coco_json, to_coco_results
from kdet.data.records import load_image
from kdet.data.sources import DatasetError, coco, concat, tfds, voc
from kdet.data.voc import VOC_CLASSES

CLASSES = ["cat", "dog", "bird"]
CATEGORY_IDS = [3, 7, 11]  # non-contiguous on purpose: class k <-> CATEGORY_IDS[k]
SIZES = {1: (40, 30), 2: (50, 20), 3: (32, 32)}
# Ground truth in kdet pixel xyxy: image -> [(box, class, difficult)]; image 3 has no objects
TRUTH = {
    1: [((0, 0, 10, 10), 0, False), ((4, 5, 40, 30), 1, True)],
    2: [((1, 2, 4, 5), 2, False), ((10, 0, 50, 20), 0, False), ((20, 1, 30, 19), 1, False)],
    3: [],
}


def write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, (w, h) in SIZES.items():
        Image.new("RGB", (w, h), (10 * image_id, 100, 200)).save(folder / f"{image_id:06d}.jpg")


def write_voc_format(root):
    write_images(root / "JPEGImages")
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, objects in TRUTH.items():
        w, h = SIZES[image_id]
        objs = "".join(  # VOC: 1-based inclusive, written by hand from the truth
            f"<object><name>{CLASSES[c]}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0] + 1}</xmin>"
            f"<ymin>{b[1] + 1}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for b, c, d in objects
        )
        (root / "Annotations" / f"{image_id:06d}.xml").write_text(
            f"<annotation><filename>{image_id:06d}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>"
        )
    (root / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i:06d}\n" for i in TRUTH))
    return root


def coco_dict():
    annotations = []
    for image_id, objects in TRUTH.items():
        for b, c, d in objects:  # COCO: [x, y, w, h]; difficult written as our documented crowd+difficult
            annotations.append(dict(id=len(annotations) + 100, image_id=image_id, category_id=CATEGORY_IDS[c],
                                    bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], area=(b[2] - b[0]) * (b[3] - b[1]) - 1.5,
                                    iscrowd=int(d), **({"difficult": 1} if d else {})))
    return dict(
        images=[dict(id=i, file_name=f"{i:06d}.jpg", width=w, height=h) for i, (w, h) in SIZES.items()],
        annotations=annotations,
        # listed out of order: class ids follow the sorted category ids
        categories=[dict(id=11, name="bird"), dict(id=3, name="cat"), dict(id=7, name="dog")],
    )


def write_coco_format(root, data=None):
    write_images(root / "images")
    path = root / "instances.json"
    path.write_text(json.dumps(data or coco_dict()))
    return path, root / "images"


def assert_same_objects(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert (ra.width, ra.height) == (rb.width, rb.height)
        np.testing.assert_allclose(ra.boxes, rb.boxes)
        assert ra.classes.tolist() == rb.classes.tolist()
        assert ra.difficult.tolist() == rb.difficult.tolist()
        assert ra.ignore.tolist() == rb.ignore.tolist()


# ------------------------------------------------------------------ VOC == COCO
def test_voc_and_coco_read_the_same_dataset(tmp_path):
    voc_source = voc(write_voc_format(tmp_path / "voc"), "test", class_names=CLASSES)
    coco_source = coco(*write_coco_format(tmp_path / "coco"))  # categories sorted by id: cat 3, dog 7, bird 11
    assert voc_source.class_names == coco_source.class_names == CLASSES
    for records in (voc_source.records(), coco_source.records()):
        assert len(records) == 3
        for record, (image_id, objects) in zip(records, TRUTH.items()):
            np.testing.assert_array_equal(record.boxes, np.array([o[0] for o in objects], np.float32).reshape(-1, 4))
            assert record.classes.tolist() == [o[1] for o in objects]
            assert record.difficult.tolist() == [o[2] for o in objects]
            assert not record.iscrowd.any()
            assert load_image(record).shape == (SIZES[image_id][1], SIZES[image_id][0], 3)
    assert_same_objects(voc_source.records(), coco_source.records())


def test_coco_ids_area_crowd_and_empty_images(tmp_path):
    data = coco_dict()
    data["annotations"][3]["iscrowd"] = 1  # a real crowd object (not difficult): image 2's second
    source = coco(*write_coco_format(tmp_path, data), class_names=["dog", "bird", "cat"])
    records = source.records()
    assert [r.image_id for r in records] == [1, 2, 3]  # the json's ints
    assert isinstance(records[0].image_id, int)
    assert source.category_ids == [7, 11, 3]  # follows the given class_names order
    assert records[1].classes.tolist() == [1, 2, 0]  # bird, cat, dog
    assert records[1].iscrowd.tolist() == [False, True, False]
    assert records[1].difficult.tolist() == [False, False, False]
    np.testing.assert_allclose(records[1].area, [9 - 1.5, 800 - 1.5, 180 - 1.5])  # GT area kept, not recomputed
    assert len(records[2]) == 0 and records[2].boxes.shape == (0, 4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["annotations"][0].update(category_id=5), r"image 1 \(000001\.jpg\), annotation 100: unknown category_id 5"),
        (lambda d: d["annotations"][0].update(bbox=[5, 5, 0, 3]), r"image 1 \(000001\.jpg\), annotation 100: bbox \[5, 5, 0, 3\] is degenerate"),
        (lambda d: d["annotations"][0].update(bbox=[35, 5, 10, 3]), r"image 1 \(000001\.jpg\), annotation 100: bbox \[35, 5, 10, 3\] is out of image \(40x30 image\)"),
        (lambda d: d["images"][0].update(file_name="nope.jpg"), r"image 1 \(nope\.jpg\): image file not found"),
    ],
)
def test_coco_bad_input(tmp_path, change, message):
    data = coco_dict()
    change(data)
    path, images = write_coco_format(tmp_path, data)
    with pytest.raises(DatasetError, match=r"instances\.json: " + message):
        coco(path, images).records()


def test_coco_border_rounding_is_clipped_and_class_names_checked(tmp_path):
    data = coco_dict()
    data["annotations"][0]["bbox"] = [0, 0, 40.4, 10]  # 0.4 px past a 40 px wide image: rounding, clipped
    path, images = write_coco_format(tmp_path, data)
    np.testing.assert_allclose(coco(path, images).records()[0].boxes[0], [0, 0, 40, 10])
    with pytest.raises(DatasetError, match=r"class_names \['cat', 'dog'\] do not match"):
        coco(path, images, class_names=["cat", "dog"]).records()


# ------------------------------------------------------------------ COCO json out / results
def test_records_to_coco_json_round_trip(tmp_path):
    voc_source = voc(write_voc_format(tmp_path / "voc"), "test")
    gt = records_to_coco_json(voc_source.records(), voc_source.class_names)
    assert [i["id"] for i in gt["images"]] == [1, 2, 3]  # VOC string ids numbered in order
    assert [i["kdet_image_id"] for i in gt["images"]] == ["000001", "000002", "000003"]
    first = gt["annotations"][0]
    assert first["bbox"] == [0.0, 0.0, 10.0, 10.0] and first["area"] == 100.0 and first["category_id"] == 2
    difficult = gt["annotations"][1]
    assert (difficult["iscrowd"], difficult["ignore"], difficult["difficult"]) == (1, 1, 1)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    back = coco(path, tmp_path / "voc" / "JPEGImages").records()
    assert_same_objects(voc_source.records(), back)


def _coco_eval_ap50(gt, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[1]


def test_class_ids_round_trip_into_coco_results(tmp_path):
    source = coco(*write_coco_format(tmp_path))
    assert source.category_ids == [3, 7, 11]
    records = source.records()
    detections = []
    for r in records:  # perfect detections, padded like the model's output
        k = len(r)
        detections.append(dict(
            boxes=np.concatenate([r.boxes, np.zeros((2, 4))]), scores=np.r_[np.full(k, 0.9), 0, 0],
            classes=np.r_[r.classes, -1, -1], num_detections=k,
        ))
    results = source.to_coco_results([r.image_id for r in records], detections)
    assert len(results) == 5
    assert results[0] == dict(image_id=1, category_id=3, bbox=[0.0, 0.0, 10.0, 10.0], score=pytest.approx(0.9))
    gt = json.loads((tmp_path / "instances.json").read_text())
    assert _coco_eval_ap50(gt, results) == pytest.approx(1.0)
    # the same detections with the default mapping (class id + 1) hit the wrong categories
    assert _coco_eval_ap50(gt, to_coco_results([r.image_id for r in records], detections)) < 0.5


# ------------------------------------------------------------------ concat
def test_concat(tmp_path):
    a = voc(write_voc_format(tmp_path / "a"), "test", class_names=CLASSES)
    path, images = write_coco_format(tmp_path / "b")
    both = concat(a, coco(path, images))
    assert len(both) == 6 and both.class_names == CLASSES
    assert [r.image_id for r in both.records()] == ["000001", "000002", "000003", 1, 2, 3]
    with pytest.raises(DatasetError, match=r"class lists differ"):
        concat(a, voc(tmp_path / "a", "test")).records()  # names collected: sorted, another order
    with pytest.raises(DatasetError, match=r"image id '000001' is in both"):
        concat(a, voc(tmp_path / "a", "test", class_names=CLASSES)).records()


# ------------------------------------------------------------------ TFDS
def _jpeg(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (50, 100, 150)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _mock_dataset(examples):
    """An ``as_dataset_fn`` for ``tfds.testing.mock_data`` yielding fixed examples.

    With ``decoders`` (our SkipDecoding) images are encoded bytes, without them
    decoded arrays, as real TFDS gives them.
    """
    import tensorflow as tf

    def as_dataset(builder, split, decoders=None, **kwargs):
        def convert(example):
            example = dict(example)
            width, height = example.pop("size")
            example["image"] = _jpeg(width, height) if decoders else np.full((height, width, 3), 77, np.uint8)
            return example

        converted = [convert(e) for e in examples]
        spec = tf.nest.map_structure(
            lambda v: tf.TensorSpec((), tf.string) if isinstance(v, bytes) else tf.TensorSpec(np.shape(v), tf.as_dtype(np.asarray(v).dtype)),
            converted[0],
        )
        return tf.data.Dataset.from_generator(lambda: iter(converted), output_signature=spec)

    return as_dataset


def test_tfds_voc_via_mock_data():
    import tensorflow_datasets as tfds_lib

    objects = dict(  # TFDS VOC: XML corners / size, (ymin, xmin, ymax, xmax); XML <1, 1, 10, 10> and <5, 3, 40, 20>
        bbox=np.array([[1 / 20, 1 / 40, 10 / 20, 10 / 40], [3 / 20, 5 / 40, 20 / 20, 40 / 40]], np.float32),
        label=np.array([14, 7]), is_difficult=np.array([False, True]), is_truncated=np.array([False, False]), pose=np.array([0, 1]),
    )
    example = {"size": (40, 20), "image/filename": b"000005.jpg", "objects": objects,
               "labels": np.array([7, 14]), "labels_no_difficult": np.array([14])}
    with tfds_lib.testing.mock_data(as_dataset_fn=_mock_dataset([example]), policy=tfds_lib.testing.MockPolicy.USE_CODE):
        source = tfds("voc/2007", "test", data_dir="/nonexistent")
        records = source.records()
    assert source.class_names == list(VOC_CLASSES)  # from the TFDS feature info
    (record,) = records
    assert record.image_id == "000005" and (record.width, record.height) == (40, 20)
    np.testing.assert_allclose(record.boxes, [[0, 0, 10, 10], [4, 2, 40, 20]])
    assert record.classes.tolist() == [14, 7] and record.difficult.tolist() == [False, True]
    assert record.image_path is None and isinstance(record.image, bytes) and record.image[:2] == b"\xff\xd8"
    assert load_image(record).shape == (20, 40, 3)


def test_tfds_coco_via_mock_data_reencodes_arrays():
    import tensorflow_datasets as tfds_lib

    objects = dict(  # COCO bbox [2, 3, 10, 5] in a 50x20 image, a crowd [0, 0, 25, 20]
        bbox=np.array([[3 / 20, 2 / 50, 8 / 20, 12 / 50], [0, 0, 1, 0.5]], np.float32),
        label=np.array([0, 79]), is_crowd=np.array([False, True]), area=np.array([48, 500]), id=np.array([1, 2]),
    )
    example = {"size": (50, 20), "image/filename": b"000000000139.jpg", "image/id": np.int64(139), "objects": objects}
    with tfds_lib.testing.mock_data(as_dataset_fn=_mock_dataset([example]), policy=tfds_lib.testing.MockPolicy.USE_CODE):
        source = tfds("coco/2017", "validation")
        # decoded arrays (no SkipDecoding) are re-encoded
        source._tfds_load = _without_skip_decoding(source)
        (record,) = source.records()
    assert source.class_names == list(COCO_CLASSES)  # placeholders '0'..'79' replaced
    assert record.image_id == 139
    np.testing.assert_allclose(record.boxes, [[2, 3, 12, 8], [0, 0, 25, 20]], atol=1e-4)
    assert record.iscrowd.tolist() == [False, True] and record.ignore.tolist() == [False, True]
    assert record.area.tolist() == [48, 500]
    image = load_image(record)
    assert image.shape == (20, 50, 3) and abs(int(image[10, 25, 0]) - 77) <= 2


def _without_skip_decoding(source):
    def load():
        import tensorflow_datasets as tfds_lib

        dataset, info = tfds_lib.load(source.tfds_name, split=source.split, with_info=True)
        return tfds_lib.as_numpy(dataset), info

    return load


def test_tfds_not_prepared_gives_a_clear_error(tmp_path):
    with pytest.raises(DatasetError) as err:
        tfds("voc/2007", "test", data_dir=str(tmp_path), download=False).records()
    message = str(err.value)
    assert message.startswith(f"tfds:voc/2007[test]: cannot load (download=False) the TFDS dataset in data_dir={tmp_path}")
    assert "could not find data" in message
    assert "tfds build voc/2007 --data_dir DIR" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
