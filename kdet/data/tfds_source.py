"""TensorFlow Datasets detection sets (``voc/2007``, ``voc/2012``, ``coco/2017``) as records.

Images are kept as their encoded JPEG bytes in ``record.image`` (read with
``tfds.decode.SkipDecoding``; decoded arrays are re-encoded at quality 95).
All of the split is held in memory: fine for VOC (~0.5 GB for 07 trainval),
not for COCO train2017 (~19 GB); use ``coco()`` on the json and image folder
there, or ``max_examples``.

Boxes: TFDS stores normalised ``(ymin, xmin, ymax, xmax)``. COCO's are exact
(``y / height``...). TFDS's VOC builder divides the XML's *1-based* corners by
the image size without the ``- 1`` shift, so for ``voc/*`` the pixel values are
rounded back to the XML integers and converted with ``voc_to_xyxy``.

Preparation errors (``download=True`` on a dataset not yet in ``data_dir``) say
which of two things failed: a Python module TFDS's builder needs is missing
(tensorflow-datasets 4.9.x imports ``importlib_resources`` in every
``download_and_prepare`` without declaring it, tensorflow/datasets#11212: kdet's
install brings it), or the download itself (requests' connection errors after
TFDS's retries, about 3 minutes offline). Only the second suggests preparing
the data on a machine with internet access.

Class names come from the TFDS feature info. When that info holds only
placeholders (``'0'``, ``'1'``, ... e.g. ``coco/2017`` without its generated
metadata) the known COCO names are used.
"""

import io

import numpy as np

from kdet.boxes import voc_to_xyxy
from kdet.data.base import DatasetError, Source
from kdet.data.records import Record


class TFDSSource(Source):
    """Records of a TFDS object-detection dataset.

    Args:
        name: TFDS name, e.g. ``"voc/2007"``, ``"coco/2017"``.
        split: TFDS split expression (``"train+validation"``, ``"test[:100]"``).
        data_dir: TFDS data folder (None: TFDS default, ``~/tensorflow_datasets``).
        download: let TFDS download and prepare the dataset when it is missing
            (TFDS's own default; pass False to fail fast when it is not prepared).
        max_examples: keep only the first ones (smoke tests).
        class_names: override the TFDS label names (same length).
        hint: a sentence appended to a load / preparation error (e.g. the local layout a recipe
            would also take), so that the one error line names every way the data can come.
    """

    def __init__(self, name, split, data_dir=None, download=True, max_examples=None, class_names=None, hint=None):
        super().__init__(class_names)
        self.hint = hint
        self.tfds_name = name
        self.split = split
        self.data_dir = data_dir
        self.download = download
        self.max_examples = max_examples
        self.name = f"tfds:{name}[{split}]"
        self.is_voc = name.split("/")[0].split(":")[0] == "voc"

    def _load(self):
        dataset, info = self._tfds_load()
        class_names = self._class_names or _label_names(info)
        records = []
        for index, example in enumerate(dataset):
            if self.max_examples is not None and index >= self.max_examples:
                break
            records.append(self._to_record(example, index))
        return records, class_names

    def _tfds_load(self):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise DatasetError(f"{self.name}: tensorflow_datasets is not installed") from None
        try:
            dataset, info = tfds.load(
                self.tfds_name, split=self.split, data_dir=self.data_dir, download=self.download,
                with_info=True, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
            )
        except Exception as err:  # TFDS raises many kinds; one clear message instead
            raise DatasetError(self._load_error(err)) from None
        return tfds.as_numpy(dataset), info

    def _load_error(self, err):
        """The one message for a failed ``tfds.load``: a missing module, a failed download, or else TFDS's own."""
        data_dir = self.data_dir or "~/tensorflow_datasets"
        hint = f" {self.hint}" if self.hint else ""
        module = _missing_module(err)
        if module is not None:
            package = module.split(".")[0]
            why = ("TFDS's dataset builder imports it without declaring it (tensorflow/datasets#11212), and "
                   "kdet's install brings it" if package == "importlib_resources"
                   else f"the builder of {self.tfds_name} imports it")
            return (f"{self.name}: TFDS cannot prepare the dataset in data_dir={data_dir}: the Python module "
                    f"{module!r} is not installed (pip install {package}); this is not a download problem: "
                    f"{why}.{hint}")
        failure = _download_failure(err)
        if failure is not None and self.download:
            return (f"{self.name}: cannot download the TFDS dataset into data_dir={data_dir}: "
                    f"{type(failure).__name__}: {_first_line(failure)}. If this machine is offline, prepare it on "
                    f"one with internet access (`tfds build {self.tfds_name} --data_dir DIR`), copy DIR here and "
                    f"pass data_dir=DIR (a recipe's data.root).{hint}")
        action = "download and prepare" if self.download else "load (download=False)"
        return (f"{self.name}: cannot {action} the TFDS dataset in data_dir={data_dir}: "
                f"{type(err).__name__}: {_first_line(err)}\n"
                f"If this machine is offline, prepare it on one with internet access "
                f"(`tfds build {self.tfds_name} --data_dir DIR`), copy DIR here and pass data_dir=DIR "
                f"(a recipe's data.root).{hint}")

    def _to_record(self, example, index):
        image_bytes, width, height = _encoded_image(example["image"], f"{self.name} example {index}")
        objects = example["objects"]
        yxyx = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
        pixels = yxyx[:, [1, 0, 3, 2]] * [width, height, width, height]
        boxes = voc_to_xyxy(np.round(pixels)) if self.is_voc else pixels
        n = len(boxes)
        labels = np.asarray(objects["label"]).reshape(-1)
        difficult = np.asarray(objects.get("is_difficult", np.zeros(n, bool)), bool).reshape(-1)
        iscrowd = np.asarray(objects.get("is_crowd", np.zeros(n, bool)), bool).reshape(-1)
        area = np.asarray(objects["area"], np.float32).reshape(-1) if "area" in objects else None
        lengths = {len(labels), len(difficult), len(iscrowd)} | ({len(area)} if area is not None else set())
        if lengths != {n}:
            raise DatasetError(f"{self.name} example {index}: object fields have different lengths")
        return Record(
            image_id=_image_id(example, index),
            image_path=None,
            width=width,
            height=height,
            boxes=boxes,
            classes=labels,
            difficult=difficult,
            iscrowd=iscrowd,
            area=area,
            image=image_bytes,
        )


def _encoded_image(image, where):
    """``(jpeg_bytes, width, height)`` from encoded bytes or a decoded array."""
    from PIL import Image

    try:
        if isinstance(image, (bytes, np.bytes_)):
            with Image.open(io.BytesIO(image)) as img:
                return bytes(image), img.size[0], img.size[1]
        array = np.asarray(image, np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        buffer = io.BytesIO()
        Image.fromarray(array).convert("RGB").save(buffer, format="JPEG", quality=95)
        return buffer.getvalue(), array.shape[1], array.shape[0]
    except (OSError, ValueError, TypeError) as err:
        raise DatasetError(f"{where}: cannot read the image ({err})") from None


def _image_id(example, index):
    """COCO's int ``image/id``, VOC's file stem, else the example index."""
    if "image/id" in example:
        return int(example["image/id"])
    if "image/filename" in example:
        name = example["image/filename"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return name.rsplit(".", 1)[0]
    return index


def _label_names(info):
    from kdet.data.coco import COCO_CLASSES

    names = list(info.features["objects"]["label"].names)
    if names and all(n.isdigit() for n in names):
        if len(names) == len(COCO_CLASSES):
            return list(COCO_CLASSES)
    return names


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _causes(err):
    """``err`` and the exceptions it was raised from or during, outermost first."""
    seen = []
    while err is not None and all(err is not e for e in seen):
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _missing_module(err):
    """The name of the module whose import failed anywhere in ``err``'s chain, else None."""
    for cause in _causes(err):
        if isinstance(cause, ModuleNotFoundError):
            return cause.name or _first_line(cause)
    return None


_NETWORK_MODULES = ("requests", "urllib3", "socket", "http.client", "ssl", "tensorflow_datasets.core.download")


def _download_failure(err):
    """The network / download error in ``err``'s chain (requests' ConnectionError, a timeout, a bad checksum)."""
    import socket

    for cause in _causes(err):
        module = type(cause).__module__ or ""
        if isinstance(cause, (ConnectionError, TimeoutError, socket.gaierror)) or module.startswith(_NETWORK_MODULES):
            return cause
    return None
