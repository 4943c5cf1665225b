"""A folder of images with PASCAL VOC XMLs, no ``ImageSets`` (LabelImg, CVAT, Label Studio exports).

The XMLs lie beside the images (LabelImg's default) or in a sibling folder
(``images/`` + ``annotations/``, ``JPEGImages/`` + ``Annotations/``); an
image's XML has the image's name with ``.xml``. The images are the unit: an
image without an XML is a **background image** (LabelImg writes no XML for
an image without objects), kept, counted and printed; an XML without an image
is ignored, counted and printed. The XML parsing, box conversion and checks
are :mod:`kdet.data.voc`'s.
"""

import xml.etree.ElementTree as ET
from pathlib import Path

from kdet.data.base import DatasetError
from kdet.data.voc import VOCSource, VOCImage, parse_voc_xml
from kdet.data.yolo import image_files, image_size
from kdet.log import get_logger

logger = get_logger(__name__)


def xml_class_names(xml_paths):
    """The sorted set of object names in VOC XML files (unparsable files are left to the source)."""
    names = set()
    for path in xml_paths:
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError):
            continue
        names.update((obj.findtext("name") or "").strip() for obj in root.findall("object"))
    names.discard("")
    return sorted(names)


class VOCFolderSource(VOCSource):
    """Records of the images in ``image_dir`` with their VOC XMLs in ``xml_dir`` (default: beside them).

    Args:
        image_dir: folder of images (not searched recursively).
        xml_dir: folder of ``<image name>.xml`` files; None = ``image_dir``.
        class_names: class list; None collects the names in the XMLs, sorted.
        skip_invalid: as :class:`kdet.data.voc.VOCSource`.
    """

    def __init__(self, image_dir, xml_dir=None, class_names=None, skip_invalid=False):
        super().__init__(image_dir, split="all", class_names=class_names, skip_invalid=skip_invalid)
        self.image_dir = Path(image_dir)
        self.xml_dir = Path(xml_dir) if xml_dir is not None else self.image_dir
        self.name = str(self.image_dir) if self.xml_dir == self.image_dir else f"{self.image_dir} + {self.xml_dir}"
        self.background_images = 0

    def image_ids(self):
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image folder not found", reason="missing file")
        self._image_of = {}
        for path in image_files(self.image_dir, recursive=False):
            if path.stem in self._image_of:
                raise DatasetError(f"{path}: image id {path.stem!r} also names {self._image_of[path.stem]}; "
                                   "image file names (without extension) must be unique")
            self._image_of[path.stem] = path
        return list(self._image_of)

    def _load(self):
        self.background_images = 0
        records, class_names = super()._load()
        self._print_notes(len(records))
        return records, class_names

    def _parse_image(self, image_id):
        image_path = self._image_of[image_id]
        xml_path = self.xml_dir / f"{image_id}.xml"
        if not xml_path.is_file():
            self.background_images += 1
            width, height = image_size(image_path)
            return VOCImage(image_id, xml_path, image_path, width, height, [])
        return parse_voc_xml(xml_path, image_id, lambda *_: image_path)

    def _print_notes(self, num_images):
        if self.background_images:
            logger.info(f"{self.name}: {self.background_images} of {num_images} images have no XML: kept as background "
                        "images (LabelImg writes no XML for an image without objects)")
        orphans = [p for p in sorted(self.xml_dir.glob("*.xml")) if p.stem not in self._image_of]
        if orphans:
            logger.info(f"{self.name}: {len(orphans)} XML files have no image and are ignored (e.g. {orphans[0].name})")
