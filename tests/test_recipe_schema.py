"""The recipe schema (kdet.defaults.default_recipe): typos fail, custom keys pass, _delete_ replaces,
and one recipe's NMS settings reach training's val_AP, the final evaluation, the export and infer."""

import json
import os

import numpy as np
import pytest

from _helpers import REPO, load_tool
from kdet.config import RecipeError, apply_override, check_recipe, load_recipe, merge
from kdet.defaults import NMS_DEFAULTS, default_recipe

RECIPES = str(REPO / "recipes")


def _recipe_file(tmp_path, body, name="r.py"):
    path = tmp_path / name
    path.write_text(f"import sys; sys.path.insert(0, {RECIPES!r})\n"
                    "from _base_ssd import recipe as base\nfrom kdet.config import merge\n" + body)
    return str(path)


@pytest.mark.parametrize("section, typo, closest", [
    ("model", "backbone_weight", "backbone_weights"),
    ("data", "batchsize", "batch_size"),
    ("loss", "neg_pos_ration", "neg_pos_ratio"),
    ("train", "lr_step", "lr_steps"),
    ("eval", "max_detection", "max_detections"),
])
def test_misspelled_key_names_key_section_and_closest(tmp_path, section, typo, closest):
    path = _recipe_file(tmp_path, f"recipe = merge(base, dict({section}=dict({typo}=1)))\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message and path in message
    assert f"unknown key {typo!r} in section {section!r}" in message
    assert f"did you mean {closest!r}" in message


def test_misspelled_top_level_section(tmp_path):
    path = _recipe_file(tmp_path, "recipe = merge(base, dict(trian=dict(epochs=1)))\n")
    with pytest.raises(RecipeError, match=r"unknown key 'trian' in the top level \(did you mean 'train'"):
        load_recipe(path)


def test_typo_without_a_near_key_lists_the_known_ones():
    with pytest.raises(RecipeError, match=r"unknown key 'zzz' in section 'eval' \(known: class_agnostic, "):
        check_recipe(dict(eval=dict(zzz=1)))


def test_custom_section_and_value_dicts_are_not_checked(tmp_path):
    path = _recipe_file(tmp_path, "recipe = merge(base, dict(custom=dict(my_flag=True, nested=dict(a=1)),\n"
                                  "    loss=dict(class_weights=dict(cat=2.0)),\n"
                                  "    train=dict(unfreeze_schedule={0: 0, 3: 'all'})))\n")
    recipe = load_recipe(path, ["custom.my_flag=False"])
    assert recipe["custom"] == dict(my_flag=False, nested=dict(a=1))
    assert recipe["loss"]["class_weights"] == dict(cat=2.0)


def test_recipes_without_the_base_are_checked_too(tmp_path):
    partial = tmp_path / "partial.py"
    partial.write_text("recipe = dict(model=dict(image_size=300), data=dict(train=None))\n")
    recipe = load_recipe(str(partial), ["eval.score_threshold=0.2"])  # a schema key: section created
    assert recipe["eval"] == dict(score_threshold=0.2) and recipe["name"] == "partial"
    partial.write_text("recipe = dict(model=dict(imagesize=300))\n")
    with pytest.raises(RecipeError, match="did you mean 'image_size'"):
        load_recipe(str(partial))


def test_set_typo_suggests_the_key():
    recipe = default_recipe()
    with pytest.raises(RecipeError, match=r"bad --set key 'train.epoch': no such key \(did you mean 'train.epochs'\?\)"):
        apply_override(recipe, "train.epoch=3")
    with pytest.raises(RecipeError, match="no section 'nope'"):
        apply_override(recipe, "nope.x=1")


def test_delete_marker_replaces_a_subtree():
    base = dict(train=dict(unfreeze_schedule={0: 0, 2: 2, 4: "all"}, epochs=3), loss=dict(class_weights=dict(a=1, b=2)))
    plain = merge(base, dict(train=dict(unfreeze_schedule={0: 1})))
    assert plain["train"]["unfreeze_schedule"] == {0: 1, 2: 2, 4: "all"}  # dicts only grow
    out = merge(base, dict(train=dict(unfreeze_schedule={"_delete_": True, 0: 1}),
                           loss=dict(class_weights={"_delete_": True, "c": 3})))
    assert out["train"] == dict(unfreeze_schedule={0: 1}, epochs=3)
    assert out["loss"]["class_weights"] == {"c": 3}
    assert base["train"]["unfreeze_schedule"] == {0: 0, 2: 2, 4: "all"}  # base untouched
    # where the base has no dict, the marker is dropped, not kept as a key
    assert merge(dict(train=dict(unfreeze_schedule=None)),
                 dict(train=dict(unfreeze_schedule={"_delete_": True, 0: 0})))["train"]["unfreeze_schedule"] == {0: 0}
    # a whole section can be replaced too (then the schema still checks what is left)
    assert merge(base, dict(loss={"_delete_": True, "alpha": 2.0}))["loss"] == dict(alpha=2.0)


def test_base_recipe_is_the_schema_and_exposes_every_nms_setting(tmp_path):
    base = load_recipe(_recipe_file(tmp_path, "recipe = base\n"))
    schema = default_recipe()
    assert {k: sorted(v) if isinstance(v, dict) else None for k, v in base.items() if k != "name"} == \
        {k: sorted(v) if isinstance(v, dict) else None for k, v in schema.items() if k != "name"}
    assert {k: base["eval"][k] for k in NMS_DEFAULTS} == dict(NMS_DEFAULTS)


def test_shipped_recipes_load_and_build(tmp_path, monkeypatch):
    import kdet.engine as engine

    monkeypatch.setenv("KDET_CACHE", str(tmp_path))
    offline = ["model.backbone_weights=None", "model.width_multiplier=0.125", "train.unfreeze_schedule=None",
               "loss.class_weights=None"]
    for name in ("ssd_shapes", "ssd300_voc", "ssd300_bccd", "ssd300_fpn_voc", "ssd_fpn_bccd", "ssd_bccd_scratch",
                 "ssd_bccd_race"):
        recipe = load_recipe(os.path.join(RECIPES, name + ".py"), offline)
        model = engine.build_model(recipe, ["a", "b"])
        engine.build_loss(recipe, ["a", "b"], verbose=False, anchors_per_level=model.anchors_per_level)
        engine.build_optimizer(recipe, model, steps_per_epoch=10)
        assert engine.eval_settings(recipe).keys() == NMS_DEFAULTS.keys()


def test_build_optimizer_weight_decay_default_is_the_schema_one():
    import keras

    import kdet.engine as engine

    recipe = dict(train=dict(learning_rate=1e-3, epochs=1))  # no weight_decay, optimizer, momentum
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    opt = engine.build_optimizer(recipe, model, steps_per_epoch=1)
    assert default_recipe()["train"]["weight_decay"] == 5e-4
    assert getattr(opt, "l2", None) == pytest.approx(5e-4)


# ------------------------------------------------------------------ one recipe's NMS settings everywhere
TINY = """
import sys; sys.path.insert(0, {recipes!r})
from _base_ssd import recipe as base
from kdet.config import merge
from kdet.data.augment import resize
from kdet.data.shapes import SHAPES_CLASSES
from kdet.data.sources import shapes

PARAMS = dict(num_train=4, num_test=4, image_size=64, max_objects=3)
recipe = merge(base, dict(
    model=dict(backbone="vgg16_bn", image_size=64, width_multiplier=0.125, backbone_weights=None,
               anchor_scales=[0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05]),
    data=dict(class_names=list(SHAPES_CLASSES), train=shapes({root!r}, "train", **PARAMS),
              val=shapes({root!r}, "test", **PARAMS), test=shapes({root!r}, "test", **PARAMS),
              augment=[resize()], batch_size=2, eval_batch_size=2, max_boxes=4),
    eval=dict(every_n_epochs=1, score_threshold=0.02, iou_threshold=0.3, max_detections=7, pre_nms_top_k=50,
              class_agnostic=True, per_class_top_k=False),
    verbose=0,
))
"""


def test_train_evaluate_export_and_infer_use_the_recipes_nms_settings(tmp_path, monkeypatch):
    import kdet.engine as engine
    import kdet.export
    import kdet.postprocess

    path = tmp_path / "tiny.py"
    path.write_text(TINY.format(recipes=RECIPES, root=str(tmp_path / "shapes")))
    recipe = load_recipe(str(path))
    expected = dict(score_threshold=0.02, iou_threshold=0.3, max_detections=7, pre_nms_top_k=50,
                    class_agnostic=True, per_class_top_k=False)
    assert engine.eval_settings(recipe) == expected
    expected_call = dict(expected, score_activation="softmax")  # the model's scoring travels beside the NMS

    calls = []
    real = kdet.postprocess.decode_detections

    def spy(y_pred, **nms):
        calls.append(dict(nms))
        return real(y_pred, **nms)

    monkeypatch.setattr(kdet.postprocess, "decode_detections", spy)
    monkeypatch.setattr(kdet.export, "decode_detections", spy)

    sources = engine.load_sources(recipe)
    names = engine.class_names_of(recipe, sources)
    records = engine.load_records(sources)
    model = engine.build_model(recipe, names)
    # training: the val_AP callback's detection function
    val_ds = engine.build_eval_dataset(recipe, records["val"], with_meta=True)
    from kdet.metrics.callback import COCOEvalCallback

    callback = [c for c in engine.build_callbacks(recipe, str(tmp_path / "w"), names, val_ds, False)
                if isinstance(c, COCOEvalCallback)][0]
    callback.set_model(model)
    callback.evaluate()
    assert calls and all(c == expected_call for c in calls), calls
    # final evaluation and export
    calls.clear()
    os.makedirs(tmp_path / "w", exist_ok=True)
    engine.finish(model, recipe, str(tmp_path / "w"), names, records["test"], 0.0)
    # the run report's candidate-cap check rescores with a wider cap (4x at most), nothing else differs
    widened = [c for c in calls if c["pre_nms_top_k"] != 50]
    assert all(c == dict(expected_call, pre_nms_top_k=c["pre_nms_top_k"]) and 50 < c["pre_nms_top_k"] <= 200
               for c in widened), widened
    config = json.loads((tmp_path / "w" / "report_config.json").read_text())
    assert bool(widened) == bool(config["nms"]["wider"])
    assert len(calls) - len(widened) >= 2 and all(c == expected_call for c in calls if c not in widened), calls
    export_dir = tmp_path / "w" / "saved_model"
    written = json.loads((export_dir / "kdet_export.json").read_text())
    assert {k: written[k] for k in expected} == expected
    # infer: the SavedModel serves with those settings (at most 7 detections, scores > 0.02)
    infer = load_tool("infer")
    detect, infer_names = infer.load_detector(str(export_dir))
    boxes, scores, classes = detect(np.full((80, 96, 3), 127, np.uint8))
    assert infer_names == names and len(scores) <= 7 and np.all(scores > 0.02)


def test_conflicting_nms_settings_fail_early():
    import kdet.engine as engine

    with pytest.raises(RecipeError, match="class_agnostic=True needs eval.per_class_top_k=False"):
        engine.eval_settings(dict(eval=dict(class_agnostic=True, per_class_top_k=True)))
    assert engine.eval_settings(dict()) == dict(NMS_DEFAULTS)  # a recipe without eval: the defaults
