"""Where an exported detector's label map lies: the one naming rule the exporter (kdet.export) and the
runtime that reads it back (kdet.runtime) share. A leaf module: it imports nothing of kdet's."""

import os


def label_map_path(artifact):
    """The label map written beside ``artifact``: ``labelmap.txt`` in a SavedModel folder,
    ``NAME.labels.txt`` beside ``NAME.tflite`` / ``NAME.onnx``. Line k names class id k (0-based)."""
    if os.path.isdir(artifact) or not os.path.splitext(artifact)[1]:
        return os.path.join(artifact, "labelmap.txt")
    return os.path.splitext(artifact)[0] + ".labels.txt"
