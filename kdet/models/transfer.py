"""Start a detector from an earlier kdet model (``model.init_from``), MMDetection's ``load_from``.

Every layer of the new model whose name and weight shapes match a layer of the checkpoint
takes the checkpoint's weights (BatchNorm statistics included); every other layer keeps
its fresh initialisation. Two rules on top of the shapes:

* class heads load only when the class counts are equal: with another class count their
  channels mean other things even where the shapes coincide (4 boxes x (1 + 2 classes) =
  6 boxes x (1 + 1 class));
* box heads load where a map has the same number of boxes per location; other anchor
  scales or image sizes keep the shapes, so those heads load and a note says the anchors
  differ (their offsets were learnt for other anchors: a starting point, not a fit).

`init_from_checkpoint` prints what was loaded and what was not (counts per part, names)
and returns the `TransferReport`. A checkpoint that does not load, or of which nothing
fits, is an `InitFromError` (one line naming the file).
"""

from dataclasses import dataclass, field

import numpy as np

from kdet.log import get_logger

logger = get_logger(__name__)

PARTS = ("backbone", "extras", "box heads", "class heads")


class InitFromError(ValueError):
    """A ``model.init_from`` checkpoint that is missing, damaged or fits nothing; one line."""


@dataclass
class TransferReport:
    source: str
    parts: dict                                           # part -> [loaded, total] layers with weights
    loaded: list = field(default_factory=list)            # layer names
    shape_mismatch: list = field(default_factory=list)    # (name, model shapes, checkpoint shapes)
    class_count_differs: list = field(default_factory=list)  # class heads skipped for the class count
    missing: list = field(default_factory=list)           # in the model, not in the checkpoint
    unused: list = field(default_factory=list)            # in the checkpoint, not in the model
    notes: list = field(default_factory=list)

    def lines(self):
        total = sum(t for _, t in self.parts.values())
        counts = ", ".join(f"{part} {n}/{t}" for part, (n, t) in self.parts.items() if t)
        lines = [f"model.init_from={self.source}: loaded {len(self.loaded)} of {total} layers with weights "
                 f"({counts})"]
        if self.class_count_differs:
            lines.append(f"  not loaded, other class count (start anew): {_names(self.class_count_differs)}")
        if self.shape_mismatch:
            described = ", ".join(f"{name} {mine} vs {theirs}" for name, mine, theirs in self.shape_mismatch)
            lines.append(f"  not loaded, shapes differ (start anew): {described}")
        if self.missing:
            lines.append(f"  not in the checkpoint (start anew): {_names(self.missing)}")
        if self.unused:
            lines.append(f"  in the checkpoint, not in the model (unused): {_names(self.unused)}")
        lines += [f"  note: {note}" for note in self.notes]
        return lines


def _names(names, limit=12):
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def part_of(model, name):
    """Which part of an SSD a layer belongs to: backbone, extras (incl. FPN), box heads or class heads."""
    if name.startswith("box_head_"):
        return "box heads"
    if name.startswith("class_head_"):
        return "class heads"
    backbone = {n for stage in getattr(model, "backbone_stages", []) for n in stage}
    backbone |= set(getattr(model, "backbone_layer_names", []))
    return "backbone" if name in backbone else "extras"


def _layers_with_weights(model):
    return {layer.name: layer for layer in model.layers if layer.weights}


def load_matching_weights(model, source, source_label="checkpoint"):
    """Copy ``source``'s weights into ``model`` wherever a layer's name and shapes match; a `TransferReport`."""
    mine, theirs = _layers_with_weights(model), _layers_with_weights(source)
    same_classes = getattr(model, "num_classes", None) == getattr(source, "num_classes", None)
    report = TransferReport(source=source_label, parts={part: [0, 0] for part in PARTS})
    for name, layer in mine.items():
        part = part_of(model, name)
        report.parts[part][1] += 1
        if name not in theirs:
            report.missing.append(name)
            continue
        if part == "class heads" and not same_classes:
            report.class_count_differs.append(name)
            continue
        my_shapes = [tuple(w.shape) for w in layer.weights]
        their_weights = theirs[name].get_weights()
        their_shapes = [tuple(w.shape) for w in their_weights]
        if my_shapes != their_shapes:
            report.shape_mismatch.append((name, *_differing(my_shapes, their_shapes)))
            continue
        layer.set_weights(their_weights)
        report.loaded.append(name)
        report.parts[part][0] += 1
    report.unused = [name for name in theirs if name not in mine]
    report.notes = _notes(model, source, report)
    return report


def _differing(mine, theirs):
    """The kernels' shapes when they differ (what tells layers apart), else the whole lists."""
    return (mine[0], theirs[0]) if mine[:1] != theirs[:1] else (mine, theirs)


def _notes(model, source, report):
    notes = []
    mine, theirs = getattr(model, "num_classes", None), getattr(source, "num_classes", None)
    if theirs is not None and mine != theirs:
        notes.append(f"the checkpoint has {theirs} classes, the model {mine}: the class heads start anew")
    a, b = getattr(model, "anchors", None), getattr(source, "anchors", None)
    if a is not None and b is not None and (a.shape != b.shape or not np.allclose(a, b, atol=1e-6)):
        notes.append(f"the anchors differ (checkpoint: {len(b)} at {getattr(source, 'image_size', '?')} px, "
                     f"model: {len(a)} at {getattr(model, 'image_size', '?')} px); box heads with the same boxes "
                     "per location were loaded as a starting point")
    loaded, total = report.parts["backbone"]
    if total and loaded < total:
        notes.append(f"only {loaded} of {total} backbone layers fit (checkpoint: "
                     f"{getattr(source, 'backbone', '?')} width {getattr(source, 'width_multiplier', '?')}; model: "
                     f"{getattr(model, 'backbone', '?')} width {getattr(model, 'width_multiplier', '?')})")
    return notes


def load_checkpoint_model(path):
    """The ``.keras`` model at ``path`` (not compiled); a missing or damaged file is an `InitFromError`."""
    import os

    from kdet.cli import ToolError, load_keras_model

    if not str(path).endswith(".keras") and os.path.isfile(path):
        raise InitFromError(f"{path}: model.init_from needs a kdet .keras model (best.keras / last.keras of a "
                            "work dir); for keras.applications weight files use model.backbone_weights")
    try:
        return load_keras_model(path, compile=False)
    except ToolError as err:
        raise InitFromError(f"model.init_from: {err}") from err


def init_from_checkpoint(model, path, verbose=True):
    """Load every matching layer of the kdet model at ``path`` into ``model``; prints and returns the report."""
    source = load_checkpoint_model(path)
    report = load_matching_weights(model, source, source_label=str(path))
    if not report.loaded:
        raise InitFromError(f"{path}: no layer of this checkpoint fits the model (checkpoint: "
                            f"{getattr(source, 'backbone', '?')} width {getattr(source, 'width_multiplier', '?')}; "
                            f"model: {getattr(model, 'backbone', '?')} width "
                            f"{getattr(model, 'width_multiplier', '?')}); model.init_from loads nothing")
    if verbose:
        logger.info("\n".join(report.lines()))
    return report
