"""TFDS's real builder path, offline: no ``tfds.testing.mock_data``.

A tiny ``tfds.core.GeneratorBasedBuilder`` (written by the test into a package, as TFDS's own builders
live in one: ``cls.__module__`` with a dot is what makes ``download_and_prepare`` reach
``importlib_resources``) reads a few generated JPEGs from a local folder. It is prepared with
``download_and_prepare`` (``tfds.load(download=True)``) into a temporary data_dir, read through kdet's
``tfds`` source, and trained on by ``tools/train.py`` in a fresh process, which prepares its own copy.

On tensorflow-datasets 4.9.10 without ``importlib_resources`` (which it imports in
``core/dataset_builder.py`` but declares only for Python < 3.9, tensorflow/datasets#11212) these tests
fail; kdet's install_requires brings the module. The error tests check that kdet tells a missing module
apart from a failed download.
"""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from _helpers import REPO
from _official_layouts import SMALL, check_run, run_train
from kdet.data.base import DatasetError
from kdet.data.sources import tfds

CLASSES = ["dog", "person", "car", "cat"]
COLOURS = [(220, 60, 40), (40, 200, 60), (50, 80, 230), (230, 220, 40)]

BUILDER = '''"""A tiny detection dataset read from a local folder (kdet's tests)."""
import json
import os

import numpy as np
import tensorflow_datasets as tfds

FOLDER = {folder!r}
CLASSES = {classes!r}


def _features():
    return tfds.features.FeaturesDict({{
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "objects": tfds.features.Sequence({{
            "bbox": tfds.features.BBoxFeature(),
            "label": tfds.features.ClassLabel(names=CLASSES),
            "is_difficult": np.bool_,
        }}),
    }})


class KdetTinyDet(tfds.core.GeneratorBasedBuilder):
    """Images and boxes from FOLDER/<split>.json (pixel xyxy) and FOLDER/*.jpg."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=_features())

    def _split_generators(self, dl_manager):
        return {{split: self._generate_examples(split) for split in ("train", "test")}}

    def _generate_examples(self, split):
        with open(os.path.join(FOLDER, split + ".json")) as f:
            items = json.load(f)
        for item in items:
            w, h = item["width"], item["height"]
            yield item["file"], {{
                "image": os.path.join(FOLDER, item["file"]),
                "image/filename": item["file"],
                "image/id": item["id"],
                "objects": {{
                    "bbox": [tfds.features.BBox(ymin=b[1] / h, xmin=b[0] / w, ymax=b[3] / h, xmax=b[2] / w)
                             for b in item["boxes"]],
                    "label": item["labels"],
                    "is_difficult": item["difficult"],
                }},
            }}


class KdetTinyBroken(KdetTinyDet):
    """Its generation needs a module that is not installed."""

    def _generate_examples(self, split):
        import kdet_no_such_module  # noqa: F401

        yield from super()._generate_examples(split)


class KdetTinyOffline(KdetTinyDet):
    """Downloads its data from a port where nothing listens (an offline machine, at once)."""

    def _split_generators(self, dl_manager):
        dl_manager.download("http://127.0.0.1:9/kdet_tiny_det.tar")
        return super()._split_generators(dl_manager)
'''


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    """The builder package (``kdet_tiny_tfds.tiny_det``) and the truth of its two splits."""
    base = tmp_path_factory.mktemp("tfds_builder")
    folder = base / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    truth, next_id = {}, 1001
    for split, count in (("train", 8), ("test", 4)):
        items = []
        for k in range(count):
            w, h = ((96, 72), (80, 96))[k % 2]
            pixels = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
            boxes, labels = [], []
            for _ in range(1 + k % 2):
                bw, bh = int(rng.integers(w // 2, w - 4)), int(rng.integers(h // 2, h - 4))
                x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                label = int(rng.integers(len(CLASSES)))
                pixels[y0:y0 + bh, x0:x0 + bw] = COLOURS[label]
                boxes.append([x0, y0, x0 + bw, y0 + bh])
                labels.append(label)
            name = f"{split}_{k}.jpg"
            Image.fromarray(pixels).save(folder / name, quality=95)
            items.append(dict(file=name, id=next_id, width=w, height=h, boxes=boxes, labels=labels,
                              difficult=[False] * len(boxes)))
            next_id += 7
        (folder / f"{split}.json").write_text(json.dumps(items))
        truth[split] = items
    package = base / "kdet_tiny_tfds"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tiny_det.py").write_text(BUILDER.format(folder=str(folder), classes=CLASSES))
    sys.path.insert(0, str(base))
    try:
        import kdet_tiny_tfds.tiny_det  # noqa: F401  (registers the builders with TFDS)
    finally:
        sys.path.remove(str(base))
    return base, truth


def _by_id(records):
    return {record.image_id: record for record in records}


def test_builder_is_prepared_offline_and_read_through_kdets_tfds_source(builder, tmp_path):
    _, truth = builder
    data_dir = tmp_path / "tfds"
    source = tfds("kdet_tiny_det", "train", data_dir=str(data_dir))  # download=True: TFDS prepares it
    records = _by_id(source.records())
    assert (data_dir / "kdet_tiny_det" / "1.0.0" / "dataset_info.json").is_file()
    assert source.class_names == CLASSES
    assert sorted(records) == sorted(item["id"] for item in truth["train"])
    for item in truth["train"]:
        record = records[item["id"]]
        assert (record.width, record.height) == (item["width"], item["height"])
        np.testing.assert_allclose(record.boxes, item["boxes"], atol=1e-3)  # TFDS stores float32 fractions
        assert record.classes.tolist() == item["labels"] and not record.difficult.any()
        assert record.image[:2] == b"\xff\xd8"  # the JPEG as TFDS stored it
    again = tfds("kdet_tiny_det", "test", data_dir=str(data_dir), download=False).records()  # prepared: no builder run
    assert len(again) == len(truth["test"])


def test_train_tool_prepares_and_trains_on_a_tfds_builder_in_a_fresh_process(builder, tmp_path):
    base, truth = builder
    recipe = tmp_path / "tiny_tfds.py"
    recipe.write_text(
        f"import sys\nsys.path[:0] = [{str(REPO / 'recipes')!r}, {str(base)!r}]\n"
        "import kdet_tiny_tfds.tiny_det  # registers the builder\n"
        "from functools import partial\n"
        "from _base_ssd import recipe as base\n"
        "from kdet.config import merge\n"
        "from kdet.data.sources import tfds\n"
        "recipe = merge(base, dict(data=dict(root=None, train=partial(tfds, 'kdet_tiny_det', 'train'),\n"
        "                                    test=partial(tfds, 'kdet_tiny_det', 'test'))))\n")
    data_dir, work = tmp_path / "tfds", tmp_path / "work"
    proc = run_train(recipe, work, [f"data.root={data_dir}", *SMALL])
    assert "kdet_tiny_det downloaded and prepared" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    images, annotations = [], []
    for item in truth["test"]:  # the test's own ground truth: category = label + 1, kdet's TFDS convention
        images.append(dict(id=item["id"], width=item["width"], height=item["height"], file_name=item["file"]))
        for (x0, y0, x1, y1), label in zip(item["boxes"], item["labels"]):
            annotations.append(dict(id=len(annotations) + 1, image_id=item["id"], category_id=label + 1,
                                    bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0), iscrowd=0))
    ground_truth = dict(images=images, annotations=annotations,
                        categories=[dict(id=k + 1, name=n) for k, n in enumerate(CLASSES)])
    check_run(proc, work, ground_truth)


def test_missing_module_in_preparation_is_named_not_the_download(builder, tmp_path):
    with pytest.raises(DatasetError) as err:
        tfds("kdet_tiny_broken", "train", data_dir=str(tmp_path)).records()
    message = str(err.value)
    assert message.startswith(f"tfds:kdet_tiny_broken[train]: TFDS cannot prepare the dataset in data_dir={tmp_path}")
    assert "the Python module 'kdet_no_such_module' is not installed (pip install kdet_no_such_module)" in message
    assert "not a download problem" in message and "offline" not in message and "\n" not in message


def test_failed_download_is_named_as_such_with_the_local_alternative(builder, tmp_path, monkeypatch):
    from tensorflow_datasets.core.download import downloader

    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # TFDS retries 10 times (3.4 minutes) before it gives up
    source = tfds("kdet_tiny_offline", "train", data_dir=str(tmp_path),
                  hint="Or set data.root to a local folder.")
    with pytest.raises(DatasetError) as err:
        source.records()
    message = str(err.value)
    assert message.startswith(f"tfds:kdet_tiny_offline[train]: cannot download the TFDS dataset into data_dir={tmp_path}: "
                              "ConnectionError: ")
    assert "127.0.0.1" in message and "If this machine is offline" in message
    assert "tfds build kdet_tiny_offline --data_dir DIR" in message and message.endswith("Or set data.root to a local folder.")
    assert "not installed" not in message and "\n" not in message
