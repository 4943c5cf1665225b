"""Per deploy format: size, AP / AP50 on the test split, latency at batch 1 with 1 and 2 threads; one table.

    python tools/benchmark_export.py WORK_DIR/best.keras --recipe R --out DIR \\
        [--yolo-weights YOLO_DIR/weights/best.pt --ultralytics-python VENV/bin/python]

kdet's model is exported by tools/export.py's code to ONNX, TFLite float32 / fp16 / int8; AP and AP50 come
from ``--check``'s code (kdet's COCO evaluator on the recipe's test split, the Keras model beside). Latency:
each artifact in a fresh process that imports only its runtime, one image at the model's size, the median
of --runs calls after --warmup calls, with 1 and 2 runtime threads. With --yolo-weights, Ultralytics exports
its YOLOv8n itself (``format="onnx", nms=True, conf=--yolo-conf`` at its training size) in its own Python, and the same
test images (letterboxed as Ultralytics does) are scored by the same evaluator.
"""

import argparse
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdet.cli import ToolError, load_keras_model, tool_main  # noqa: E402

KDET_FORMATS = (("onnx", None, "kdet.onnx"), ("tflite", None, "kdet.tflite"),
                ("tflite", "fp16", "kdet_fp16.tflite"), ("tflite", "int8", "kdet_int8.tflite"))

LATENCY_SCRIPT = """
import json, statistics, sys, time
import numpy as np
path, threads, runs, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if path.endswith(".tflite"):
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=path, num_threads=threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    image = np.random.default_rng(0).integers(0, 256, detail["shape"]).astype(detail["dtype"])
    def call():
        interpreter.set_tensor(detail["index"], image)
        interpreter.invoke()
else:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    (detail,) = session.get_inputs()
    shape = [1 if not isinstance(d, int) else d for d in detail.shape]
    dtype = np.uint8 if "uint8" in detail.type else np.float32
    image = np.random.default_rng(0).integers(0, 256, shape).astype(dtype)
    if dtype == np.float32:
        image /= 255.0
    def call():
        session.run(None, {detail.name: image})
for _ in range(warmup):
    call()
times = []
for _ in range(runs):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "torch", "kdet", "ultralytics"))
print(json.dumps(dict(median_ms=1000 * statistics.median(times), leaked=leaked)))
"""

YOLO_EXPORT_SCRIPT = """
import sys
from ultralytics import YOLO
path = YOLO(sys.argv[1]).export(format="onnx", imgsz=int(sys.argv[2]), nms=True, conf=float(sys.argv[3]),
                                dynamic=False, simplify=False)
print(path)
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a .keras file written by training")
    p.add_argument("--recipe", required=True, help="the model's recipe (test split, NMS settings, int8 calibration)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="folder for the artifacts and benchmark_export.json")
    p.add_argument("--runs", type=int, default=50, help="timed calls per artifact and thread count (median)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", default="1,2", help="runtime thread counts (default 1,2)")
    p.add_argument("--calibration-images", type=int, default=100)
    p.add_argument("--yolo-weights", help="Ultralytics YOLOv8n weights (best.pt) trained on the same data")
    p.add_argument("--yolo-imgsz", type=int, default=320, help="YOLOv8n's input size (its training size)")
    p.add_argument("--yolo-conf", type=float, default=0.001,
                   help="score threshold of YOLOv8n's exported NMS (Ultralytics' val default; its export default 0.25)")
    p.add_argument("--reuse", action="store_true", help="keep kdet artifacts already in --out (no re-export)")
    p.add_argument("--ultralytics-python", default=sys.executable, help="a Python with ultralytics installed")
    p.add_argument("--ultralytics-path", action="append", default=[],
                   help="extra folders on that Python's PYTHONPATH (e.g. onnx/onnxruntime installed with --target)")
    return p.parse_args(argv)


def latency(path, threads, runs, warmup, python=sys.executable, extra_path=()):
    """Median ms of one call in a fresh process importing only the artifact's runtime."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(extra_path)
    done = subprocess.run([python, "-c", LATENCY_SCRIPT, path, str(threads), str(runs), str(warmup)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise ToolError(f"latency of {path}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["leaked"]:
        raise ToolError(f"latency of {path}: the runtime process imported {result['leaked']}")
    return result["median_ms"]


def letterbox(image, size):
    """Ultralytics' letterbox: resize keeping the aspect ratio, pad with 114 to ``size`` x ``size``."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = min(size / h, size / w)
    nh, nw = round(h * scale), round(w * scale)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas = np.full((size, size, 3), 114, np.uint8)
    canvas[top:top + nh, left:left + nw] = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    return canvas, scale, left, top


def yolo_scores(onnx_path, records, class_names, size):
    """COCO AP / AP50 of Ultralytics' ONNX (nms=True: ``[1, max_det, 6]`` x1 y1 x2 y2 score class)."""
    import onnxruntime as ort

    from kdet.data.coco import coco_image_ids, records_to_coco_json, to_coco_results
    from kdet.data.records import load_image
    from kdet.metrics.coco import coco_evaluate

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    detections = []
    for record in records:
        image, scale, left, top = letterbox(load_image(record), size)
        out = session.run(None, {name: image.transpose(2, 0, 1)[None].astype(np.float32) / 255.0})[0][0]
        out = out[out[:, 4] > 0]
        boxes = (out[:, :4] - [left, top, left, top]) / scale
        detections.append(dict(boxes=boxes, scores=out[:, 4], classes=out[:, 5].astype(int)))
    metrics = coco_evaluate(records_to_coco_json(records, class_names),
                            to_coco_results(coco_image_ids(records), detections))
    return {"AP": float(metrics["AP"]), "AP50": float(metrics["AP50"])}


def table(rows, threads):
    head = ["system / format", "input", "size MB", "AP", "AP50"] + [f"ms @{t} thread{'s' * (t > 1)}" for t in threads]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], row["input"], f"{row['size_mb']:.2f}" if row.get("size_mb") else "-",
                 f"{row['AP']:.4f}", f"{row['AP50']:.4f}"]
        cells += [f"{row['ms'][str(t)]:.1f}" if row.get("ms") else "-" for t in threads]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@tool_main
def main(argv=None):
    args = parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    from kdet.config import load_recipe
    from kdet.deploy_check import artifact_check
    from kdet.engine import class_names_of, eval_settings, load_sources
    from kdet.export import export

    recipe = load_recipe(args.recipe, args.overrides)
    sources = load_sources(recipe)
    if sources["test"] is None:
        raise ToolError("the recipe has no test split (data.test) to score on")
    class_names, nms = class_names_of(recipe, sources), eval_settings(recipe)
    records = sources["test"].records()
    model = load_keras_model(args.model)
    size = model.input_shape[1]
    os.makedirs(args.out, exist_ok=True)
    rows, keras_scores = [], None
    for fmt, quantize, file_name in KDET_FORMATS:
        path = os.path.join(args.out, file_name)
        calibration = None
        if quantize == "int8" and not (args.reuse and os.path.exists(path)):
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from export import calibration_images

            calibration = calibration_images(recipe, args.calibration_images)
        if not (args.reuse and os.path.exists(path)):
            print(f"exporting {file_name}", flush=True)
            export(model, path, class_names, format=fmt, quantize=quantize, calibration_images=calibration, **nms)
        check = artifact_check(model, path, recipe, class_names, nms, records=records)
        keras_scores = check["keras"]
        rows.append(dict(name=f"kdet {fmt}" + (f" {quantize}" if quantize else " float32" if fmt == "tflite" else ""),
                         input=f"{size} px uint8", size_mb=os.path.getsize(path) / 1e6, **check["artifact"],
                         agreement_AP50=check["agreement_AP50"],
                         ms={str(t): latency(path, t, args.runs, args.warmup) for t in threads}))
        print(rows[-1], flush=True)
    rows.insert(0, dict(name="kdet Keras model", input=f"{size} px", **keras_scores))
    if args.yolo_weights:
        print("exporting YOLOv8n with Ultralytics", flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(args.ultralytics_path), YOLO_AUTOINSTALL="false")
        done = subprocess.run([args.ultralytics_python, "-c", YOLO_EXPORT_SCRIPT, args.yolo_weights,
                               str(args.yolo_imgsz), str(args.yolo_conf)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise ToolError(f"Ultralytics ONNX export failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        onnx_path = done.stdout.strip().splitlines()[-1]
        rows.append(dict(name="YOLOv8n onnx nms=True (Ultralytics)", input=f"{args.yolo_imgsz} px float",
                         size_mb=os.path.getsize(onnx_path) / 1e6,
                         **yolo_scores(onnx_path, records, class_names, args.yolo_imgsz),
                         ms={str(t): latency(onnx_path, t, args.runs, args.warmup) for t in threads}))
        print(rows[-1], flush=True)
    with open(os.path.join(args.out, "benchmark_export.json"), "w") as f:
        json.dump(dict(rows=rows, runs=args.runs, warmup=args.warmup, test_images=len(records)), f, indent=1)
    print(textwrap.dedent(f"""
        {len(records)} test images; latency: batch 1, median of {args.runs} calls after {args.warmup}, fresh process
        per artifact importing only its runtime
    """).strip())
    print(table(rows, threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
