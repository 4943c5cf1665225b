"""The tools as a user runs them: fresh processes, bad inputs -> one ``error:`` line naming the file, exit 2.

Each case runs ``python tools/X.py ...`` in a new process (so nothing this test process
imported can hide a missing import) and checks the exit code, that stderr's last line
names the file or id and the problem, and that no traceback was printed.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from _helpers import BCCD, REPO

pytestmark = pytest.mark.skipif(not (BCCD / "Annotations").is_dir(), reason="needs the BCCD dataset")


def run_tool(tool, *args, cwd=None, env=None):
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environment.update(PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=str(cwd or REPO), env=environment, timeout=600)


def last_error_line(proc, *needles, code=2):
    """stderr's last line, after checking exit code, ``error:`` prefix, the needles and no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert str(needle) in lines[-1], (needle, lines[-1])
    return lines[-1]


# ------------------------------------------------------------------ tools/eval.py on BCCD-derived json
@pytest.fixture(scope="module")
def bccd_coco(tmp_path_factory):
    """BCCD's first 12 test images as COCO ground truth, and perfect detections of them (1-based ids)."""
    from kdet.data.coco import records_to_coco_json
    from kdet.data.voc import VOCSource

    source = VOCSource(BCCD, "test")
    records = source.records()[:12]
    gt = records_to_coco_json(records, source.class_names)
    dets = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=0.9)
            for a in gt["annotations"]]
    folder = tmp_path_factory.mktemp("coco")
    (folder / "gt.json").write_text(json.dumps(gt))
    return folder, gt, dets


def _eval(folder, dets, name="dets.json"):
    path = folder / name
    path.write_text(dets if isinstance(dets, str) else json.dumps(dets))
    return run_tool("eval", "--gt", folder / "gt.json", "--dets", path), path


def test_eval_scores_perfect_bccd_detections(bccd_coco):
    folder, _, dets = bccd_coco
    proc, _ = _eval(folder, dets)
    assert proc.returncode == 0, proc.stderr
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in proc.stdout
    assert proc.stderr.strip() == ""   # no TensorFlow, no warnings


@pytest.mark.parametrize("case, needles", [
    ("not_json", ["is not valid JSON"]),
    ("gt_as_dets", ["detections must be a list", "not results?"]),
    ("no_score", ["detection 2 lacks the field 'score'"]),
    ("unknown_image", ["no detection's image id is in the ground truth", "image id 999"]),
    ("zero_based_all", ["no detection's category id is in the ground truth", "0- vs 1-based", "category id 0",
                        "has category ids 1, 2, 3"]),
    ("nan_box", ["detection 3 (image id", "non-finite bbox"]),
    ("negative_width", ["detection 1 (image id", "negative width or height"]),
    ("inf_score", ["detection 0 (image id", "non-finite score"]),
    ("short_bbox", ["detection 4 has bbox [1, 2, 3]", "4 numbers"]),
    ("string_category", ["detection 0 has category_id 'RBC', not a number"]),
])
def test_eval_bad_results_file_is_one_line(bccd_coco, case, needles):
    folder, gt, dets = bccd_coco
    dets = [dict(d) for d in dets]
    if case == "not_json":
        dets = json.dumps(dets)[:-40]           # a results file cut off mid-write
    elif case == "gt_as_dets":
        dets = gt
    elif case == "no_score":
        del dets[2]["score"]
    elif case == "unknown_image":
        dets = [dict(d, image_id=999) for d in dets]
    elif case == "zero_based_all":
        dets = [dict(d, category_id=0) for d in dets]
    elif case == "nan_box":
        dets = json.dumps(dets[:3] + [dict(dets[3], bbox=[1, 2, "NaN", 4])] + dets[4:]).replace('"NaN"', "NaN")
    elif case == "negative_width":
        x, y, w, h = dets[1]["bbox"]
        dets[1]["bbox"] = [x + w, y, -w, h]
    elif case == "inf_score":
        dets = json.dumps([dict(dets[0], score="inf")] + dets[1:]).replace('"inf"', "Infinity")
    elif case == "short_bbox":
        dets[4]["bbox"] = [1, 2, 3]
    elif case == "string_category":
        dets[0]["category_id"] = "RBC"
    proc, path = _eval(folder, dets, name=f"{case}.json")
    last_error_line(proc, path, *needles)


def test_eval_missing_files_name_them(bccd_coco, tmp_path):
    folder, _, dets = bccd_coco
    proc = run_tool("eval", "--gt", tmp_path / "nope.json", "--dets", folder / "gt.json")
    last_error_line(proc, "nope.json", "No such file")


def test_eval_zero_based_classes_warn_with_counts(bccd_coco):
    """The classic mistake: class index as category id; ids 1 and 2 still exist, 0 does not."""
    folder, gt, dets = bccd_coco
    shifted = [dict(d, category_id=d["category_id"] - 1) for d in dets]
    proc, path = _eval(folder, shifted, name="zero_based.json")
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    n_zero = sum(d["category_id"] == 0 for d in shifted)
    assert len(warning) == 1 and f"{n_zero} of {len(shifted)} detections have category id 0" in warning[0]
    assert str(path) in warning[0] and "dropped" in warning[0]


# ------------------------------------------------------------------ the TensorFlow tools
def _garbage_keras(tmp_path, truncate=True):
    """A .keras zip with nonsense inside; ``truncate``: cut off mid-write (its first half)."""
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", json.dumps({"class_name": "SSD"}) * 200)
        z.writestr("model.weights.h5", os.urandom(20000))
    if truncate:
        path.write_bytes(path.read_bytes()[:9000])
    return path


def test_train_missing_recipe_is_one_line_and_quiet(tmp_path):
    proc = run_tool("train", tmp_path / "missing.py")
    line = last_error_line(proc, "missing.py", "recipe not found")
    assert proc.stderr.strip() == line   # no TensorFlow start-up lines (cuInit, cudart_stub, oneDNN)


def test_user_keeps_control_of_tensorflow_logs(tmp_path):
    proc = run_tool("train", tmp_path / "missing.py", env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    last_error_line(proc, "missing.py")
    # with logging on, TensorFlow's own start-up lines are not filtered (at least the CPU-feature note)
    assert len(proc.stderr.strip().splitlines()) > 1


def test_infer_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    last_error_line(run_tool("infer", _garbage_keras(tmp_path), empty, "--out", tmp_path / "o"), "empty",
                    "no images")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(BCCD / "JPEGImages" / "BloodImage_00000.jpg", images)
    last_error_line(run_tool("infer", tmp_path / "model.keras", images, "--out", tmp_path / "o"),
                    "model.keras", "not a .keras model file", "cut off mid-write")


def test_export_bad_model_file(tmp_path):
    proc = run_tool("export", _garbage_keras(tmp_path, truncate=False), tmp_path / "out", "--classes", "RBC,WBC")
    last_error_line(proc, "model.keras", "cannot load the model", "not a kdet .keras model")
    proc = run_tool("export", tmp_path / "nope.keras", tmp_path / "out", "--classes", "RBC")
    last_error_line(proc, "nope.keras", "no such model file")


def test_audit_missing_target(tmp_path):
    last_error_line(run_tool("audit_dataset", tmp_path / "nowhere", "--no-plots"), "nowhere", "no such file")


def test_analyze_anchors_split_not_set(tmp_path):
    recipe = tmp_path / "r.py"
    recipe.write_text(f"import sys; sys.path.insert(0, {str(REPO / 'recipes')!r})\n"
                      "from _base_ssd import recipe as base\n"
                      "from kdet.config import merge\nfrom kdet.data.sources import voc\n"
                      f"recipe = merge(base, dict(data=dict(train=voc({str(BCCD)!r}, 'train'))))\n")
    last_error_line(run_tool("analyze_anchors", recipe, "--split", "val", "--feature-maps", "8,4"),
                    "r.py", "recipe['data']['val'] is not set")


def test_readable_error_line_for_oserror():
    from kdet.cli import error_line

    err = FileNotFoundError(2, "No such file or directory", "/data/x.json")
    assert error_line(err) == "error: /data/x.json: No such file or directory"
    assert error_line(ValueError("first\n  second")) == "error: first second"


def test_train_refused_model_section_is_one_line(tmp_path):
    proc = run_tool("train", REPO / "recipes" / "ssd_bccd_scratch.py", "--work-dir", tmp_path / "run",
                    "--set", "model.backbone=mobilenetv2_fpn", "--set", "model.fine_map=True",
                    "--set", f"data.root={BCCD}")
    last_error_line(proc, "bad model section", "fine_map")


def test_model_sections_ssd_refuses_are_recipe_errors_at_each_first_build():
    from kdet.analysis.anchors import model_anchor_setup
    from kdet.config import RecipeError
    from kdet.defaults import default_recipe
    from kdet.engine import build_model

    recipe = default_recipe()
    recipe["model"].update(backbone="vgg16_bn", backbone_weights=None, width_multiplier=0.125, image_size=96,
                           anchor_scales=[0.1, 0.2])
    with pytest.raises(RecipeError, match="bad model section.*anchor_scales needs"):
        model_anchor_setup(recipe["model"], 3)     # the pre-flight's build
    with pytest.raises(RecipeError, match="bad model section.*anchor_scales needs"):
        build_model(recipe, ["a", "b", "c"])        # the engine's
