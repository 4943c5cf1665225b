"""A seeded, stratified validation split for data that has none.

:func:`stratified_split` puts about ``val_fraction`` of the images into the
validation side so that every class with at least two images appears on both
sides. Greedy, rarest class first: each class gets ``round(val_fraction * n)``
of its ``n`` images into validation (at least 1, at most ``n - 1``), taking
images in a seeded random order and never moving an image whose move would
leave one of its classes without a training image; the remaining validation
places are filled from the same random order. A class with a single image stays
on the training side. Same records and seed, same split.
"""

import numpy as np

from kdet.data.base import DatasetError, Source
from kdet.log import get_logger

logger = get_logger(__name__)


def stratified_split(records, num_classes, val_fraction=0.2, seed=0):
    """``(train_indices, val_indices)``, each sorted, into ``records``."""
    n = len(records)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if n < 2:
        raise DatasetError(f"cannot split {n} image(s) into training and validation: need at least 2")
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    classes_of = [set(np.asarray(r.classes).tolist()) for r in records]
    images_of = [[i for i in range(n) if c in classes_of[i]] for c in range(num_classes)]
    order = np.random.default_rng(seed).permutation(n)
    rank = np.empty(n, int)
    rank[order] = np.arange(n)

    in_val = np.zeros(n, bool)
    val_count = np.zeros(num_classes, int)
    train_left = np.array([len(images) for images in images_of])

    def can_move(i):
        return not in_val[i] and all(train_left[c] >= 2 for c in classes_of[i])

    def move(i):
        in_val[i] = True
        for c in classes_of[i]:
            val_count[c] += 1
            train_left[c] -= 1

    for c in sorted(range(num_classes), key=lambda c: (len(images_of[c]), c)):  # rarest first
        count = len(images_of[c])
        if count < 2:
            continue
        target = min(count - 1, max(1, int(round(val_fraction * count))))
        for i in sorted(images_of[c], key=lambda i: rank[i]):
            if val_count[c] >= target:
                break
            if can_move(i):
                move(i)
    for i in order:
        if in_val.sum() >= n_val:
            break
        if can_move(i):
            move(i)
    return np.flatnonzero(~in_val).tolist(), np.flatnonzero(in_val).tolist()


def split_counts(records, num_classes):
    """``(images per class, objects per class)`` of ``records``."""
    images, objects = np.zeros(num_classes, int), np.zeros(num_classes, int)
    for r in records:
        classes = np.asarray(r.classes, int)
        objects += np.bincount(classes, minlength=num_classes)
        images[np.unique(classes)] += 1
    return images, objects


def format_split(train_records, val_records, class_names, title):
    """A table: per class, images and objects on each side."""
    k = len(class_names)
    (ti, to), (vi, vo) = split_counts(train_records, k), split_counts(val_records, k)
    width = max([len("class")] + [len(c) for c in class_names])
    lines = [title,
             f"  {'class':<{width}}  train images  train objects  val images  val objects",
             *(f"  {name:<{width}}  {ti[c]:>12}  {to[c]:>13}  {vi[c]:>10}  {vo[c]:>11}"
               for c, name in enumerate(class_names)),
             f"  {'all':<{width}}  {len(train_records):>12}  {to.sum():>13}  {len(val_records):>10}  {vo.sum():>11}"]
    one_sided = [name for c, name in enumerate(class_names) if (ti[c] + vi[c]) >= 2 and min(ti[c], vi[c]) == 0]
    single = [name for c, name in enumerate(class_names) if ti[c] + vi[c] == 1]
    if one_sided:
        lines.append(f"  could not put {one_sided} on both sides (their images also hold other rare classes)")
    if single:
        lines.append(f"  {single}: a single image, kept for training (not evaluated)")
    return "\n".join(lines)


class SeededSplit:
    """One source split once into a training and a validation side (see :func:`stratified_split`)."""

    def __init__(self, source, val_fraction=0.2, seed=0, min_val_images=None):
        self.source = source
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.min_val_images = int(min_val_images or 0)
        self._sides = None

    def side(self, name):
        """The records of ``"train"`` or ``"val"``; the split is computed and printed on first use.

        When ``val_fraction`` would give fewer than ``min_val_images`` images, there is no split:
        every image trains and the validation side is empty.
        """
        if self._sides is None:
            records = self.source.records()
            class_names = self.source.class_names
            wanted = int(round(self.val_fraction * len(records)))
            if wanted < self.min_val_images:
                self._sides = {"train": list(records), "val": []}
                logger.info(f"{self.source.name}: no validation split in the data, and val_fraction "
                            f"{self.val_fraction:g} of {len(records)} images would be {wanted} < data.min_val_images={self.min_val_images}: "
                            "training on all of them (no val_AP, no early stopping, the last weights are kept)")
                return self._sides[name]
            train, val = stratified_split(records, len(class_names), self.val_fraction, self.seed)
            self._sides = {"train": [records[i] for i in train], "val": [records[i] for i in val]}
            logger.info(format_split(self._sides["train"], self._sides["val"], class_names,
                                     f"{self.source.name}: no validation split in the data; seeded split "
                                     f"(val_fraction {self.val_fraction:g}, seed {self.seed}), stratified by class:"))
        return self._sides[name]

    def part(self, name):
        return SplitPart(self, name)


class SplitPart(Source):
    """One side of a :class:`SeededSplit`, as a source."""

    def __init__(self, split, side):
        super().__init__()
        self.split = split
        self.side = side
        self.name = f"{split.source.name} [{side}, seeded split]"

    def _load(self):
        records = self.split.side(self.side)
        self.skipped = self.split.source.skipped if self.side == "train" else self.skipped
        return records, self.split.source.class_names

    def _warn_skipped(self):
        pass  # the whole source has warned for itself
