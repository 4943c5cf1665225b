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
  (:class:`kdet.data._workers._Sampler`: OpenCV decode, augmentation, padding)
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
from kdet.data._workers import _Sampler  # the Python step of one element; the workers run it too
from kdet.data.augment import DEFAULT_MIN_VISIBILITY, Augmenter, _size_hw

AUTOTUNE = tf.data.AUTOTUNE


def make_dataset(records, image_size, batch_size: int, augment=None, training: bool = True, max_boxes: int = 100,
                 shuffle: bool = True,
                 seed=None, num_parallel_calls=AUTOTUNE, cache_images=False, with_meta=False,
                 min_visibility=DEFAULT_MIN_VISIBILITY, cv2_threads=0, decode="auto", workers=None,
                 worker_chunksize=8):
    """A batched ``tf.data.Dataset`` of ``(images, targets)`` (plus ``meta`` when ``with_meta``).

    Args:
        ``records``: a list of :class:`~kdet.data.records.Record` or a data source.
        ``image_size``: int or ``(height, width)`` of the output images.
        ``augment``: list of augmentation entries (or an ``Augmenter``), used only
        when ``training``; every image is finally resized to ``image_size``.
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
                                   worker_chunksize)
        dataset = dataset.map(with_meta_of)
        return dataset.prefetch(AUTOTUNE)

    indices = _element_indices(len(records), training, shuffle, seed, seed_base)
    deterministic = True if (seed is not None or not training) else None
    if in_graph:
        dataset = _decoded_in_graph(indices, sampler, records, with_meta_of, num_parallel_calls, deterministic)
        return dataset.batch(batch_size, drop_remainder=training).prefetch(AUTOTUNE)
    dataset = indices.batch(batch_size, drop_remainder=training)
    return _python_batches(dataset, sampler, with_meta_of, batch_size if training else None,
                           num_parallel_calls, deterministic).prefetch(AUTOTUNE)


def _python_batches(index_batches, sampler, with_meta_of, rows, num_parallel_calls, deterministic):
    """One numpy step per batch of ``(keys, indices)``: no per-element tf.data / numpy_function overhead."""
    def load_batch(keys, indices):
        images, targets, original_hw = tf.numpy_function(
            sampler.many, [keys, indices], [tf.uint8, tf.float32, tf.int32], stateful=False)
        _set_static_shapes(sampler, [rows], images, targets, original_hw)
        return with_meta_of(images, targets, original_hw, indices)

    return index_batches.map(load_batch, num_parallel_calls=num_parallel_calls, deterministic=deterministic)


def _decoded_in_graph(indices, sampler, records, with_meta_of, num_parallel_calls, deterministic):
    """Elements decoded by ``tf.io``, then one numpy step each (``decode="graph"``)."""
    paths = tf.constant([r.image_path or "" for r in records])

    def load(key, index):
        encoded = tf.io.read_file(tf.gather(paths, index))
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image, targets, original_hw = tf.numpy_function(
            sampler, [image, key, index], [tf.uint8, tf.float32, tf.int32], stateful=False)
        _set_static_shapes(sampler, [], image, targets, original_hw)
        return with_meta_of(image, targets, original_hw, index)

    return indices.map(load, num_parallel_calls=num_parallel_calls, deterministic=deterministic)


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


def _element_indices(count, training, shuffle, seed, seed_base):
    """``(pass_key, index)`` pairs: one pass over the records, shuffled anew each pass."""
    return _passes(count, training, shuffle, seed, seed_base,
                   lambda key, order: tf.data.Dataset.from_tensor_slices(order).map(lambda i: (key, i)))


def _passes(count, training, shuffle, seed, seed_base, one_pass):
    """``one_pass(key, order)`` flat-mapped over one pass key per iteration.

    Training: the key is a seeded random number drawn anew each time the dataset
    is iterated, and ``order`` the records' indices shuffled by ``(seed, key)``.
    Evaluation: key 0, indices in order.
    """
    if not training:
        return tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).flat_map(
            lambda key: one_pass(key, tf.range(count, dtype=tf.int64)))
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)

    def shuffled(key):
        order = tf.range(count, dtype=tf.int64)
        if shuffle:
            pair = tf.stack([tf.constant(seed_base, tf.int64), key])
            order = tf.random.experimental.stateless_shuffle(order, seed=pair)
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


def _process_batches(sampler, count, batch_size, training, shuffle, seed, cv2_threads, workers, chunksize):
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
        images, targets, sizes, indices = tf.numpy_function(
            feeder.fetch, [pass_id, b], [tf.uint8, tf.float32, tf.int32, tf.int64], stateful=True)
        _set_static_shapes(sampler, [rows], images, targets, sizes)
        indices.set_shape([rows])
        return images, targets, sizes, indices

    def one_pass(key, order):
        pass_id = tf.numpy_function(feeder.start, [key, order], tf.int64, stateful=True)
        return tf.data.Dataset.range(batches).map(lambda b: fetch(pass_id, b))

    return _passes(count, training, shuffle, seed, sampler.seed_base, one_pass)


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
        try:
            batch = state.batch(b)
        except BaseException:
            self._end(pass_id)
            raise
        if b == len(state.batches) - 1:
            self._end(pass_id)
        return batch

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
