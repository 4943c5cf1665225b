"""Pre-flight checks (tiny objects, anchor coverage, BCCD) and anchors "auto" through save/load/export."""

import copy
import warnings

import numpy as np
import pytest

from _helpers import BCCD
from kdet.analysis.anchors import AnchorSetup, coverage_of_boxes, resolve_auto_anchors, training_boxes
from kdet.analysis.preflight import run_preflight
from kdet.data.records import Record
from kdet.models.anchors import ssd_scales
from kdet.models.ssd import default_aspect_ratios

SMALL_SETUP = AnchorSetup(96, [12, 6, 3], [0.1, 0.3, 0.6, 0.9], [[2], [2], [2]])


def recipe_for(image_size, iou_threshold=0.5, **model):
    return dict(model=dict(image_size=image_size, **model), data=dict(), loss=dict(iou_threshold=iou_threshold))


def tiny_object_records(n=10, size=4.0, image=300):
    """``n`` 300x300 images, each with two 4x4-px objects (1.28 px at a 96-px input)."""
    return [Record(i, None, image, image, boxes=[[20 + i, 30, 20 + i + size, 30 + size], [150, 150, 150 + size, 150 + size]],
                   classes=[0, 0]) for i in range(n)]


def test_tiny_objects_warn_with_the_image_size_that_fixes_them():
    result = run_preflight(recipe_for(96), {"train": tiny_object_records()}, ["speck"], anchor_setup=SMALL_SETUP)
    data = result["data"]
    assert data["classes"]["speck"] == dict(images=10, objects=20, share=1.0)
    sizes = data["sizes_at_input"]["speck"]
    assert sizes["p50"] == pytest.approx(4 * 96 / 300) and sizes["tiny_share"] == 1.0
    # 8 px / 1.28 px * 96 = 600, rounded up to a multiple of 32.
    assert sizes["fix_image_size"] == 608
    text = "\n".join(data["warnings"])
    assert "speck: 100% of its objects are under 8 px" in text and "model.image_size=608" in text
    assert "that small in the original images too" in text
    assert "fine_map" not in text  # the recipe names no VGG16 backbone
    # The smallest anchor (0.1 * 96 = 9.6 px) against a 1.28 px box: IoU ~0.02, far below 0.5.
    assert data["anchor_coverage"]["per_class"]["speck"]["covered"] == 0.0
    assert "speck: only 0% of its objects have an anchor at IoU >= 0.5" in text
    assert "WARNING" in result["brief"] and "pre-flight" in result["full"]


def test_tiny_objects_on_a_vgg16_base_name_the_stride4_map_until_it_is_on():
    for fine_map, named in ((False, True), (True, False)):
        recipe = recipe_for(96, backbone="vgg16_bn", fine_map=fine_map)
        text = "\n".join(run_preflight(recipe, {"train": tiny_object_records()}, ["speck"],
                                       anchor_setup=SMALL_SETUP)["data"]["warnings"])
        assert "model.image_size=608" in text
        assert ("model.fine_map=True" in text) == named


def test_no_warnings_on_objects_that_fit():
    records = [Record(i, None, 96, 96, boxes=[[10, 10, 40, 40]], classes=[0]) for i in range(5)]
    result = run_preflight(recipe_for(96), {"train": records}, ["blob"], anchor_setup=SMALL_SETUP)
    assert result["data"]["warnings"] == []


@pytest.mark.skipif(not (BCCD / "Annotations").is_dir(), reason="BCCD not available")
def test_bccd_warns_about_platelets_not_about_wbc():
    from kdet.data.sources import voc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = voc(str(BCCD), "trainval", class_names=["RBC", "WBC", "Platelets"], skip_invalid=True).records()
    setup = AnchorSetup(300, [38, 19, 10, 5, 3, 1], ssd_scales(6), default_aspect_ratios(6))
    result = run_preflight(recipe_for(300), {"train": records}, ["RBC", "WBC", "Platelets"], anchor_setup=setup)
    data = result["data"]
    assert not [w for w in data["warnings"] if w.startswith("WBC")]
    assert data["sizes_at_input"]["WBC"]["tiny_share"] == 0.0
    assert data["anchor_coverage"]["per_class"]["WBC"]["covered"] > 0.99
    # The README's audit / anchor figures: 64.4% of platelets reach IoU 0.5 with SSD300's anchors.
    platelets = [w for w in data["warnings"] if w.startswith("Platelets")]
    assert len(platelets) == 1 and "only 64%" in platelets[0] and "'auto'" in platelets[0]
    assert data["classes"]["Platelets"]["objects"] == 292
    assert data["box_problems"]["duplicate_boxes"] == 6   # 7 in all 364 images (README), 6 in trainval


# ------------------------------------------------------------------ anchors "auto"
def small_records():
    """6 x 6 px objects centred on the first map's cells (12 x 12 at 96 px: centres 4 + 8 i).

    SSD's smallest default anchor is 0.1 * 96 = 9.6 px: IoU 36 / 92 = 0.39 < 0.5, all missed;
    an anchor fitted to them (6 px at the same centres) has IoU 1.
    """
    rng = np.random.default_rng(0)
    out = []
    for i in range(12):
        cx, cy = 4 + 8 * rng.integers(0, 12), 4 + 8 * rng.integers(0, 12)
        out.append(Record(i, None, 96, 96, boxes=[[cx - 3, cy - 3, cx + 3, cy + 3]], classes=[0]))
    return out


TINY_MODEL = dict(backbone="vgg16_bn", width_multiplier=0.125, backbone_weights=None,
                  anchor_scales="auto", aspect_ratios="auto")


def test_auto_anchors_raise_coverage_and_survive_save_load_export(tmp_path):
    import tensorflow as tf

    import kdet
    from kdet.analysis.anchors import model_anchor_setup
    from kdet.config import RecipeError
    from kdet.engine import build_model
    from kdet.export import export_saved_model

    recipe = recipe_for(96, **TINY_MODEL)
    with pytest.raises(RecipeError, match="'auto' must be fitted"):
        build_model(recipe, ["dot"])
    records = small_records()
    resolved, text = resolve_auto_anchors(copy.deepcopy(recipe), ["dot"], records)
    scales, ratios = resolved["model"]["anchor_scales"], resolved["model"]["aspect_ratios"]
    assert all(isinstance(s, float) for s in scales) and "anchors 'auto'" in text
    setup = model_anchor_setup(recipe["model"], 1)
    boxes, classes = training_boxes(records)
    coverage = lambda anchors: coverage_of_boxes(boxes, classes, anchors, 96, ["dot"])["overall"]["covered"]
    before, after = coverage(setup.boxes()), coverage(setup.boxes(scales, ratios))
    assert before == 0.0 and after == 1.0

    model = build_model(resolved, ["dot"])
    np.testing.assert_allclose(model.anchors, setup.boxes(scales, ratios))
    path = str(tmp_path / "m.keras")
    model.save(path)
    reloaded = kdet.load_model(path)
    assert reloaded.get_config()["anchor_scales"] == scales
    np.testing.assert_array_equal(reloaded.anchors, model.anchors)

    export_dir = str(tmp_path / "saved_model")
    export_saved_model(reloaded, export_dir, ["dot"], score_threshold=0.0)
    served = tf.saved_model.load(export_dir).signatures["serving_default"]
    constants = graph_constants(served.graph.as_graph_def())
    anchors = [c.reshape(-1, 4) for c in constants if c.size == model.anchors.size and c.shape[-1:] == (4,)]
    assert anchors, "no anchor constant in the SavedModel graph"
    np.testing.assert_allclose(anchors[0], model.anchors, atol=1e-6)
    default = setup.boxes()
    assert default.shape != model.anchors.shape or not np.allclose(default, model.anchors)


def graph_constants(graph_def):
    """Every float32 constant of a GraphDef, its function library included."""
    from tensorflow.python.framework import tensor_util

    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return [tensor_util.MakeNdarray(n.attr["value"].tensor) for n in nodes
            if n.op == "Const" and n.attr["value"].tensor.dtype == 1]   # DT_FLOAT
