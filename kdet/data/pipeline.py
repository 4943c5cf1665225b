"""tf.data input pipeline: records -> batches of ``(images, targets)``.

Output (docs/CONVENTIONS.md): images float32 ``[B, H, W, 3]`` RGB 0..255 and
targets float32 ``[B, max_boxes, 6]`` = normalised ``xyxy`` w.r.t. the output
image, class id, ignore flag (difficult | iscrowd); padding rows have boxes 0,
class -1, ignore 0.

Per element: read + decode (in the graph with ``tf.io`` when every record is a
file, else in Python), then one ``tf.numpy_function`` that augments (see
:mod:`kdet.data.augment`), resizes and pads. The Python part is kept thin:
albumentations' heavy work runs in OpenCV, which releases the GIL, so the
parallel map scales with cores. With a ``seed`` the output is deterministic:
each element's randomness comes from ``(seed, pass key, record index)``, where
the pass key is a seeded random number drawn anew each time the dataset is
iterated (so every epoch differs, reproducibly).
"""

import threading
import warnings

import cv2
import numpy as np
import tensorflow as tf

from kdet.data.augment import DEFAULT_MIN_VISIBILITY, Augmenter, _size_hw
from kdet.data.records import load_image

AUTOTUNE = tf.data.AUTOTUNE


def make_dataset(records, image_size, batch_size, augment=None, training=True, max_boxes=100, shuffle=True,
                 seed=None, num_parallel_calls=AUTOTUNE, cache_images=False, with_meta=False,
                 min_visibility=DEFAULT_MIN_VISIBILITY, cv2_threads=0, decode="auto"):
    """A batched ``tf.data.Dataset`` of ``(images, targets)`` (plus ``meta`` when ``with_meta``).

    ``records``: a list of :class:`~kdet.data.records.Record` or a data source.
    ``image_size``: int or ``(height, width)`` of the output images.
    ``augment``: list of augmentation entries (or an ``Augmenter``), used only
    when ``training``; every image is finally resized to ``image_size``.
    ``training=False`` (evaluation): no augmentation, no shuffle, keeps the last
    partial batch. ``training=True`` drops it so batch shapes are static.
    ``meta`` is a dict of ``[B]`` tensors: ``index`` (into ``records``),
    ``image_id`` (string), ``width``/``height`` of the original image.
    ``cache_images`` keeps decoded originals in memory (Python side) after first use.
    ``decode``: ``"graph"`` (``tf.io``, only for file records), ``"python"``
    (OpenCV inside the numpy step) or ``"auto"`` (graph when every record is a
    file and images are not cached).
    ``cv2_threads``: passed to ``cv2.setNumThreads`` (process-wide; 0 = OpenCV
    single-threaded, as tf.data already runs elements in parallel); None leaves it.
    """
    records = _as_records(records)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if cv2_threads is not None:
        cv2.setNumThreads(cv2_threads)
    size = _size_hw(image_size)
    if training and augment:
        augmenter = augment if isinstance(augment, Augmenter) else Augmenter(
            augment, image_size=size, min_visibility=min_visibility)
    else:
        augmenter = None
    _warn_too_many_boxes(records, max_boxes)
    seed_base = int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])
    sampler = _Sampler(records, augmenter, size, max_boxes, seed_base, cache_images)
    all_files = all(r.image is None and r.image_path for r in records)
    if decode not in ("auto", "graph", "python"):
        raise ValueError(f"decode must be 'auto', 'graph' or 'python', got {decode!r}")
    if decode == "graph" and (cache_images or not all_files):
        raise ValueError("decode='graph' needs image files for every record and cache_images=False")
    in_graph = decode == "graph" or (decode == "auto" and all_files and not cache_images)

    dataset = _element_indices(len(records), training, shuffle, seed, seed_base)
    paths = tf.constant([r.image_path or "" for r in records])
    image_ids = tf.constant([str(r.image_id) for r in records])
    height, width = size

    def load(key, index):
        if in_graph:
            encoded = tf.io.read_file(tf.gather(paths, index))
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        else:
            image = tf.zeros([0, 0, 3], tf.uint8)  # read in Python
        image, targets, original_hw = tf.numpy_function(
            sampler, [image, key, index], [tf.uint8, tf.float32, tf.int32], stateful=False)
        image.set_shape([height, width, 3])
        targets.set_shape([max_boxes, 6])
        if not with_meta:
            return image, targets
        original_hw.set_shape([2])
        meta = dict(index=tf.cast(index, tf.int32), image_id=tf.gather(image_ids, index),
                    height=original_hw[0], width=original_hw[1])
        return image, targets, meta

    deterministic = True if (seed is not None or not training) else None
    dataset = dataset.map(load, num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    dataset = dataset.batch(batch_size, drop_remainder=training)
    dataset = dataset.map(lambda image, *rest: (tf.cast(image, tf.float32), *rest))
    return dataset.prefetch(AUTOTUNE)


def make_eval_dataset(records, image_size, batch_size, max_boxes=100, num_parallel_calls=AUTOTUNE,
                      cache_images=False):
    """Evaluation batches ``(images, targets, meta)``: resize only, in order, all images kept."""
    return make_dataset(records, image_size, batch_size, augment=None, training=False, max_boxes=max_boxes,
                        shuffle=False, num_parallel_calls=num_parallel_calls, cache_images=cache_images,
                        with_meta=True)


# ------------------------------------------------------------------ internals
def _as_records(records):
    records = list(records)
    if not records:
        raise ValueError("make_dataset: no records (empty data source?)")
    return records


def _warn_too_many_boxes(records, max_boxes):
    over = [r for r in records if len(r) > max_boxes]
    if over:
        warnings.warn(
            f"{len(over)} of {len(records)} images have more than max_boxes={max_boxes} boxes "
            f"(most: {max(len(r) for r in over)} in image {over[0].image_id!r}); "
            f"only the first {max_boxes} of each are used as targets", stacklevel=3)


def _element_indices(count, training, shuffle, seed, seed_base):
    """``(pass_key, index)`` pairs: one pass over the records, shuffled anew each pass."""
    if not training:
        return tf.data.Dataset.range(count).map(lambda i: (tf.constant(0, tf.int64), i))
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)

    def one_pass(key):
        order = tf.range(count, dtype=tf.int64)
        if shuffle:
            pair = tf.stack([tf.constant(seed_base, tf.int64), key])
            order = tf.random.experimental.stateless_shuffle(order, seed=pair)
        return tf.data.Dataset.from_tensor_slices(order).map(lambda i: (key, i))

    return keys.flat_map(one_pass)


class _Sampler:
    """The Python step of one element: (decoded image, pass key, index) -> (image, targets, original hw)."""

    def __init__(self, records, augmenter, size, max_boxes, seed_base, cache_images):
        self.records = records
        self.augmenter = augmenter
        self.size = size
        self.max_boxes = max_boxes
        self.seed_base = seed_base
        self.cache = {} if cache_images else None
        self.truncated = 0  # images whose boxes did not fit in max_boxes (counted at run time)
        self._lock = threading.Lock()

    def __call__(self, image, key, index):
        index = int(index)
        rng = np.random.default_rng([self.seed_base, int(key) & (2**63 - 1), index])
        if image.size == 0:
            image = self.read(index)
        original_hw = np.array(image.shape[:2], np.int32)
        record = self.records[index]
        sample = (image, record.boxes, record.classes, record.ignore)
        if self.augmenter is not None:
            sample = self._augment(sample, rng)
        image, boxes = sample[0], _normalize(sample[1], sample[0].shape)
        if image.shape[:2] != self.size:
            image = cv2.resize(image, self.size[::-1], interpolation=cv2.INTER_LINEAR)
        return image, self._targets(boxes, sample[2], sample[3], record), original_hw

    def _augment(self, sample, rng):
        mosaic = self.augmenter.mosaic
        if mosaic is not None and rng.random() < mosaic.p:
            others = rng.integers(0, len(self.records), 3)
            samples = [sample] + [self._sample(int(j)) for j in others]
            sample = mosaic.combine(samples, rng, min_visibility=self.augmenter.min_visibility)
        return self.augmenter(*sample, seed=int(rng.integers(0, 2**63 - 1)))

    def _sample(self, index):
        r = self.records[index]
        return self.read(index), r.boxes, r.classes, r.ignore

    def read(self, index):
        """The record's image, uint8 HxWx3 RGB (OpenCV decode releases the GIL)."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        record = self.records[index]
        if record.image is None and record.image_path:
            image = cv2.imread(record.image_path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            if image is None:
                raise ValueError(f"cannot read image {record.image_path!r} (missing or not an image)")
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        else:
            image = load_image(record)
        if self.cache is not None:
            self.cache[index] = image
        return image

    def _targets(self, boxes, classes, ignore, record):
        targets = np.zeros((self.max_boxes, 6), np.float32)
        targets[:, 4] = -1
        count = len(boxes)
        if count > self.max_boxes:
            with self._lock:
                self.truncated += 1
                first = self.truncated == 1
            if first and len(record) <= self.max_boxes:  # too many only after augmentation (mosaic)
                warnings.warn(f"an augmented image has {count} boxes > max_boxes={self.max_boxes}; "
                              "keeping the first max_boxes (further cases are counted, not reported)")
            count = self.max_boxes
        targets[:count, :4] = boxes[:count]
        targets[:count, 4] = classes[:count]
        targets[:count, 5] = ignore[:count]
        return targets


def _normalize(boxes, shape):
    """Pixel boxes -> normalised, clipped to the image."""
    height, width = shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) / np.array([width, height, width, height], np.float32)
    return np.clip(boxes, 0.0, 1.0)
