"""Dataset audit: counts, box statistics and annotation defects, for a person to read.

Two ways in:

* :func:`audit_voc_dir` reads a PASCAL VOC directory **leniently** (its own XML
  parser, no validation), so it sees the raw annotations that the VOC loader
  would reject: degenerate boxes, boxes outside the image, unknown classes.
* :func:`audit_records` audits ``Record`` lists from any source (these have
  already passed their loader's checks, so some findings cannot occur).

What is reported (see :class:`AuditReport`): images and objects per class and
split; the class imbalance ratio (max / min objects per class, over classes
that have objects); box width, height, sqrt(area) and aspect ratio (w / h)
percentiles per class and COCO size buckets (area in original pixels:
small < 32^2, medium < 96^2, large otherwise); and these findings:

* ``degenerate_boxes``: width or height <= ``min_size`` pixels (default 1). In
  VOC's 1-based inclusive numbers that is ``xmax <= xmin`` or ``ymax <= ymin``:
  a zero or negative extent as written in the file (kdet's continuous
  convention gives such a one-pixel "box" a width of 1).
* ``out_of_image_boxes``: a corner beyond the image by more than
  ``out_tolerance`` pixels (default 0, as the VOC loader; VOC's 1-based
  ``xmin = 0`` is 1 px outside).
* ``duplicate_boxes``: pairs of boxes of the same class in one image with
  IoU > ``duplicate_iou`` (default 0.9); IoU 1 means an exact duplicate.
* ``images_without_objects``, ``unreadable_images`` (missing file, or PIL
  cannot open/``verify()`` it), ``size_mismatches`` (annotated size differs
  from the image file's), ``unknown_classes`` (names not in the class list),
  ``bad_annotations`` (XML that cannot be parsed or lacks fields).

Statistics use every object of a known class; size statistics skip degenerate
boxes. Global numbers are over the union of the splits' images (VOC's
``trainval`` overlaps ``train`` and ``val``). Plots are written by
:meth:`AuditReport.save` (matplotlib, Agg backend).
"""

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from kdet.boxes import iou_matrix_np, voc_to_xyxy

COCO_SMALL, COCO_MEDIUM = 32 ** 2, 96 ** 2
PERCENTILES = (0, 5, 25, 50, 75, 95, 100)
FINDINGS = ("degenerate_boxes", "out_of_image_boxes", "duplicate_boxes", "images_without_objects",
            "unreadable_images", "size_mismatches", "unknown_classes", "bad_annotations")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")


@dataclass
class AuditImage:
    """One image's raw annotations: pixel ``xyxy`` boxes and class *names*."""

    image_id: str
    image_path: Optional[str]
    annotation: str                       # the file to name in messages
    width: int
    height: int
    boxes: np.ndarray
    names: list
    difficult: np.ndarray = None
    record: Any = None                    # the Record, for in-memory images

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, np.float64).reshape(-1, 4)
        if self.difficult is None:
            self.difficult = np.zeros(len(self.boxes), bool)


@dataclass
class AuditReport:
    """Audit result: ``summary`` and ``findings`` are JSON-ready dicts."""

    source: str
    class_names: list
    summary: dict
    findings: dict
    images: list = field(default_factory=list, repr=False)  # unique AuditImages, for plots

    @property
    def num_findings(self):
        return sum(len(v) for v in self.findings.values())

    def to_dict(self):
        return dict(source=self.source, class_names=list(self.class_names),
                    summary=self.summary, findings=self.findings)

    def to_text(self, max_listed=20):
        return format_report(self, max_listed=max_listed)

    def save(self, out_dir, plots=True, crops_per_class=8, seed=0):
        """Write ``audit.txt``, ``audit.json`` and (with ``plots``) the PNGs; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = dict(text=out / "audit.txt", json=out / "audit.json")
        paths["text"].write_text(self.to_text(max_listed=None) + "\n")
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1))
        if plots:
            paths["histograms"] = plot_box_histograms(self.images, self.class_names,
                                                      out / "box_histograms.png")
            paths["contact_sheet"] = contact_sheet(self.images, self.class_names,
                                                   out / "contact_sheet.png",
                                                   per_class=crops_per_class, seed=seed)
        return paths


# ------------------------------------------------------------------ entry points
def audit_voc_dir(root, splits=None, class_names=None, *, check_images=True, **options):
    """Audit a VOC directory's raw annotations (no validation on reading).

    ``splits``: names of ``ImageSets/Main/{split}.txt`` (``"trainval+test"``
    joins sets), or a dict ``{label: split}``; ``None`` takes every split file
    there (without per-class files such as ``cat_train.txt``), or all
    ``Annotations/*.xml`` as split ``"all"`` when there are none.
    ``class_names``: ``None`` collects the names found, sorted.
    """
    root = Path(root)
    if not (root / "Annotations").is_dir():
        raise FileNotFoundError(f"{root}: not a VOC directory (no Annotations/ folder)")
    split_ids = _voc_split_ids(root, splits)
    images, bad = _read_voc_ids(root, {i for ids in split_ids.values() for i in ids})
    if class_names is None:
        class_names = sorted({n for img in images.values() for n in img.names})
    by_split = {s: [images[i] for i in ids if i in images] for s, ids in split_ids.items()}
    return audit_images(by_split, class_names, source=str(root), bad_annotations=bad,
                        check_images=check_images, **options)


def audit_records(records, class_names, *, source="records", check_images=True, **options):
    """Audit ``Record`` lists: ``records`` is a list or a dict ``{split: list}``."""
    by_split = records if isinstance(records, dict) else {"all": records}
    converted = {split: [_from_record(r, class_names) for r in recs] for split, recs in by_split.items()}
    return audit_images(converted, class_names, source=source, check_images=check_images, **options)


def audit_source(source, split=None, **options):
    """Audit one data source object (``.records()``, ``.class_names``); see :func:`audit_sources`."""
    return audit_sources({split or getattr(source, "split", None) or "all": source}, **options)


def audit_sources(sources, class_names=None, **options):
    """Audit data sources ``{split_name: source}`` sharing one class list.

    VOC sources (``root`` and ``split`` attributes and an ``Annotations``
    folder), also inside a ``concat``, are read from their raw XML, so that the
    boxes their loader would reject or skip still show up; other sources are
    audited through their (validated) ``.records()``.
    """
    sources = {k: v for k, v in sources.items() if v is not None}
    if not sources:
        raise ValueError("no data sources to audit")
    leaves = [leaf for s in sources.values() for leaf in _leaf_sources(s)]
    if class_names is None:   # a given list; never a VOC loader's (it validates)
        class_names = next((leaf._class_names for leaf in leaves if getattr(leaf, "_class_names", None)), None)
    if class_names is None and not all(_is_voc_source(leaf) for leaf in leaves):
        class_names = next(leaf for leaf in leaves if not _is_voc_source(leaf)).class_names
    by_split, bad = {}, []
    for name, source in sources.items():
        by_split[name] = []
        for leaf in _leaf_sources(source):
            if _is_voc_source(leaf):
                images, errors = _read_voc_images(Path(leaf.root), getattr(leaf, "splits", None) or leaf.split)
                by_split[name] += images
                bad += errors
            else:
                by_split[name] += [_from_record(r, class_names) for r in leaf.records()]
    if class_names is None:
        class_names = sorted({n for images in by_split.values() for img in images for n in img.names})
    label = ", ".join(f"{k}={getattr(s, 'name', None) or repr(s)}" for k, s in sources.items())
    return audit_images(by_split, class_names, source=label, bad_annotations=bad, **options)


def _leaf_sources(source):
    children = getattr(source, "sources", None)
    if children:
        return [leaf for child in children for leaf in _leaf_sources(child)]
    return [source]


def load_recipe(path, overrides=()):
    """The ``recipe`` dict of a Python recipe file (``kdet.config.load_recipe``)."""
    from kdet.config import load_recipe as load

    return load(path, overrides)


def recipe_sources(recipe, splits=("train", "val", "test")):
    """The data sources of a recipe's ``data`` section, ``{split: source}``.

    A source given as a callable of the data root (e.g. ``partial(voc, ...)``)
    is called with ``data["root"]`` (``kdet.config.resolve_source``).
    """
    from kdet.config import resolve_source

    data = recipe.get("data", {})
    sources = {}
    for split in splits:
        source = resolve_source(data.get(split), data.get("root"), data)
        if source is not None:
            sources[split] = source
    return sources


# ------------------------------------------------------------------ VOC reading
def read_voc_annotation(root, image_id):
    """One VOC XML as an :class:`AuditImage`, without validating the boxes."""
    xml_path = Path(root) / "Annotations" / f"{image_id}.xml"
    try:
        tree = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as err:
        raise ValueError(f"cannot parse XML: {err}") from err
    names, boxes, difficult = [], [], []
    for i, obj in enumerate(tree.findall("object")):
        try:
            name = obj.findtext("name").strip()
            box = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError) as err:
            raise ValueError(f"object {i}: missing or non-numeric name/bndbox ({err})") from err
        names.append(name)
        boxes.append(box)
        difficult.append(obj.findtext("difficult", "0").strip() == "1")
    width = _int_or_zero(tree.findtext("size/width"))
    height = _int_or_zero(tree.findtext("size/height"))
    image_path = _voc_image_path(Path(root), image_id, tree.findtext("filename"))
    return AuditImage(image_id=image_id, image_path=str(image_path), annotation=str(xml_path),
                      width=width, height=height, boxes=voc_to_xyxy(boxes) if boxes else np.zeros((0, 4)),
                      names=names, difficult=np.asarray(difficult, bool))


def _read_voc_ids(root, image_ids):
    """``({image_id: AuditImage}, [bad annotation findings])``."""
    images, bad = {}, []
    for image_id in sorted(image_ids):
        try:
            images[image_id] = read_voc_annotation(root, image_id)
        except ValueError as err:
            bad.append(dict(file=str(root / "Annotations" / f"{image_id}.xml"), error=str(err)))
    return images, bad


def _read_voc_images(root, split):
    """The raw images of one VOC split (``"a+b"`` or a list joins sets), in split order."""
    ids = _voc_split_ids(root, {"split": split})["split"]
    images, bad = _read_voc_ids(root, ids)
    return [images[i] for i in ids if i in images], bad


def _voc_split_ids(root, splits):
    main = root / "ImageSets" / "Main"
    if splits is None:
        files = sorted(main.glob("*.txt")) if main.is_dir() else []
        splits = [f.stem for f in files if "_" not in f.stem]
        if not splits:
            return {"all": sorted(p.stem for p in (root / "Annotations").glob("*.xml"))}
    if isinstance(splits, str):
        splits = [splits]
    labelled = splits if isinstance(splits, dict) else {s: s for s in splits}
    split_ids = {}
    for label, split in labelled.items():
        ids = []
        for name in split.split("+") if isinstance(split, str) else split:
            path = main / f"{name.strip()}.txt"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: split file not found")
            ids += [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        split_ids[label] = list(dict.fromkeys(ids))
    return split_ids


def _voc_image_path(root, image_id, filename):
    folder = root / "JPEGImages"
    candidates = [folder / f"{image_id}.jpg"]
    if filename:
        filename = filename.strip()
        candidates.append(folder / filename)
        candidates += [folder / (filename + ext) for ext in IMAGE_EXTENSIONS]
    candidates += [folder / (image_id + ext) for ext in IMAGE_EXTENSIONS]
    return next((p for p in candidates if p.is_file()), candidates[0])


def _int_or_zero(text):
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return 0


def _is_voc_source(source):
    root = getattr(source, "root", None)
    return (root is not None and getattr(source, "split", None) is not None
            and (Path(root) / "Annotations").is_dir())


def _from_record(record, class_names):
    names = []
    for c in np.asarray(record.classes).tolist():
        names.append(class_names[c] if 0 <= c < len(class_names) else f"<class id {c}>")
    return AuditImage(image_id=str(record.image_id), image_path=record.image_path,
                      annotation=record.image_path or f"record {record.image_id!r}",
                      width=int(record.width), height=int(record.height), boxes=record.boxes,
                      names=names, difficult=np.asarray(record.ignore, bool), record=record)


# ------------------------------------------------------------------ the audit
def audit_images(images_by_split, class_names, *, source="", check_images=True, min_size=1.0,
                 out_tolerance=0.0, duplicate_iou=0.9, bad_annotations=()):
    """Audit ``{split: [AuditImage]}``; the core of every entry point."""
    class_names = list(class_names)
    unique = {}
    for images in images_by_split.values():
        for img in images:
            unique.setdefault((img.annotation, img.image_id), img)
    images = sorted(unique.values(), key=lambda img: str(img.image_id))
    findings = {name: [] for name in FINDINGS}
    findings["bad_annotations"] = list(bad_annotations)
    for img in images:
        if check_images:
            _check_image_file(img, findings)
        _check_boxes(img, class_names, findings, min_size, out_tolerance, duplicate_iou)
    splits = dict(images_by_split)
    if len(splits) > 1 or "all" not in splits:
        splits["all"] = images
    summary = dict(
        splits={name: _split_counts(imgs, class_names) for name, imgs in splits.items()},
        imbalance=_imbalance(_split_counts(images, class_names)["objects"]),
        box_sizes=_box_size_stats(images, class_names, min_size),
        finding_counts={name: len(v) for name, v in findings.items()},
        unknown_class_counts=_count_names(f["class"] for f in findings["unknown_classes"]),
        settings=dict(min_size=min_size, out_tolerance=out_tolerance, duplicate_iou=duplicate_iou,
                      check_images=check_images),
    )
    return AuditReport(source=str(source), class_names=class_names, summary=summary,
                       findings=findings, images=images)


def _check_image_file(img, findings):
    from PIL import Image

    where = dict(file=img.image_path or img.annotation, image_id=img.image_id)
    try:
        if img.record is not None and img.record.image is not None:
            size = _in_memory_size(img.record.image)
        else:
            if not img.image_path or not os.path.isfile(img.image_path):
                raise OSError("missing file")
            with Image.open(img.image_path) as pil:
                size = _shown_size(pil)  # after EXIF orientation, as kdet reads images
                pil.verify()
    except Exception as err:  # PIL raises many types for broken files
        findings["unreadable_images"].append(dict(where, error=str(err) or type(err).__name__))
        return
    if img.width <= 0 or img.height <= 0:
        img.width, img.height = size        # annotation lacks a size: take the file's
    elif tuple(size) != (img.width, img.height):
        findings["size_mismatches"].append(dict(where, annotation=img.annotation,
                                                annotated=[img.width, img.height], actual=list(size)))


def _in_memory_size(image):
    if isinstance(image, np.ndarray):
        return image.shape[1], image.shape[0]
    import io
    from PIL import Image

    with Image.open(io.BytesIO(image)) as pil:
        size = _shown_size(pil)
        pil.verify()
    return size


def _shown_size(pil):
    from kdet.data.image_check import exif_orientation, swaps_axes

    return pil.size[::-1] if swaps_axes(exif_orientation(pil)) else pil.size


def _check_boxes(img, class_names, findings, min_size, out_tolerance, duplicate_iou):
    where = dict(file=img.annotation, image_id=img.image_id)
    if len(img.boxes) == 0:
        findings["images_without_objects"].append(where)
        return
    known = set(class_names)
    w = img.boxes[:, 2] - img.boxes[:, 0]
    h = img.boxes[:, 3] - img.boxes[:, 1]
    for i, (box, name) in enumerate(zip(img.boxes, img.names)):
        obj = dict(where, index=i, **{"class": name}, box=[round(float(v), 2) for v in box])
        if name not in known:
            findings["unknown_classes"].append(obj)
        if w[i] <= min_size or h[i] <= min_size:
            findings["degenerate_boxes"].append(dict(obj, width=float(w[i]), height=float(h[i])))
        if img.width > 0 and img.height > 0:
            beyond = max(-box[0], -box[1], box[2] - img.width, box[3] - img.height)
            if beyond > out_tolerance:
                findings["out_of_image_boxes"].append(
                    dict(obj, image_size=[img.width, img.height], beyond_px=float(beyond)))
    findings["duplicate_boxes"] += _duplicates(img, where, duplicate_iou)


def _duplicates(img, where, threshold):
    pairs = []
    names = np.asarray(img.names, dtype=object)
    iou = iou_matrix_np(img.boxes, img.boxes)
    same_class = names[:, None] == names[None, :]
    for i, j in zip(*np.nonzero(np.triu((iou > threshold) & same_class, k=1))):
        pairs.append(dict(where, **{"class": img.names[i]}, pair=[int(i), int(j)],
                          iou=round(float(iou[i, j]), 4),
                          boxes=[[round(float(v), 2) for v in img.boxes[k]] for k in (i, j)]))
    return pairs


# ------------------------------------------------------------------ statistics
def _split_counts(images, class_names):
    objects = {n: 0 for n in class_names}
    images_with = {n: 0 for n in class_names}
    for img in images:
        for name in set(img.names):
            if name in images_with:
                images_with[name] += 1
        for name in img.names:
            if name in objects:
                objects[name] += 1
    return dict(images=len(images), images_without_objects=sum(1 for i in images if not i.names),
                objects=objects, images_with_class=images_with, total_objects=sum(objects.values()))


def _imbalance(objects):
    present = {n: c for n, c in objects.items() if c > 0}
    if not present:
        return dict(ratio=None, most=None, least=None, empty_classes=sorted(objects))
    most = max(present, key=present.get)
    least = min(present, key=present.get)
    return dict(ratio=round(present[most] / present[least], 3), most=most, least=least,
                empty_classes=[n for n, c in objects.items() if c == 0])


def _class_boxes(images, class_names, min_size):
    """``{class: [N, 4]}`` non-degenerate boxes (pixels) with their image index."""
    out = {n: [] for n in class_names}
    for k, img in enumerate(images):
        for box, name in zip(img.boxes, img.names):
            if name in out and min(box[2] - box[0], box[3] - box[1]) > min_size:
                out[name].append((k, box))
    return out


def _box_size_stats(images, class_names, min_size):
    stats = {}
    for name, items in _class_boxes(images, class_names, min_size).items():
        boxes = np.array([b for _, b in items], np.float64).reshape(-1, 4)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        area = w * h
        stats[name] = dict(
            count=len(boxes),
            small=int(np.sum(area < COCO_SMALL)),
            medium=int(np.sum((area >= COCO_SMALL) & (area < COCO_MEDIUM))),
            large=int(np.sum(area >= COCO_MEDIUM)),
            width=_percentiles(w), height=_percentiles(h), sqrt_area=_percentiles(np.sqrt(area)),
            aspect=_percentiles(w / np.maximum(h, 1e-9)))
    return stats


def _percentiles(values):
    if len(values) == 0:
        return None
    return {f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


def _count_names(names):
    counts = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return counts


# ------------------------------------------------------------------ text report
def format_report(report, max_listed=20):
    """The report as text; ``max_listed`` findings per kind (None: all)."""
    names = report.class_names
    s = report.summary
    lines = [f"kdet dataset audit: {report.source}", f"classes ({len(names)}): {', '.join(names)}", ""]
    width = max([len(n) for n in names] + [9])
    header = f"{'split':<12}{'images':>8}{'empty':>7}" + "".join(f"{n:>{width + 2}}" for n in names) + f"{'total':>9}"
    lines += ["objects per class (images containing the class in brackets)", header]
    for split, c in s["splits"].items():
        cells = "".join(f"{'%d (%d)' % (c['objects'][n], c['images_with_class'][n]):>{width + 2}}"
                        for n in names)
        label = split if split != "all" else "all (union)"
        lines.append(f"{label:<12}{c['images']:>8}{c['images_without_objects']:>7}{cells}{c['total_objects']:>9}")
    imb = s["imbalance"]
    if imb["ratio"] is not None:
        lines.append(f"class imbalance (max/min objects): {imb['ratio']:.2f}  ({imb['most']} vs {imb['least']})")
    if imb["empty_classes"]:
        lines.append(f"classes without objects: {', '.join(imb['empty_classes'])}")
    lines += ["", "box sizes in original pixels (percentiles p5 / p50 / p95); "
              "COCO buckets by area: small < 32^2 <= medium < 96^2 <= large",
              f"{'class':<{width}}{'small':>7}{'medium':>8}{'large':>7}   {'width':<20}{'height':<20}"
              f"{'sqrt(area)':<20}aspect w/h"]
    for name, st in s["box_sizes"].items():
        if not st["count"]:
            lines.append(f"{name:<{width}}  (no boxes)")
            continue
        spread = lambda d: f"{d['p5']:.0f} / {d['p50']:.0f} / {d['p95']:.0f}"
        aspect = st["aspect"]
        lines.append(f"{name:<{width}}{st['small']:>7}{st['medium']:>8}{st['large']:>7}   "
                     f"{spread(st['width']):<20}{spread(st['height']):<20}{spread(st['sqrt_area']):<20}"
                     f"{aspect['p5']:.2f} / {aspect['p50']:.2f} / {aspect['p95']:.2f}")
    lines += ["", f"findings ({report.num_findings}):"]
    for kind in FINDINGS:
        items = report.findings[kind]
        lines.append(f"  {kind.replace('_', ' ')}: {len(items)}")
        for item in items[:max_listed] if max_listed is not None else items:
            lines.append(f"    {_describe(kind, item)}")
        if max_listed is not None and len(items) > max_listed:
            lines.append(f"    ... {len(items) - max_listed} more (see audit.json)")
    return "\n".join(lines)


def _describe(kind, item):
    where = item.get("file", "")
    if kind == "degenerate_boxes":
        return (f"{where}: object {item['index']} {item['class']} box {item['box']} "
                f"(width {item['width']:g} px, height {item['height']:g} px)")
    if kind == "out_of_image_boxes":
        return (f"{where}: object {item['index']} {item['class']} box {item['box']} beyond the "
                f"{item['image_size'][0]}x{item['image_size'][1]} image by {item['beyond_px']:g} px")
    if kind == "duplicate_boxes":
        return f"{where}: {item['class']} objects {item['pair']} IoU {item['iou']:.3f} boxes {item['boxes']}"
    if kind == "unknown_classes":
        return f"{where}: object {item['index']} has class {item['class']!r} not in the class list"
    if kind == "size_mismatches":
        return f"{where}: annotated size {item['annotated']} but the image is {item['actual']}"
    if kind in ("unreadable_images", "bad_annotations"):
        return f"{where}: {item['error']}"
    return where


# ------------------------------------------------------------------ plots
def agg_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_box_histograms(images, class_names, path, min_size=1.0):
    """Histograms of box width, height, sqrt(area) and aspect ratio per class (PNG)."""
    plt = agg_pyplot()
    per_class = _class_boxes(images, class_names, min_size)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("width (px)", lambda b: b[:, 2] - b[:, 0], False),
              ("height (px)", lambda b: b[:, 3] - b[:, 1], False),
              ("sqrt(area) (px)", lambda b: np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])), False),
              ("aspect ratio w/h (log scale)", lambda b: (b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1]), True)]
    for ax, (title, measure, log) in zip(axes.ravel(), panels):
        for name in class_names:
            boxes = np.array([b for _, b in per_class[name]], np.float64).reshape(-1, 4)
            if len(boxes):
                values = measure(boxes)
                bins = np.geomspace(values.min(), values.max() + 1e-9, 30) if log else 30
                ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{name} ({len(boxes)})")
        if title.startswith("sqrt"):
            for edge in (32, 96):
                ax.axvline(edge, color="gray", linestyle="--", linewidth=0.8)
        if log:
            ax.set_xscale("log")
        ax.set_title(title)
        ax.set_ylabel("boxes")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def contact_sheet(images, class_names, path, per_class=8, seed=0, thumb=96, min_size=1.0):
    """A grid of object crops, one row per class, for checking labels by eye (PNG).

    Crops (with a 10% margin) are drawn at random (seeded) among each class's
    non-degenerate boxes; images that cannot be read are skipped.
    """
    plt = agg_pyplot()
    rng = np.random.default_rng(seed)
    boxes_by_class = _class_boxes(images, class_names, min_size)
    rows = max(len(class_names), 1)
    fig, axes = plt.subplots(rows, per_class, figsize=(per_class * 1.3, rows * 1.45), squeeze=False)
    cache = {}
    for r, name in enumerate(class_names):
        items = boxes_by_class[name]
        order = rng.permutation(len(items))
        crops = []
        for idx in order:
            if len(crops) == per_class:
                break
            k, box = items[idx]
            pixels = _image_pixels(images[k], cache)
            if pixels is not None:
                crops.append((images[k].image_id, _crop(pixels, box)))
        for c in range(per_class):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(crops):
                ax.imshow(crops[c][1])
                ax.set_title(str(crops[c][0])[-16:], fontsize=5)
            else:
                ax.axis("off")
        axes[r, 0].axis("on")
        axes[r, 0].set_ylabel(f"{name}\n({len(items)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def _image_pixels(img, cache):
    key = (img.annotation, img.image_id)
    if key not in cache:
        from kdet.data.records import Record, load_image

        record = img.record or Record(image_id=img.image_id, image_path=img.image_path,
                                      width=img.width, height=img.height)
        try:
            cache[key] = load_image(record)
        except ValueError:
            cache[key] = None
    return cache[key]


def _crop(pixels, box, margin=0.1):
    h, w = pixels.shape[:2]
    mx, my = margin * (box[2] - box[0]), margin * (box[3] - box[1])
    x1, y1 = int(max(0, np.floor(box[0] - mx))), int(max(0, np.floor(box[1] - my)))
    x2, y2 = int(min(w, np.ceil(box[2] + mx))), int(min(h, np.ceil(box[3] + my)))
    if x2 <= x1 or y2 <= y1:
        return np.zeros((2, 2, 3), np.uint8)
    return pixels[y1:y2, x1:x2]
