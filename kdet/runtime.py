"""Run an exported detector with only its own runtime: SavedModel, ``.tflite``, ``.onnx`` or ``.keras``.

``load_detector(path)`` returns ``(detect, names)``: ``detect(image)`` takes one RGB uint8 image
``[H, W, 3]`` of any size and returns normalised ``ymin, xmin, ymax, xmax`` boxes, scores and 1-based
class ids (numpy). Only what the artifact needs is imported: ``onnxruntime`` for ``.onnx``, the LiteRT
interpreter (``ai_edge_litert``, else ``tf.lite``) for ``.tflite``, TensorFlow for a SavedModel, Keras
and kdet for ``.keras``. This module itself imports numpy only.

TFLite and ONNX artifacts take images at the model's size: another size is resized here first
(bilinear, PIL), which differs slightly from the SavedModel's in-graph ``tf.image.resize``.
"""

import os

import numpy as np

from kdet.label_map import label_map_path  # the exporter's naming rule (a leaf module), importable from here too

ARTIFACT_KINDS = ("saved_model", "tflite", "onnx", "keras")


class ArtifactError(ValueError):
    """An artifact that is missing, not of a known kind, or not one kdet exported; one line."""


def read_label_map(artifact):
    path = label_map_path(artifact)
    if not os.path.isfile(path):
        raise ArtifactError(f"{artifact}: no label map beside it ({path}); export writes one")
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def artifact_kind(path):
    if os.path.isdir(path):
        return "saved_model"
    suffix = os.path.splitext(path)[1].lower()
    kind = {".tflite": "tflite", ".onnx": "onnx", ".keras": "keras"}.get(suffix)
    if kind is None:
        raise ArtifactError(f"{path}: not a SavedModel folder, .tflite, .onnx or .keras file")
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: no such file")
    return kind


def _resized(image, height, width):
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _first_line(err):
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:200]


def tflite_detector(path, num_threads=None):
    """``detect`` for a ``.tflite`` written by kdet (TF OD API outputs: 0-based classes, made 1-based here)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # the interpreter inside TensorFlow
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    try:
        interpreter = Interpreter(model_path=path, num_threads=num_threads)
        runner = interpreter.get_signature_runner("serving_default")
        _, height, width, _ = runner.get_input_details()["images"]["shape"]
        if set(runner.get_output_details()) != {"boxes", "classes", "scores", "count"}:
            raise ValueError(f"outputs {sorted(runner.get_output_details())}")
    except Exception as err:  # noqa: BLE001 - a file that is not a kdet TFLite model
        raise ArtifactError(f"{path}: not a .tflite exported by kdet ({type(err).__name__}: {_first_line(err)})") \
            from None

    def detect(image):
        out = runner(images=_resized(image, height, width)[None])
        n = int(out["count"][0])
        return out["boxes"][0, :n], out["scores"][0, :n], out["classes"][0, :n].astype(int) + 1

    detect.owner = interpreter
    return detect


def onnx_detector(path, num_threads=None):
    """``detect`` for an ``.onnx`` written by kdet (the SavedModel's outputs: 1-based classes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        (input_,) = session.get_inputs()
        _, height, width, _ = input_.shape
        names = [o.name for o in session.get_outputs()]
        missing = {"detection_boxes", "detection_scores", "detection_classes", "num_detections"} - set(names)
        if missing or not isinstance(height, int):
            raise ValueError(f"outputs {names}, input {input_.shape}")
    except Exception as err:  # noqa: BLE001 - a file that is not a kdet ONNX model
        raise ArtifactError(f"{path}: not an .onnx exported by kdet ({type(err).__name__}: {_first_line(err)})") \
            from None

    def detect(image):
        out = dict(zip(names, session.run(None, {input_.name: _resized(image, height, width)[None]})))
        n = int(out["num_detections"][0])
        return (out["detection_boxes"][0, :n], out["detection_scores"][0, :n],
                out["detection_classes"][0, :n].astype(int))

    detect.owner = session
    return detect


def saved_model_detector(path):
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(path)
        serve = loaded.signatures["serving_default"]
        names = [n.decode() for n in loaded.class_names.numpy()]
    except Exception as err:  # not a SavedModel, or not one kdet exported
        raise ArtifactError(f"{path}: not a SavedModel exported by kdet ({type(err).__name__}: "
                            f"{_first_line(err)})") from err

    def detect(image):
        out = serve(images=tf.constant(image[None]))
        n = int(out["num_detections"][0])
        return (out["detection_boxes"][0, :n].numpy(), out["detection_scores"][0, :n].numpy(),
                out["detection_classes"][0, :n].numpy().astype(int))

    detect.owner = loaded  # serve holds its module only weakly: keep it alive
    return detect, names


def load_detector(path, classes=None, num_threads=None):
    """``(detect, names)`` for the artifact at ``path`` (see the module doc); ``classes``: names for a
    ``.keras`` model (else ``0..C-1``); ``num_threads``: the TFLite / ONNX runtime's threads."""
    kind = artifact_kind(path)
    if kind == "saved_model":
        return saved_model_detector(path)
    if kind == "tflite":
        return tflite_detector(path, num_threads), read_label_map(path)
    if kind == "onnx":
        return onnx_detector(path, num_threads), read_label_map(path)
    import tensorflow as tf

    from kdet.cli import ToolError, load_keras_model
    from kdet.defaults import NMS_DEFAULTS
    from kdet.export import DetectorModule

    model = load_keras_model(path)
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else classes
    names = names or [str(i) for i in range(model.num_classes)]
    if len(names) != model.num_classes:
        raise ToolError(f"--classes gives {len(names)} names for {path}, a model with {model.num_classes} classes")
    module = DetectorModule(model, names, NMS_DEFAULTS)

    def detect(image):
        out = module.serve(images=tf.constant(image[None]))
        n = int(out["num_detections"][0])
        return (out["detection_boxes"][0, :n].numpy(), out["detection_scores"][0, :n].numpy(),
                out["detection_classes"][0, :n].numpy().astype(int))

    detect.owner = module
    return detect, names
