"""tf.data input pipeline: records -> batches of ``(images, targets)``.

Output (docs/CONVENTIONS.md): images uint8 ``[B, H, W, 3]`` RGB (the model casts
them to float on its device: a quarter of the bytes to move, no cast here) and
targets float32 ``[B, max_boxes, 6]`` = normalised ``xyxy`` w.r.t. the output
image, class id, ignore flag (difficult | iscrowd); padding rows have boxes 0,
class -1, ignore 0.

Per element: read + decode, augment (see :mod:`kdet.data.augment`), resize and
pad, in one of three ways:

* in-thread, per batch (``workers=0``, ``decode="python"``, the default): one
  ``tf.numpy_function`` per batch on tf.data's threads runs the Python step
  (:class:`kdet.data._workers.Sampler`: OpenCV decode, augmentation, padding)
  for each of its elements into one array, so tf.data adds no per-element cost.
  Its Python parts hold the GIL, which limits scaling past two cores.
* in-thread, per element (``decode="graph"``): decode in the graph with
  ``tf.io``, then one ``tf.numpy_function`` per element.
* worker processes (``workers=N``, the default when training with augmentation
  on 4 or more CPUs): the same Python step runs in a shared pool of
  TensorFlow-free processes; batches come back in order through shared memory.

With a ``seed`` the output is deterministic and the same either way, whatever
the number of threads or workers: each element's randomness comes from
``(seed, pass key, record index)``, where the pass key is a seeded random
number drawn anew each time the dataset is iterated (so every epoch differs,
reproducibly), and the pass order is a graph-side shuffle by ``(seed, key)``.
(JPEG files decoded by ``tf.io`` may differ from OpenCV's decode by a few
levels, so ``decode="graph"`` matches the workers only for lossless files.)
"""

import collections
import itertools
import os
import threading
import warnings

import cv2
import numpy as np
import tensorflow as tf

from kdet.data import _workers
from kdet.data._workers import Sampler  # the Python step of one element; the workers run it too
from kdet.data.augment import DEFAULT_MIN_VISIBILITY, Augmenter, size_hw

AUTOTUNE = tf.data.AUTOTUNE


def make_dataset(records, image_size, batch_size: int, augment=None, training: bool = True, max_boxes: int = 100,
                 shuffle: bool = True,
                 seed=None, num_parallel_calls=AUTOTUNE, cache_images=False, with_meta=False,
                 min_visibility=DEFAULT_MIN_VISIBILITY, cv2_threads=0, decode="auto", workers=None,
                 worker_chunksize=8, epoch=None, mosaic_off_from=None, skip_batches=None):
    """A batched ``tf.data.Dataset`` of ``(images, targets)`` (plus ``meta`` when ``with_meta``).

    Args:
        ``records``: a list of :class:`~kdet.data.records.Record` or a data source.
        ``image_size``: int or ``(height, width)`` of the output images.
        ``augment``: list of augmentation entries (or an ``Augmenter``), used only
        when ``training``; every image is finally resized to ``image_size``. A list of
        keras-cv layers (or a ``KerasCVAugmenter``) runs in the tf.data graph instead, one
        element at a time after an OpenCV decode (``kdet.data.kerascv_augment``; ``workers=0``).
        ``training=False`` (evaluation): no augmentation, no shuffle, keeps the last
        partial batch. ``training=True`` drops it so batch shapes are static.
        ``meta`` is a dict of ``[B]`` tensors: ``index`` (into ``records``),
        ``image_id`` (string), ``width``/``height`` of the original image.
        ``cache_images`` keeps decoded originals in memory (Python side) after first use.
        ``decode``: ``"python"`` (OpenCV inside the per-batch numpy step; ``"auto"``,
        the default, is this) or ``"graph"`` (``tf.io`` then a numpy step per
        element; only for file records, measured slower).
        ``cv2_threads``: passed to ``cv2.setNumThreads`` (process-wide; 0 = OpenCV
        single-threaded, as tf.data already runs elements in parallel); None leaves it.
        ``workers``: worker processes for the Python step (decode + augmentation),
        which otherwise runs on tf.data threads and, holding the GIL for its
        Python parts, scales poorly with cores. ``None`` (auto): ``min(CPUs, 4)``
        when training with augmentation on 4 or more usable CPUs (the process's
        affinity set) and ``decode`` is not ``"graph"``, else 0; ``0``: in-thread.
        Workers decode with OpenCV (as ``decode="python"``) and give the same
        elements as the in-thread path for the same seed, whatever their number.
        They are shared by every dataset with the same worker count (see
        ``kdet.data._workers``; :func:`close_worker_pools` stops them early).
        ``num_parallel_calls`` does not apply to them; a worker gets up to
        ``worker_chunksize`` elements (of one batch) at a time; ``cache_images``
        then caches in each worker (memory times ``workers``).
        ``epoch``: a ``tf.Variable`` (int64) holding the epoch about to start (the engine's
        ``PassEpoch`` callback sets it): each training pass's order and augmentation then come
        from ``(seed, epoch)`` instead of from how often the dataset has been iterated, so a
        run resumed at epoch ``k`` sees exactly the passes of a run without a break (Keras
        itself iterates once to build the model). Needs a ``seed``.
        ``mosaic_off_from``: a ``tf.Variable`` (int64), the first epoch whose pass has no mosaic
        (``data.close_mosaic``; read with ``epoch`` when each pass starts, so it may change during
        training and a resumed run switches at the same epoch). Needs ``epoch``.
        ``skip_batches``: a ``tf.Variable`` (int64), read when each training pass starts: the pass
        leaves out its first that many batches (their indices, before anything is decoded), the rest
        unchanged (each element's randomness comes from ``(seed, pass key, index)``, not its
        position). A run resumed mid-epoch sets it for its first pass (kdet/training/preemption.py).

    Returns:
        a ``tf.data.Dataset`` of ``(images uint8 [B, H, W, 3], targets float32 [B, max_boxes, 6])``
        (plus ``meta``), docs/CONVENTIONS.md "Tensors between stages".

    Example:
        >>> import numpy as np
        >>> from kdet.data.records import Record
        >>> records = [Record(i, None, 80, 40, boxes=[[10, 10, 30, 20]], classes=[0],
        ...                   image=np.zeros((40, 80, 3), np.uint8)) for i in range(3)]
        >>> ds = make_dataset(records, image_size=32, batch_size=2, training=False, max_boxes=4, with_meta=True)
        >>> images, targets, meta = next(iter(ds))
        >>> images.shape, images.dtype.name, targets.shape
        (TensorShape([2, 32, 32, 3]), 'uint8', TensorShape([2, 4, 6]))
        >>> targets[0, 0].numpy().tolist(), meta["width"].numpy().tolist()
        ([0.125, 0.25, 0.375, 0.5, 0.0, 0.0], [80, 80])
    """
    records = _as_records(records)
    if epoch is not None and seed is None:
        raise ValueError("make_dataset(epoch=...) needs a seed: the passes are drawn from (seed, epoch)")
    if skip_batches is not None and not training:
        raise ValueError("make_dataset(skip_batches=...) is for training passes")
    if mosaic_off_from is not None and epoch is None:
        raise ValueError("make_dataset(mosaic_off_from=...) needs the epoch variable (epoch=...)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if cv2_threads is not None:
        cv2.setNumThreads(cv2_threads)
    size = size_hw(image_size)
    graph_augmenter = _kerascv_augmenter(augment) if training and augment else None
    if graph_augmenter is not None:
        augmenter = None
    elif training and augment:
        augmenter = augment if isinstance(augment, Augmenter) else Augmenter(
            augment, image_size=size, min_visibility=min_visibility)
    else:
        augmenter = None
    _warn_too_many_boxes(records, max_boxes)
    seed_base = int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])
    sampler = Sampler(records, augmenter, size, max_boxes, seed_base, cache_images)
    all_files = all(r.image is None and r.image_path for r in records)
    if decode not in ("auto", "graph", "python"):
        raise ValueError(f"decode must be 'auto', 'graph' or 'python', got {decode!r}")
    if decode == "graph" and (cache_images or not all_files):
        raise ValueError("decode='graph' needs image files for every record and cache_images=False")
    if graph_augmenter is not None:
        if workers or decode == "graph":
            raise ValueError("keras-cv augmentation runs in the tf.data graph after an OpenCV decode: "
                             "it needs workers=0 (or None) and decode='auto' or 'python'")
        indices = _element_indices(len(records), training, shuffle, seed, seed_base, epoch,
                                   skip=_skip(skip_batches, batch_size))
        return _kerascv_batches(indices, sampler, graph_augmenter, records, batch_size, with_meta, num_parallel_calls,
                                True if seed is not None else None)
    if workers is None:
        workers = _auto_workers(training, augmenter, decode)
    if workers < 0 or worker_chunksize < 1:
        raise ValueError(f"workers must be >= 0 and worker_chunksize >= 1, got {workers}, {worker_chunksize}")
    if workers and decode == "graph":
        raise ValueError("decode='graph' decodes on tf.data threads; worker processes need workers=0")
    in_graph = not workers and decode == "graph"
    image_ids = tf.constant([str(r.image_id) for r in records])

    def with_meta_of(image, targets, original_hw, index):  # one element or a batch
        if not with_meta:
            return image, targets
        meta = dict(index=tf.cast(index, tf.int32), image_id=tf.gather(image_ids, index),
                    height=original_hw[..., 0], width=original_hw[..., 1])
        return image, targets, meta

    if workers:
        dataset = _process_batches(sampler, len(records), batch_size, training, shuffle, seed, cv2_threads, workers,
                                   worker_chunksize, epoch, mosaic_off_from, _skip(skip_batches, batch_size))
        dataset = dataset.map(with_meta_of)
        return dataset.prefetch(AUTOTUNE)

    indices = _element_indices(len(records), training, shuffle, seed, seed_base, epoch, mosaic_off_from,
                               _skip(skip_batches, batch_size))
    deterministic = True if (seed is not None or not training) else None
    if in_graph:
        dataset = _decoded_in_graph(indices, sampler, records, with_meta_of, num_parallel_calls, deterministic)
        return dataset.batch(batch_size, drop_remainder=training).prefetch(AUTOTUNE)
    dataset = indices.batch(batch_size, drop_remainder=training)
    return _python_batches(dataset, sampler, with_meta_of, batch_size if training else None,
                           num_parallel_calls, deterministic).prefetch(AUTOTUNE)


def _python_batches(index_batches, sampler, with_meta_of, rows, num_parallel_calls, deterministic):
    """One numpy step per batch of ``(keys, indices)``: no per-element tf.data / numpy_function overhead."""
    many = _reporting_input_errors(sampler.many, lambda keys, indices: _empty_outputs(sampler, len(indices)))

    def load_batch(keys, indices):
        images, targets, original_hw, error = tf.numpy_function(
            many, [keys, indices], [tf.uint8, tf.float32, tf.int32, tf.string], stateful=False)
        images, targets, original_hw = _raise_input_error(error, images, targets, original_hw)
        _set_static_shapes(sampler, [rows], images, targets, original_hw)
        return with_meta_of(images, targets, original_hw, indices)

    return index_batches.map(load_batch, num_parallel_calls=num_parallel_calls, deterministic=deterministic)


def _kerascv_augmenter(augment):
    """A :class:`~kdet.data.kerascv_augment.KerasCVAugmenter` when ``augment`` holds keras-cv layers, else None."""
    from kdet.data.kerascv_augment import KerasCVAugmenter, uses_kerascv

    if isinstance(augment, KerasCVAugmenter):
        return augment
    if isinstance(augment, Augmenter) or not uses_kerascv(augment):
        return None
    return KerasCVAugmenter(augment)


def _kerascv_batches(indices, sampler, augmenter, records, batch_size, with_meta, num_parallel_calls, deterministic):
    """Elements read by OpenCV (one numpy step each), then keras-cv layers, resize and targets in the graph.

    Each element's randomness comes from ``(seed, pass key, index)``, as on the Python path.
    """
    from kdet.data.kerascv_augment import resize_with_boxes

    image_ids = tf.constant([str(r.image_id) for r in records])
    read = _reporting_input_errors(
        lambda index: _raw_element(sampler, index),
        lambda index: (np.zeros((1, 1, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int32),
                       np.zeros(0, np.float32), np.zeros(2, np.int32)))
    size, max_boxes = sampler.size, sampler.max_boxes

    def load(key, index):
        image, boxes, classes, ignore, original_hw, error = tf.numpy_function(
            read, [index], [tf.uint8, tf.float32, tf.int32, tf.float32, tf.int32, tf.string], stateful=False)
        image, boxes, classes, ignore, original_hw = _raise_input_error(error, image, boxes, classes, ignore,
                                                                       original_hw)
        image.set_shape([None, None, 3])
        boxes.set_shape([None, 4])
        classes.set_shape([None])
        ignore.set_shape([None])
        original_hw.set_shape([2])
        seed = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.constant(sampler.seed_base, tf.int64), key]), index)
        image, boxes, classes, ignore = augmenter(image, boxes, classes, ignore, seed)
        image, boxes = resize_with_boxes(image, boxes, size)
        values = tf.stack([tf.cast(classes, tf.float32), ignore], axis=1)
        scale = tf.constant([size[1], size[0], size[1], size[0]], tf.float32)
        targets = tf.concat([boxes / scale, values], axis=1)[:max_boxes]
        padding = tf.tile(tf.constant([[0, 0, 0, 0, -1, 0]], tf.float32), [max_boxes - tf.shape(targets)[0], 1])
        targets = tf.ensure_shape(tf.concat([targets, padding], axis=0), [max_boxes, 6])
        image = tf.ensure_shape(image, [*size, 3])
        if not with_meta:
            return image, targets
        return image, targets, dict(index=tf.cast(index, tf.int32), image_id=tf.gather(image_ids, index),
                                    height=original_hw[0], width=original_hw[1])

    dataset = indices.map(load, num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def _raw_element(sampler, index):
    """Record ``index``'s decoded image (uint8 HxWx3) and its boxes, classes, ignore flags and original size."""
    index = int(index)
    record = sampler.records[index]
    image = sampler.read(index)
    return (image, np.asarray(record.boxes, np.float32).reshape(-1, 4), np.asarray(record.classes, np.int32),
            np.asarray(record.ignore, np.float32), np.array(image.shape[:2], np.int32))


def _decoded_in_graph(indices, sampler, records, with_meta_of, num_parallel_calls, deterministic):
    """Elements decoded by ``tf.io``, then one numpy step each (``decode="graph"``).

    ``tf.io`` ignores EXIF: each record's orientation (read at load, or now for
    unchecked records) is applied in the graph, and the stored size checked
    against the record's where the load-time check stored it.
    """
    from kdet.data.image_check import swaps_axes

    paths = tf.constant([r.image_path or "" for r in records])
    orientations = [r.orientation if r.orientation is not None else _file_orientation(r.image_path) for r in records]
    stored_hw = tf.constant([((r.width, r.height) if swaps_axes(o) else (r.height, r.width))
                             if r.orientation is not None else (-1, -1) for r, o in zip(records, orientations)],
                            tf.int32)
    orientations = tf.constant(orientations, tf.int32)
    check_end = tf.constant([r.orientation is None or _ends_with_end_mark(r.image_path)
                             or not _workers.decodes_with_pil(r.image_path) for r in records])
    step = _reporting_input_errors(sampler, lambda image, key, index: _empty_outputs(sampler, None))

    def load(key, index):
        path = tf.gather(paths, index)
        encoded = tf.io.read_file(path)
        encoded = _assert_decodable(encoded, path, tf.gather(check_end, index))
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image = _assert_stored_size(image, tf.gather(stored_hw, index), path)
        image = _orient_in_graph(image, tf.gather(orientations, index))
        image, targets, original_hw, error = tf.numpy_function(
            step, [image, key, index], [tf.uint8, tf.float32, tf.int32, tf.string], stateful=False)
        image, targets, original_hw = _raise_input_error(error, image, targets, original_hw)
        _set_static_shapes(sampler, [], image, targets, original_hw)
        return with_meta_of(image, targets, original_hw, index)

    return indices.map(load, num_parallel_calls=num_parallel_calls, deterministic=deterministic)


# ------------------------------------------------------- input errors, EXIF in the graph
# A bad image inside the pipeline (a file changed or removed after the load-time
# check, or a broken augmentation) ends in one line naming it: the numpy steps
# return the DatasetError's message instead of raising (a Python exception inside
# tf.numpy_function comes out as a TensorFlow error holding a Python traceback),
# the graph raises it with tf.debugging.Assert, and :func:`input_error` turns the
# TensorFlow error that reaches the caller (model.fit, a loop) back into a DatasetError.
INPUT_ERROR_MARK = "kdet input error: "
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"


def _reporting_input_errors(step, empty):
    """``step`` with its DatasetError returned as a last output (b"" when fine); ``empty(*args)`` fills the rest."""
    from kdet.data.base import DatasetError

    def guarded(*args):
        try:
            return (*step(*args), b"")
        except DatasetError as err:
            return (*empty(*args), _one_line(err).encode())

    return guarded


def _empty_outputs(sampler, rows):
    lead = () if rows is None else (rows,)
    return (np.zeros(lead + (*sampler.size, 3), np.uint8), np.zeros(lead + (sampler.max_boxes, 6), np.float32),
            np.zeros(lead + (2,), np.int32))


def _one_line(err):
    return " ".join(str(err).split("\n")).strip()


def _raise_input_error(error, *tensors):
    """``tensors``, after an assertion that ``error`` (a string tensor) is empty; else it is raised."""
    check = tf.debugging.Assert(tf.equal(tf.strings.length(error), 0),
                                [tf.strings.join([INPUT_ERROR_MARK, error])])
    with tf.control_dependencies([check]):
        return [tf.identity(t) for t in tensors]


def _assert_decodable(encoded, path, check_end):
    """``encoded`` once it looks like a complete image (tf.io's own errors do not name the file).

    ``check_end``: whether a JPEG/PNG must end with its end mark (False for files
    that passed loading with trailing data after it).
    """
    length = tf.strings.length(encoded)
    head = tf.strings.substr(encoded, 0, 8)
    jpeg, png = tf.io.is_jpeg(encoded), tf.equal(head, PNG_SIGNATURE)
    known = jpeg | png | tf.equal(tf.strings.substr(head, 0, 2), b"BM") | tf.equal(tf.strings.substr(head, 0, 3), b"GIF")
    tail = tf.io.decode_raw(tf.strings.substr(encoded, tf.maximum(length - 16, 0), 16), tf.uint8)
    last = tf.reduce_max(tf.where(tf.not_equal(tail, 0), tf.range(tf.size(tail)), -1))  # zero padding allowed
    jpeg_end = (last >= 1) & tf.equal(tf.gather(tail, tf.maximum(last - 1, 0)), 0xFF) & \
        tf.equal(tf.gather(tail, tf.maximum(last, 0)), 0xD9)
    png_end = tf.equal(tf.strings.substr(encoded, tf.maximum(length - 8, 0), 8), PNG_END)
    problem = tf.case([(tf.equal(length, 0), lambda: tf.constant("empty image file (0 bytes)")),
                       (tf.logical_not(known), lambda: tf.constant("not an image file (unknown format)")),
                       (check_end & jpeg & tf.logical_not(jpeg_end),
                        lambda: tf.constant("truncated JPEG (no end-of-image marker)")),
                       (check_end & png & tf.logical_not(png_end), lambda: tf.constant("truncated PNG (no IEND chunk)"))],
                      default=lambda: tf.constant(""))
    message = tf.where(tf.equal(problem, ""), "", tf.strings.join([path, ": ", problem]))
    return _raise_input_error(message, encoded)[0]


def _assert_stored_size(image, stored_hw, path):
    """``image`` once its stored ``(h, w)`` is ``stored_hw`` (``(-1, -1)``: not known, not checked)."""
    hw = tf.shape(image)[:2]
    fine = tf.reduce_all(tf.equal(hw, stored_hw)) | tf.reduce_all(tf.equal(stored_hw, -1))
    size = lambda v: tf.strings.join([tf.strings.as_string(v[1]), "x", tf.strings.as_string(v[0])])  # noqa: E731
    message = tf.strings.join([path, ": the image is now ", size(hw), " (stored width x height), not ", size(stored_hw),
                               " (it was readable when the dataset loaded: was it changed or removed since?)"])
    return _raise_input_error(tf.where(fine, "", message), image)[0]


def _orient_in_graph(image, orientation):
    """``image`` (``HxWxC``) as shown under EXIF ``orientation``: the same pixels as ``apply_orientation``."""
    transpose = lambda a: tf.transpose(a, [1, 0, 2])  # noqa: E731
    branches = [
        lambda: image,                                          # 1 (and anything out of range)
        lambda: image,
        lambda: tf.reverse(image, [1]),                         # 2 mirrored left-right
        lambda: tf.reverse(image, [0, 1]),                      # 3 turned 180
        lambda: tf.reverse(image, [0]),                         # 4 mirrored top-bottom
        lambda: transpose(image),                               # 5 transposed
        lambda: tf.image.rot90(image, k=3),                     # 6 turned 90 clockwise
        lambda: transpose(tf.reverse(image, [0, 1])),           # 7 transversed
        lambda: tf.image.rot90(image, k=1),                     # 8 turned 90 counter-clockwise
    ]
    index = tf.where((orientation >= 1) & (orientation <= 8), orientation, 0)
    return tf.switch_case(index, branches)


def _ends_with_end_mark(path):
    """False for a JPEG/PNG that does not end with its end mark now (trailing data), else True."""
    from kdet.data.image_check import truncation_problem

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16))
            tail = f.read()
    except OSError:
        return True  # the read in the graph reports it
    image_format = "JPEG" if head[:3] == b"\xff\xd8\xff" else "PNG" if head == PNG_SIGNATURE else None
    return image_format is None or truncation_problem(tail, image_format) is None


def _file_orientation(path):
    from PIL import Image

    from kdet.data.image_check import exif_orientation

    try:
        with Image.open(path) as img:
            return exif_orientation(img)
    except Exception:  # unreadable: the decode reports it
        return 1


def input_error(err):
    """The :class:`~kdet.errors.DatasetError` an input-pipeline TensorFlow error stands for, or None.

    ``err`` is what iterating a kdet dataset raised (say, from ``model.fit``): a
    bad image names its file in one line, without TensorFlow's traceback.
    """
    import re

    from kdet.data.base import DatasetError

    if not isinstance(err, tf.errors.OpError):
        return None
    text = err.message or str(err)
    found = re.search(re.escape(INPUT_ERROR_MARK) + r"(.+?)\]\s*(?:\n|\[\[|$)", text)
    if found:
        return DatasetError(found.group(1).strip())
    missing = re.search(r"(\S+); No such file or directory", text)
    if isinstance(err, tf.errors.NotFoundError) and missing:  # decode="graph": tf.io.read_file
        return DatasetError(f"{missing.group(1)}: image file not found (it was there when the dataset loaded: "
                            "was it removed since?)", reason="missing file")
    return None


def _set_static_shapes(sampler, leading, images, targets, original_hw):
    """Static shapes of a numpy step's outputs; ``leading`` is ``[]`` for one element, ``[rows]`` for a batch."""
    images.set_shape(leading + [*sampler.size, 3])
    targets.set_shape(leading + [sampler.max_boxes, 6])
    original_hw.set_shape(leading + [2])


def close_worker_pools():
    """Stop the input pipeline's worker processes now (they are otherwise kept for reuse until exit)."""
    _workers.close_pools()


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


def _element_indices(count, training, shuffle, seed, seed_base, epoch=None, mosaic_off_from=None, skip=None):
    """``(pass_key, index)`` pairs: one pass over the records, shuffled anew each pass."""
    return _passes(count, training, shuffle, seed, seed_base,
                   lambda key, order: tf.data.Dataset.from_tensor_slices(order).map(lambda i: (key, i)), epoch,
                   mosaic_off_from, skip)


def _skip(skip_batches, batch_size):
    """``(variable, batch_size)`` for ``_passes`` (None without ``skip_batches``)."""
    return None if skip_batches is None else (skip_batches, int(batch_size))


def _passes(count, training, shuffle, seed, seed_base, one_pass, epoch=None, mosaic_off_from=None, skip=None):
    """``one_pass(key, order)`` flat-mapped over one pass key per iteration.

    Training: the key is a seeded random number drawn anew each time the dataset
    is iterated, or, with an ``epoch`` variable, drawn from ``(seed, epoch)`` when the
    pass starts; ``order`` is the records' indices shuffled by ``(seed, key)``.
    Evaluation: key 0, indices in order. From epoch ``mosaic_off_from`` on, the key carries
    ``MOSAIC_OFF_BIT`` (the Python step then skips mosaic). ``skip``: ``(variable, batch_size)``: each
    training pass leaves out its first ``variable * batch_size`` indices (read when the pass starts).
    """
    if not training:
        return tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).flat_map(
            lambda key: one_pass(key, tf.range(count, dtype=tf.int64)))
    if epoch is None:
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    else:  # read when the pass starts, after the epoch's on_epoch_begin
        keys = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).map(
            lambda _: _pass_key(seed, epoch, mosaic_off_from))

    def shuffled(key):
        order = tf.range(count, dtype=tf.int64)
        if shuffle:
            pair = tf.stack([tf.constant(seed_base, tf.int64), key])
            order = tf.random.experimental.stateless_shuffle(order, seed=pair)
        if skip is not None:
            variable, rows = skip
            order = order[tf.cast(variable.read_value(), tf.int64) * rows:]
        return one_pass(key, order)

    return keys.flat_map(shuffled)


MIN_CPUS_FOR_WORKERS = 4


def _auto_workers(training, augmenter, decode):
    """Worker processes for ``workers=None``: up to 4 (one per usable CPU) when training with augmentation."""
    if not training or augmenter is None or decode == "graph":
        return 0
    cpus = len(_workers.usable_cpus()) or os.cpu_count() or 1
    # On 2 CPUs processes measured faster alone (benchmark_pipeline: 2.15-2.37x the loop vs 1.21-1.89x for
    # threads), but inside training, where the model takes the cores, no faster (shapes recipe, 2 epochs:
    # 3.0 min either way; the first epoch slower with processes).
    return min(cpus, 4) if cpus >= MIN_CPUS_FOR_WORKERS else 0


def _pass_key(seed, epoch, mosaic_off_from=None):
    """A non-negative int64 key for the pass of ``epoch`` (a variable), stateless in ``(seed, epoch)``.

    With ``mosaic_off_from`` (a variable), epochs from it on get ``MOSAIC_OFF_BIT`` set.
    """
    current = tf.cast(epoch.read_value(), tf.int64)
    pair = tf.stack([tf.constant(int(seed), tf.int64), current])
    key = tf.random.stateless_uniform([], seed=pair, minval=0, maxval=2 ** 62, dtype=tf.int64)
    if mosaic_off_from is None:
        return key
    off = current >= tf.cast(mosaic_off_from.read_value(), tf.int64)
    return tf.where(off, tf.bitwise.bitwise_or(key, tf.constant(_workers.MOSAIC_OFF_BIT, tf.int64)), key)


def _process_batches(sampler, count, batch_size, training, shuffle, seed, cv2_threads, workers, chunksize,
                     epoch=None, mosaic_off_from=None, skip=None):
    """Batches ``(images uint8, targets, original_hw, index)`` computed by ``workers`` processes, in order.

    The same elements as the in-thread path: pass keys and orders come from the
    same graph ops, and each element's randomness from ``(seed, key, index)``.
    Per pass, one ``numpy_function`` hands the order to a :class:`_Feeder`
    (which sends chunks to the workers), then a sequential map fetches batch
    after batch. (Not ``Dataset.from_generator``: it sets a process-wide malloc
    trim threshold that makes every large tensor allocation page-fault afresh,
    doubling the cost of the batch cast here and of the rest of training.)
    """
    feeder = _Feeder(sampler, batch_size, training, cv2_threads, workers, chunksize)
    batches = count // batch_size if training else -(-count // batch_size)
    rows = batch_size if training else None

    def fetch(pass_id, b):
        images, targets, sizes, indices, error = tf.numpy_function(
            feeder.fetch, [pass_id, b], [tf.uint8, tf.float32, tf.int32, tf.int64, tf.string], stateful=True)
        images, targets, sizes, indices = _raise_input_error(error, images, targets, sizes, indices)
        _set_static_shapes(sampler, [rows], images, targets, sizes)
        indices.set_shape([rows])
        return images, targets, sizes, indices

    def one_pass(key, order):
        pass_id = tf.numpy_function(feeder.start, [key, order], tf.int64, stateful=True)
        count_now = tf.size(order, out_type=tf.int64) // batch_size if skip is not None else batches
        return tf.data.Dataset.range(count_now).map(lambda b: fetch(pass_id, b))

    return _passes(count, training, shuffle, seed, sampler.seed_base, one_pass, epoch, mosaic_off_from, skip)


class _Feeder:
    """Sends a dataset's elements to the worker pool in chunks and hands back whole batches, in order.

    A worker gets ``chunksize`` elements of one batch at a time and returns them
    stacked; training skips the partial last batch without computing it. At
    most ``2 * workers`` chunks of a pass are in flight, so a slow consumer does
    not make the workers pile up an epoch in memory. Passes that are left early
    (``take``) are dropped once ``_KEEP_PASSES`` newer ones have started.
    """

    _KEEP_PASSES = 4

    def __init__(self, sampler, batch_size, training, cv2_threads, workers, chunksize):
        self.payload = _workers.Payload(sampler)
        self.sampler = sampler  # its sizes, for the placeholder batch that carries an input error
        # the CPU set now (make_dataset's caller), not that of the tf.data thread that starts the pool
        self.pool_args = (workers, _workers.usable_cpus(), cv2_threads, not self.payload.uses_main)
        self.batch_size, self.training, self.workers, self.chunksize = batch_size, training, workers, chunksize
        self.image_shape = (chunksize, *sampler.size, 3)
        self.passes = collections.OrderedDict()
        self.next_id = 0
        self.lock = threading.Lock()

    def start(self, key, order):
        pool = _workers.get_pool(*self.pool_args)
        key, order = int(key), [int(i) for i in order]
        size = self.batch_size
        stop = len(order) - len(order) % size if self.training else len(order)
        batches = [order[i:min(i + size, stop)] for i in range(0, stop, size)]
        chunks = [(b, batch[i:i + self.chunksize]) for b, batch in enumerate(batches)
                  for i in range(0, len(batch), self.chunksize)]
        state = _Pass(pool, self.payload.path, key, batches, chunks, 2 * self.workers, self.image_shape)
        with self.lock:
            pass_id = self.next_id
            self.next_id += 1
            self.passes[pass_id] = state
            while len(self.passes) > self._KEEP_PASSES:
                self.passes.popitem(last=False)[1].close()
        return np.int64(pass_id)

    def fetch(self, pass_id, b):
        pass_id, b = int(pass_id), int(b)
        with self.lock:
            state = self.passes.get(pass_id)
        if state is None:
            raise RuntimeError(f"input pipeline pass {pass_id} was dropped: more than {self._KEEP_PASSES} "
                               "iterators of one dataset at once")
        from kdet.data.base import DatasetError

        try:
            batch = state.batch(b)
        except DatasetError as err:  # from a worker: reported by the graph, see _raise_input_error
            self._end(pass_id)
            indices = np.asarray(state.batches[b], np.int64)
            return (*_empty_outputs(self.sampler, len(indices)), indices, _one_line(err).encode())
        except BaseException:
            self._end(pass_id)
            raise
        if b == len(state.batches) - 1:
            self._end(pass_id)
        return (*batch, b"")

    def _end(self, pass_id):
        with self.lock:
            state = self.passes.pop(pass_id, None)
        if state is not None:
            state.close()


class _Pass:
    """One pass of a :class:`_Feeder`: its batches, the chunks sent to the workers, their image ring.

    Workers write a chunk's images into a slot of a shared-memory ring (one
    slot per chunk in flight); a slot is copied out before its chunk's
    successor is sent. Targets and sizes come back through the pool's pipe.
    """

    def __init__(self, pool, path, key, batches, chunks, in_flight, chunk_shape):
        self.pool, self.path, self.key, self.batches = pool, path, key, batches
        self.chunks = iter(chunks)
        self.pending = collections.deque()
        self.next_batch = 0
        self.sent = 0
        self.chunk_shape = chunk_shape
        self.ring = _workers.Ring(in_flight, int(np.prod(chunk_shape)))
        self._submit(in_flight)

    def _submit(self, count):
        for b, chunk in itertools.islice(self.chunks, count):
            ring = self.ring.slot(self.sent)
            result = self.pool.apply_async(_workers.run_chunk, (self.path, self.key, chunk, ring))
            self.pending.append((b, self.sent, len(chunk), result))
            self.sent += 1

    def batch(self, b):
        if b != self.next_batch:
            raise RuntimeError(f"input pipeline: batch {b} requested, {self.next_batch} expected")
        self.next_batch += 1
        indices = self.batches[b]
        images = None
        targets, sizes, row = [], [], 0
        while self.pending and self.pending[0][0] == b:
            _, slot, count, result = self.pending.popleft()
            _, chunk_targets, chunk_sizes = result.get()
            chunk = self.ring.view(slot, (count, *self.chunk_shape[1:]))
            if images is None:
                images = np.empty((len(indices), *chunk.shape[1:]), np.uint8)
            images[row:row + count] = chunk  # copied out before the slot is reused
            targets.append(chunk_targets)
            sizes.append(chunk_sizes)
            row += count
            self._submit(1)
        return images, np.concatenate(targets), np.concatenate(sizes), np.asarray(indices, np.int64)

    def close(self):
        self.pending.clear()  # chunks still running finish in the workers and are dropped
        self.ring.close()
