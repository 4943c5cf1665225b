"""SavedModel export: raw uint8 images in, TF Object Detection API outputs out.

The serving signature ``serving_default`` takes ``images``: uint8 ``[N, H, W, 3]``
of any size and returns ``detection_boxes`` (normalised ``ymin, xmin, ymax,
xmax``), ``detection_scores``, ``detection_classes`` (1-based, float32) and
``num_detections`` (float32), as the TF Object Detection API does. Resizing,
normalisation, decoding and NMS run inside, so the SavedModel serves with
``tf.saved_model.load`` alone, in a process that never imports kdet. The class
names travel with it: ``loaded.class_names`` (a string tensor, index k = class
k + 1) and the ``class_names`` signature.
"""

import json
import os

import keras
import tensorflow as tf

from kdet.defaults import NMS_DEFAULTS
from kdet.postprocess import decode_detections


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
