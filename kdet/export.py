"""Export: SavedModel, TFLite (float32 / fp16 / int8) and ONNX, each with NMS inside.

SavedModel: raw uint8 images in, TF Object Detection API outputs out.

The serving signature ``serving_default`` takes ``images``: uint8 ``[N, H, W, 3]``
of any size and returns ``detection_boxes`` (normalised ``ymin, xmin, ymax,
xmax``), ``detection_scores``, ``detection_classes`` (1-based, float32) and
``num_detections`` (float32), as the TF Object Detection API does. Resizing,
normalisation, decoding and NMS run inside, so the SavedModel serves with
``tf.saved_model.load`` alone, in a process that never imports kdet. The class
names travel with it: ``loaded.class_names`` (a string tensor, index k = class
k + 1) and the ``class_names`` signature.

TFLite and ONNX (:func:`export_tflite`, :func:`export_onnx`, :func:`export`): uint8 images at the
model's size in; decoding and kdet's NMS inside the graph (TFLite's ``TFLite_Detection_PostProcess``
op, ONNX's ``NonMaxSuppression``), the label map written beside (:func:`label_map_path`).
"""

import json
import os

import keras
import numpy as np
import tensorflow as tf

from kdet.defaults import NMS_DEFAULTS
from kdet.postprocess import decode_detections
from kdet.label_map import label_map_path


class DetectorModule(tf.Module):
    def __init__(self, model, class_names, nms):
        super().__init__()
        self.model = model
        self.class_names = tf.Variable(list(class_names), trainable=False, dtype=tf.string)
        self._nms = dict(nms)
        self._score_activation = getattr(model, "score_activation", "softmax")
        self._height, self._width = _model_size(model)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(self, images):
        resized = tf.image.resize(tf.cast(images, tf.float32), (self._height, self._width))
        detections = decode_detections(self.model(resized, training=False), **self._nms,
                                       score_activation=self._score_activation)
        boxes = tf.gather(detections["boxes"], [1, 0, 3, 2], axis=-1)  # xyxy -> yxyx
        valid = tf.cast(detections["classes"] >= 0, tf.float32)
        return {
            "detection_boxes": boxes,
            "detection_scores": detections["scores"],
            "detection_classes": (tf.cast(detections["classes"], tf.float32) + 1.0) * valid,
            "num_detections": tf.cast(detections["num_detections"], tf.float32),
        }

    @tf.function(input_signature=[])
    def labels(self):
        return {"class_names": tf.identity(self.class_names)}


def _model_size(model):
    _, height, width, _ = model.input_shape
    if height is None or width is None:
        raise ValueError("export needs a model with a fixed input size")
    return int(height), int(width)


def export_saved_model(model, export_dir, class_names, **nms):
    """Write ``model`` as a SavedModel serving raw images; returns ``export_dir``.

    ``nms``: settings of `kdet.postprocess.decode_detections` baked into the SavedModel
    (``kdet.defaults.NMS_DEFAULTS`` where not given); ``kdet_export.json`` records them.
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(f"SavedModel export needs the TensorFlow backend (Keras runs {backend}): save the model "
                           "(model.save('m.keras')) and run KERAS_BACKEND=tensorflow python tools/export.py m.keras OUT "
                           "--classes ...")
    unknown = sorted(set(nms) - set(NMS_DEFAULTS))
    if unknown:
        raise ValueError(f"export_saved_model: unknown NMS settings {unknown} (known: {sorted(NMS_DEFAULTS)})")
    nms = {**NMS_DEFAULTS, **nms}
    module = DetectorModule(model, class_names, nms)
    tf.saved_model.save(module, export_dir,
                        signatures={"serving_default": module.serve, "class_names": module.labels})
    with open(os.path.join(export_dir, "kdet_export.json"), "w") as f:
        json.dump({"class_names": list(class_names), **nms,
                   "score_activation": module._score_activation}, f, indent=2)
    return export_dir


# ------------------------------------------------------------------ TFLite and ONNX
FORMATS = ("saved_model", "tflite", "onnx")
QUANTIZATIONS = {"saved_model": (None,), "tflite": (None, "fp16", "int8"), "onnx": (None,)}
SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx"}
#: Opset of the ONNX export (onnxruntime >= 1.17 runs it).
ONNX_OPSET = 17
_MIN_BOX_SIZE = 1e-6  # clipped boxes are re-encoded for TFLite's post-process op: log(size) needs size > 0


class ExportError(ValueError):
    """A model kdet cannot export to a format, or an op a converter cannot convert; the message is one line."""


def write_label_map(artifact, class_names):
    path = label_map_path(artifact)
    with open(path, "w") as f:
        f.write("".join(f"{name}\n" for name in class_names))
    return path


def _one_line(err, limit=300):
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


def _check_exportable(model, fmt, nms):
    """The parts of ``model`` the TFLite / ONNX graphs need; ExportError when it has none."""
    anchors = getattr(model, "anchors", None)
    num_classes = getattr(model, "num_classes", None)
    if anchors is None or num_classes is None:
        raise ExportError(f"{fmt} export: {type(model).__name__} is not a kdet SSD model (no anchors / num_classes); "
                          "export a model trained by kdet")
    try:
        height, width = _model_size(model)
    except ValueError as err:
        raise ExportError(f"{fmt} export: {err}") from None
    activation = getattr(model, "score_activation", "softmax")
    if activation not in ("softmax", "sigmoid"):
        raise ExportError(f"{fmt} export: score_activation {activation!r} is neither softmax nor sigmoid")
    if fmt == "onnx" and nms["class_agnostic"]:
        raise ExportError("onnx export: class_agnostic NMS is not exported to ONNX (its NonMaxSuppression is "
                          "per class); export with class_agnostic=False")
    if fmt == "tflite" and nms["class_agnostic"] and nms["per_class_top_k"]:
        raise ExportError("tflite export: class_agnostic NMS needs per_class_top_k=False")
    return np.asarray(anchors, np.float32), int(num_classes), activation, height, width


def _boxes_and_scores(model, images, anchors_xyxy, num_classes, activation, nms):
    """uint8 images -> kdet's clipped boxes ``[B, A, 4]`` (xyxy) and class scores ``[B, A, C]``, with the
    scores of (anchor, class) pairs outside ``pre_nms_top_k`` set to -1 (``decode_detections``' candidates)."""
    from kdet.matching import decode_boxes

    y_pred = tf.cast(model(tf.cast(images, tf.float32), training=False), tf.float32)
    offsets, logits = y_pred[..., :4], y_pred[..., 4:5 + num_classes]
    boxes = tf.clip_by_value(decode_boxes(offsets, tf.constant(anchors_xyxy)), 0.0, 1.0)
    if activation == "sigmoid":
        scores = tf.sigmoid(logits[..., 1:])
    else:
        scores = tf.nn.softmax(logits, axis=-1)[..., 1:]
    num_anchors = anchors_xyxy.shape[0]
    if nms["per_class_top_k"]:
        k = min(nms["pre_nms_top_k"], num_anchors)
        if k < num_anchors:
            kth = tf.math.top_k(tf.transpose(scores, (0, 2, 1)), k).values[..., -1]  # [B, C]
            scores = tf.where(scores >= kth[:, None, :], scores, -1.0)
    else:
        k = min(nms["pre_nms_top_k"], num_anchors * num_classes)
        if k < num_anchors * num_classes:
            kth = tf.math.top_k(tf.reshape(scores, (-1, num_anchors * num_classes)), k).values[:, -1]  # [B]
            scores = tf.where(scores >= kth[:, None, None], scores, -1.0)
    return boxes, scores


def _postprocess_signature(nms, num_classes):
    """``experimental_implements`` of TFLite's ``TFLite_Detection_PostProcess`` op (kdet's NMS settings;
    scales 1: the op gets boxes re-encoded without variances)."""
    threshold = float(np.nextafter(np.float32(nms["score_threshold"]), np.float32(2)))  # the op keeps >=, kdet >
    attrs = [("max_detections", "i", int(nms["max_detections"])), ("max_classes_per_detection", "i", 1),
             ("detections_per_class", "i", int(nms["max_detections"])),
             ("use_regular_nms", "b", "false" if nms["class_agnostic"] else "true"),
             ("nms_score_threshold", "f", f"{threshold:.9g}"),
             ("nms_iou_threshold", "f", f"{float(nms['iou_threshold']):.9g}"),
             ("num_classes", "i", int(num_classes))] + [(f"{k}_scale", "f", "1.0") for k in "yxhw"]
    return " ".join(['name: "TFLite_Detection_PostProcess"'] +
                    [f'attr {{ key: "{key}" value {{ {kind}: {value} }} }}' for key, kind, value in attrs])


def _tflite_serve_fn(model, nms):
    anchors, num_classes, activation, height, width = _check_exportable(model, "tflite", nms)
    a_c = (anchors[:, :2] + anchors[:, 2:]) / 2  # xy
    a_wh = anchors[:, 2:] - anchors[:, :2]
    anchors_yxhw = np.stack([a_c[:, 1], a_c[:, 0], a_wh[:, 1], a_wh[:, 0]], -1).astype(np.float32)

    @tf.function(experimental_implements=_postprocess_signature(nms, num_classes))
    def postprocess(box_encodings, class_predictions, anchors):  # replaced by the op when converted
        zero = tf.constant(0.0)
        return (tf.identity(zero, name="boxes"), tf.identity(zero, name="classes"),
                tf.identity(zero, name="scores"), tf.identity(zero, name="count"))

    def serve(images):
        boxes, scores = _boxes_and_scores(model, images, anchors, num_classes, activation, nms)
        # the op decodes centre-size offsets (ty, tx, th, tw) itself: hand it kdet's clipped boxes re-encoded
        centre = (boxes[..., :2] + boxes[..., 2:]) / 2
        size = tf.maximum(boxes[..., 2:] - boxes[..., :2], _MIN_BOX_SIZE)
        t_c = (centre - a_c) / a_wh
        t_s = tf.math.log(size / a_wh)
        encodings = tf.stack([t_c[..., 1], t_c[..., 0], t_s[..., 1], t_s[..., 0]], axis=-1)
        out = postprocess(encodings, scores, tf.constant(anchors_yxhw))
        return {"boxes": out[0], "classes": out[1], "scores": out[2], "count": out[3]}

    return serve, height, width


def _calibration(images, height, width):
    def dataset():
        for image in images:
            image = np.asarray(image)
            if image.shape != (height, width, 3):
                image = tf.cast(tf.round(tf.clip_by_value(tf.image.resize(tf.cast(image, tf.float32),
                                                                          (height, width)), 0, 255)), tf.uint8).numpy()
            yield [image[None].astype(np.uint8)]
    return dataset


def export_tflite(model, path, class_names, quantize=None, calibration_images=None, **nms):
    """Write ``model`` as a ``.tflite`` file with NMS inside; returns ``path``.

    Input ``images``: uint8 ``[1, H, W, 3]`` at the model's size. Outputs (signature ``serving_default``)
    as the TF OD API's TFLite models: ``boxes`` ``[1, K, 4]`` normalised ``ymin, xmin, ymax, xmax``,
    ``classes`` ``[1, K]`` (0-based, float32), ``scores`` ``[1, K]``, ``count`` ``[1]``; K = max_detections.
    NMS is the ``TFLite_Detection_PostProcess`` op of the standard interpreter (no Flex delegate):
    per-class ("regular") NMS, or its fast class-agnostic NMS when ``class_agnostic``.

    ``quantize``: None (float32), ``"fp16"`` (float16 weights) or ``"int8"`` (full-integer network, with
    ``calibration_images``: uint8 ``[H, W, 3]`` arrays, e.g. training images).
    """
    nms = _nms_settings(nms)
    if quantize not in QUANTIZATIONS["tflite"]:
        raise ExportError(f"tflite export: --quantize {quantize} is not one of fp16, int8")
    if quantize == "int8" and not calibration_images:
        raise ExportError("tflite export: int8 needs calibration images (--recipe, whose training images are used)")
    serve, height, width = _tflite_serve_fn(model, nms)
    import tempfile

    from keras.export import ExportArchive

    with tempfile.TemporaryDirectory() as tmp:
        try:  # tracing the model (a layer that fails) and converting (an op TFLite lacks): one line each
            archive = ExportArchive()
            archive.track(model)
            archive.add_endpoint("serving_default", serve,
                                 input_signature=[tf.TensorSpec([1, height, width, 3], tf.uint8, name="images")])
            archive.write_out(tmp, verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            if quantize == "fp16":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
                flatbuffer = converter.convert()
            elif quantize == "int8":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.representative_dataset = _calibration(calibration_images, height, width)
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                                       tf.lite.OpsSet.TFLITE_BUILTINS]
                flatbuffer = _selectively_quantized(converter, _calibration(calibration_images, height, width))
            else:
                flatbuffer = converter.convert()
        except ExportError:
            raise
        except Exception as err:  # noqa: BLE001 - ConverterError and friends: name the op, not the MLIR dump
            raise ExportError(f"tflite export: {_converter_failure(err)}") from None
    with open(path, "wb") as f:
        f.write(flatbuffer)
    write_label_map(path, class_names)
    return path


#: Ops int8 leaves in float (TFLite's selective quantization): VGG's conv4_3 L2 normalisation (SQUARE, SUM,
#: SQRT, DIV: in int8 the divisor can be its zero point - the interpreter stops with "data[i] != zero_point" -
#: and the sum of squares spans too wide a range) and the class scores (SOFTMAX / LOGISTIC: 1/256 steps
#: are coarse beside a 0.01 score threshold). On BCCD this took int8's AP drop from 0.099 to 0.026.
INT8_FLOAT_OPS = ("DIV", "SQUARE", "SUM", "SQRT", "SOFTMAX", "LOGISTIC")


def _selectively_quantized(converter, dataset):
    """Full-integer quantization except :data:`INT8_FLOAT_OPS` (TFLite's selective quantization)."""
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(INT8_FLOAT_OPS))
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=dataset,
                                                         debug_options=options)
    return debugger.get_nondebug_quantized_model()


def _converter_failure(err):
    """One line naming the op(s) a converter could not convert, else its first line."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # Keras bolds its messages for terminals
    ops = sorted(set(re.findall(r"'(tf\.\w+)' op", text)) | set(re.findall(r"\b(?:op|Op) type[: ]+'?(\w+)", text)))
    if ops:
        return f"cannot convert op {', '.join(ops)} ({type(err).__name__})"
    layers = sorted(set(re.findall(r"calling (?:layer|Layer) ['\"]?([\w.-]+)", text))  # Keras 2, Keras 3:
                    | set(re.findall(r"calling (\w+)\.call\(\)", text)))
    if layers:
        reason = [line.strip() for line in text.splitlines() if line.strip()
                  and not line.strip().startswith(("Exception encountered", "Arguments received", "•"))]
        return (f"layer {', '.join(layers)} fails while tracing ({type(err).__name__}: "
                f"{(reason or [type(err).__name__])[0][:200]})")
    return f"{type(err).__name__}: {_one_line(err)}"


def _onnx_serve_fn(model, nms):
    anchors, num_classes, activation, height, width = _check_exportable(model, "onnx", nms)
    max_det = int(nms["max_detections"])

    def serve(images):
        boxes, scores = _boxes_and_scores(model, images, anchors, num_classes, activation, nms)
        yxyx = tf.gather(boxes, [1, 0, 3, 2], axis=-1)
        nmsed = tf.image.combined_non_max_suppression(
            yxyx[:, :, None, :], scores, max_output_size_per_class=max_det, max_total_size=max_det,
            iou_threshold=float(nms["iou_threshold"]), score_threshold=float(nms["score_threshold"]),
            pad_per_class=False, clip_boxes=False)
        count = nmsed.valid_detections
        valid = tf.cast(tf.range(max_det)[None, :] < count[:, None], tf.float32)
        return {"detection_boxes": nmsed.nmsed_boxes * valid[..., None],
                "detection_scores": nmsed.nmsed_scores * valid,
                "detection_classes": (nmsed.nmsed_classes + 1.0) * valid,
                "num_detections": tf.cast(count, tf.float32)}

    return serve, height, width


def export_onnx(model, path, class_names, **nms):
    """Write ``model`` as an ``.onnx`` file with NMS inside (tf2onnx); returns ``path``.

    Input ``images``: uint8 ``[N, H, W, 3]`` at the model's size. Outputs as kdet's SavedModel:
    ``detection_boxes`` (normalised yxyx), ``detection_scores``, ``detection_classes`` (1-based, 0 on
    padding rows), ``num_detections``. NMS is ONNX's ``NonMaxSuppression`` (from
    ``tf.image.combined_non_max_suppression``), so onnxruntime alone runs the file.
    """
    nms = _nms_settings(nms)
    try:
        import tf2onnx
    except ImportError:
        raise ExportError("onnx export needs tf2onnx and onnx: pip install -e '.[export]'") from None
    import warnings

    try:  # tf2onnx 1.17 still uses np.object and friends under numpy 2; Keras 3 ships the fix
        from keras.src.export.tf2onnx_lib import patch_tf2onnx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            patch_tf2onnx()
    except Exception:  # noqa: BLE001 - an older Keras: tf2onnx may still work
        pass
    serve, height, width = _onnx_serve_fn(model, nms)
    function = tf.function(serve, input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8, name="images")])
    import logging

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    try:
        model_proto, _ = tf2onnx.convert.from_function(function, function.input_signature, opset=ONNX_OPSET)
    except Exception as err:  # noqa: BLE001 - converter failures: name the op, not the traceback
        raise ExportError(f"onnx export: {_converter_failure(err)}") from None
    unconverted = _unconverted_onnx_ops(model_proto)
    if unconverted:  # tf2onnx leaves TensorFlow ops it cannot convert in the graph, for onnxruntime to reject
        raise ExportError(f"onnx export: cannot convert op {', '.join(unconverted)} (no ONNX equivalent in tf2onnx "
                          f"{tf2onnx.__version__}, opset {ONNX_OPSET})")
    meta = model_proto.metadata_props.add()
    meta.key, meta.value = "class_names", json.dumps(list(class_names))
    with open(path, "wb") as f:
        f.write(model_proto.SerializeToString())
    write_label_map(path, class_names)
    return path


def _unconverted_onnx_ops(model_proto):
    """Op types of ``model_proto`` that ONNX's standard opsets do not define (TensorFlow ops left as they were)."""
    import onnx

    found = set()
    for node in model_proto.graph.node:
        domain = node.domain or ""
        if domain in ("", "ai.onnx", "ai.onnx.ml"):
            if not onnx.defs.has(node.op_type, domain):
                found.add(node.op_type)
        else:
            found.add(f"{domain}.{node.op_type}")
    return sorted(found)


def _nms_settings(nms):
    unknown = sorted(set(nms) - set(NMS_DEFAULTS))
    if unknown:
        raise ValueError(f"export: unknown NMS settings {unknown} (known: {sorted(NMS_DEFAULTS)})")
    return {**NMS_DEFAULTS, **nms}


def export(model, out, class_names, format="saved_model", quantize=None, calibration_images=None, **nms):
    """Export ``model`` to ``format`` (one of :data:`FORMATS`) at ``out``; the label map is written beside."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r} (one of {', '.join(FORMATS)})")
    if quantize not in QUANTIZATIONS[format]:
        raise ExportError(f"{format} export: --quantize {quantize} applies to tflite only")
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ExportError(f"{format} export needs the TensorFlow backend (Keras runs {backend}): run "
                          "KERAS_BACKEND=tensorflow python tools/export.py MODEL.keras OUT ...")
    if format == "saved_model":
        export_saved_model(model, out, class_names, **nms)
        write_label_map(out, class_names)
        return out
    if format == "tflite":
        return export_tflite(model, out, class_names, quantize, calibration_images, **nms)
    return export_onnx(model, out, class_names, **nms)
