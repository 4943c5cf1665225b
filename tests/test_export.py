"""SavedModel export: raw uint8 images in, TF OD API outputs out, served without kdet."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from kdet.export import export_saved_model
from kdet.models.ssd import SSD

CLASS_NAMES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = SSD(num_classes=3, image_size=96, width_multiplier=0.125, backbone_weights=None)
    export_dir = str(tmp_path_factory.mktemp("export") / "saved_model")
    export_saved_model(model, export_dir, CLASS_NAMES, score_threshold=0.0, max_detections=20)
    return model, export_dir


def _images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(2, 120, 160, 3), dtype=np.uint8)


def test_signature_outputs(exported):
    _, export_dir = exported
    loaded = tf.saved_model.load(export_dir)
    out = loaded.signatures["serving_default"](images=tf.constant(_images()))
    assert out["detection_boxes"].shape == (2, 20, 4)
    assert out["detection_scores"].shape == (2, 20)
    assert out["detection_classes"].dtype == tf.float32
    assert out["num_detections"].dtype == tf.float32
    n = out["num_detections"].numpy().astype(int)
    classes = out["detection_classes"].numpy()
    for i in range(2):
        assert np.all((classes[i, : n[i]] >= 1) & (classes[i, : n[i]] <= 3))
        assert np.all(classes[i, n[i]:] == 0)
    boxes = out["detection_boxes"].numpy()
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0
    names = [s.decode() for s in loaded.class_names.numpy()]
    assert names == CLASS_NAMES


def test_served_without_kdet_matches_predict_records(tiny_trained, tmp_path):
    """The SavedModel of a trained model, served in a process without kdet, gives the detections the
    metrics came from (``engine.predict_records``) at a realistic threshold: boxes, scores and classes (+1)."""
    import kdet.engine as engine
    from kdet.config import load_recipe
    from kdet.data.records import load_image
    from kdet.models.ssd import load_model

    model = load_model(tiny_trained["work_dir"] + "/last.keras")
    # a threshold that keeps about 20 of an image's candidates, whatever this tiny model's scores are
    low = load_recipe(tiny_trained["recipe_path"], ["eval.max_detections=100"])
    top = [np.sort(r["scores"])[::-1] for r in engine.predict_records(model, low["data"]["test"].records(), low)]
    threshold = float(np.median([s[min(19, len(s) - 1)] for s in top if len(s)]))
    recipe = load_recipe(tiny_trained["recipe_path"], [f"eval.score_threshold={threshold}", "eval.max_detections=100"])
    records = recipe["data"]["test"].records()
    export_dir = str(tmp_path / "saved_model")
    export_saved_model(model, export_dir, recipe["data"]["class_names"], score_threshold=threshold,
                       max_detections=100)
    reference = engine.predict_records(model, records, recipe)

    images = np.stack([load_image(r) for r in records])  # 64 x 64, the model's size: no resize on either path
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import sys, json, numpy as np, tensorflow as tf
        loaded = tf.saved_model.load({export_dir!r})
        out = loaded.signatures["serving_default"](images=tf.constant(np.load({str(tmp_path / 'images.npy')!r})))
        np.savez({str(tmp_path / 'served.npz')!r}, **{{k: v.numpy() for k, v in out.items()}})
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("kdet"))))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []  # kdet never imported
    served = np.load(tmp_path / "served.npz")

    counts = served["num_detections"].astype(int)
    assert counts.sum() > 0 and (counts < 100).all()  # the threshold, not the maximum, decides the count
    for i, (record, ref) in enumerate(zip(records, reference)):
        n = counts[i]
        assert n == len(ref["scores"]), i
        scale = np.array([record.height, record.width] * 2, np.float32)  # yxyx
        np.testing.assert_allclose(served["detection_boxes"][i, :n] * scale, ref["boxes"][:, [1, 0, 3, 2]],
                                   atol=1e-3)
        np.testing.assert_allclose(served["detection_scores"][i, :n], ref["scores"], atol=1e-5)
        np.testing.assert_array_equal(served["detection_classes"][i, :n], ref["classes"] + 1)
        assert (served["detection_scores"][i, :n] >= 0.3).all() and (served["detection_classes"][i, n:] == 0).all()
