"""The base types every data source builds on: ``Source``, ``DatasetError`` (kdet.errors), ``concat``'s ``ConcatSource``.

A source is an object with ``.class_names`` (list of str), ``.records()``
(a cached list of :class:`kdet.data.records.Record`), ``len()`` and a
``.name`` for messages. Recipes build them with the factories in
:mod:`kdet.data.sources`; the per-format modules (``voc.py``, ``coco.py``, ...)
import this module only, so nothing imports in a circle.

Every source validates its annotations when it loads (never mid-epoch) and
raises :class:`DatasetError` naming the file and the problem. Sources that
take ``skip_invalid=True`` drop bad boxes/images instead, count them in
``source.skipped`` and warn once.

Zero-size boxes are the one exception by default: a few of them in an otherwise
good export (a labelling tool's stray click; BCCD has 2 of 4,888) are dropped,
counted and named in one warning; when they are more than
``ISOLATED_DEGENERATE_SHARE`` of a split's boxes they are systematic (a wrong
box format, say) and loading stops, naming the first one and the way out.
"""

import warnings
from collections import Counter

import numpy as np

from kdet.errors import DatasetError  # defined in the leaf module kdet.errors, importable from here too

ISOLATED_DEGENERATE_SHARE = 0.01  # zero-size boxes up to 1% of a split's boxes are slips, dropped with a warning


class Source:
    """Base class: lazy, cached loading of records plus skip bookkeeping.

    Subclasses set ``self.name`` and implement ``_load() -> (records, class_names)``.
    """

    name = "source"
    # Load-time image check (kdet.data.image_check): "quick" (header, EXIF, end of file),
    # "full" (decode every image) or "off". Set it on a source before its records are read.
    check_images = "quick"

    def __init__(self, class_names=None):
        self._class_names = list(class_names) if class_names is not None else None
        self._records = None
        self.skipped = {"boxes": Counter(), "images": Counter()}
        self.dropped_degenerate = []  # messages of the zero-size boxes dropped without skip_invalid

    @property
    def class_names(self):
        if self._class_names is None:
            self.records()  # sources that infer their class list do it while loading
        return self._class_names

    def records(self):
        """All records (loaded and validated on first call, then cached)."""
        if self._records is None:
            records, class_names = self._load()
            self._class_names = list(class_names)
            self._records = self._checked_images(records)
            self._check_dropped_degenerate()
            self._warn_skipped()
        return self._records

    def _load(self):
        raise NotImplementedError

    def __len__(self):
        return len(self.records())

    def __iter__(self):
        return iter(self.records())

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"

    # --------------------------------------------------------- invalid input
    def _checked_images(self, records):
        """``records`` whose images pass :func:`kdet.data.image_check.check_record_image` (others raise or are skipped)."""
        from kdet.data.image_check import check_record_image

        mode = self.check_images if getattr(self, "check_files", True) else "off"
        if mode == "off":
            return records
        kept = []
        for record in records:
            if record.orientation is not None:  # the subclass checked it already (VOC: before its boxes)
                kept.append(record)
                continue
            try:
                check_record_image(record, mode, annotation=self._annotation_of(record))
            except DatasetError as err:
                if not getattr(self, "skip_invalid", False):
                    raise
                self._skip_image(err.reason)
                continue
            kept.append(record)
        return kept

    def _annotation_of(self, record):
        """Where ``record``'s annotation comes from, for messages (subclasses name the file)."""
        return f"the annotation in {self.name}"

    def _bad_box(self, err):
        """A box the checks refused (``err``): skipped with ``skip_invalid``, dropped when zero-size, else raised."""
        if getattr(self, "skip_invalid", False):
            self._skip_box(err.reason)
        elif err.reason == "degenerate":
            self.dropped_degenerate.append(str(err))
        else:
            raise err

    def _check_dropped_degenerate(self):
        """Zero-size boxes dropped by default: a counted warning when isolated, an error when systematic."""
        dropped = self.dropped_degenerate
        if not dropped:
            return
        total = len(dropped) + sum(len(r.boxes) for r in self._records)
        share = len(dropped) / total
        more = f" and {len(dropped) - 1} more" if len(dropped) > 1 else ""
        if share > ISOLATED_DEGENERATE_SHARE:
            raise DatasetError(f"{dropped[0]}{more}: {len(dropped)} of {total} boxes ({share:.1%}) have zero or "
                               "negative size, too many to be stray clicks: check the box format of the export, "
                               "or drop every bad box with --set data.skip_invalid=True", reason="degenerate")
        warnings.warn(f"dropped {len(dropped)} zero-size box{'es' if len(dropped) > 1 else ''} of {total} in "
                      f"{self.name} (first: {dropped[0]}); --set data.skip_invalid=True drops every invalid box",
                      stacklevel=3)

    def _skip_box(self, reason):
        self.skipped["boxes"][reason] += 1

    def _skip_image(self, reason):
        self.skipped["images"][reason] += 1

    def _warn_skipped(self):
        message = skipped_message(self.skipped, self.name)
        if message:
            warnings.warn(message, stacklevel=3)


def skipped_message(skipped, name):
    """``"skipped 3 boxes (2 degenerate, 1 out of image) and 1 image (missing file) in <name>"``.

    Reasons are counted when there are several kinds, else just named.
    """
    parts = []
    for kind, singular in (("boxes", "box"), ("images", "image")):
        counts = skipped.get(kind, {})
        total = sum(counts.values())
        if total:
            noun = singular if total == 1 else kind
            reasons = sorted(reason for reason, n in counts.items() if n)
            detail = ", ".join(f"{counts[r]} {r}" for r in reasons) if len(reasons) > 1 else reasons[0]
            parts.append(f"{total} {noun} ({detail})")
    return f"skipped {' and '.join(parts)} in {name}" if parts else ""


def check_box(box, width, height, tolerance=0.0):
    """The problem with a pixel ``xyxy`` box, or None when it is fine.

    ``"degenerate"``: zero or negative width/height; ``"out of image"``: a
    corner outside ``[0, width] x [0, height]`` by more than ``tolerance``.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not np.all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
        return "degenerate"
    if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
        return "out of image"
    return None


# ----------------------------------------------------------------- concat
class ConcatSource(Source):
    """Several sources with the same class list, one after the other (VOC07+12)."""

    check_images = "off"  # each part checked its own images

    def __init__(self, *sources):
        if not sources:
            raise ValueError("concat() needs at least one source")
        super().__init__()
        self.sources = list(sources)
        self.name = " + ".join(s.name for s in self.sources)

    def _load(self):
        class_names = list(self.sources[0].class_names)
        for source in self.sources[1:]:
            if list(source.class_names) != class_names:
                raise DatasetError(
                    f"concat: class lists differ: {self.sources[0].name} has {class_names}, "
                    f"{source.name} has {list(source.class_names)}; pass the same class_names to both"
                )
        records, seen = [], {}
        for source in self.sources:
            for record in source.records():
                if record.image_id in seen:
                    raise DatasetError(
                        f"concat: image id {record.image_id!r} is in both {seen[record.image_id]} "
                        f"and {source.name}; image ids must be unique"
                    )
                seen[record.image_id] = source.name
                records.append(record)
            for kind in ("boxes", "images"):
                self.skipped[kind].update(source.skipped[kind])
        return records, class_names

    def _warn_skipped(self):
        pass  # each part has warned for itself
