"""The Python step of the input pipeline, and the worker processes that can run it.

Imported both by :mod:`kdet.data.pipeline` (in the training process) and by the
worker processes, which must stay free of TensorFlow (it is not fork-safe and
costs seconds and hundreds of MB per process): only numpy, OpenCV,
albumentations and the TensorFlow-free parts of :mod:`kdet.data`.

Workers come from shared pools, one per ``(worker count, CPU set)``, started
with the ``forkserver`` method (``spawn`` where it is missing) and kept until
:func:`close_pools` or interpreter exit, so that several ``make_dataset`` calls
(and epochs) reuse them. A dataset's Python step (its :class:`Sampler`:
records, augmenter, sizes, seed) is pickled once to a private temporary file;
each task names that file, and a worker loads it on first use and keeps the
last few it loaded. Workers write images into a shared-memory :class:`Ring`
(``/dev/shm``) rather than pickling them through the pool's pipe, and tune
glibc malloc to keep freed memory (see :func:`_keep_freed_memory`).
"""

import atexit
import collections
import contextlib
import multiprocessing
import os
import pickle
import sys
import tempfile
import threading
import warnings
import weakref

import cv2
import numpy as np

from kdet.data.base import DatasetError
from kdet.data.image_check import CHANGED_HINT, apply_orientation, swaps_axes, truncation_problem
from kdet.data.records import load_image


# A pass key with this bit set is a pass without mosaic (data.close_mosaic); drawn keys are below 2**62.
MOSAIC_OFF_BIT = 1 << 62


class Sampler:
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

    def __getstate__(self):  # pickled for worker processes: no locks, an empty cache
        state = dict(self.__dict__)
        del state["_lock"]
        state["cache"] = {} if self.cache is not None else None
        state["truncated"] = 0
        if self.augmenter is not None:  # the Augmenter holds a lock and per-thread Compose objects
            augmenter_state = {k: v for k, v in vars(self.augmenter).items() if k not in ("_lock", "_idle")}
            state["augmenter"] = (type(self.augmenter), augmenter_state)
        return state

    def __setstate__(self, state):
        if state["augmenter"] is not None:
            cls, augmenter_state = state["augmenter"]
            augmenter = cls.__new__(cls)
            augmenter.__dict__.update(augmenter_state, _lock=threading.Lock(), _idle=[])
            state["augmenter"] = augmenter
        self.__dict__.update(state)
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
            sample = self._augment(sample, rng, mosaic_on=not int(key) & MOSAIC_OFF_BIT)
        image, boxes = sample[0], _normalize(sample[1], sample[0].shape)
        if image.shape[:2] != self.size:
            image = cv2.resize(image, self.size[::-1], interpolation=cv2.INTER_LINEAR)
        return image, self._targets(boxes, sample[2], sample[3], record), original_hw

    def many(self, keys, indices, images=None):
        """Elements ``indices`` (pass ``keys``, one per element) stacked: ``(images, targets, original hw)``.

        ``images``: an ``[k, H, W, 3]`` uint8 array to fill (e.g. shared memory) instead of a new one.
        """
        if images is None:
            images = np.empty((len(indices), *self.size, 3), np.uint8)
        empty = np.zeros((0, 0, 3), np.uint8)
        targets = np.empty((len(indices), self.max_boxes, 6), np.float32)
        sizes = np.empty((len(indices), 2), np.int32)
        for row, (key, index) in enumerate(zip(keys, indices)):
            images[row], targets[row], sizes[row] = self(empty, key, index)
        return images, targets, sizes

    def _augment(self, sample, rng, mosaic_on=True):
        mosaic = self.augmenter.mosaic
        if mosaic is not None and mosaic_on and rng.random() < mosaic.p:
            others = rng.integers(0, len(self.records), 3)
            samples = [sample] + [self._sample(int(j)) for j in others]
            sample = mosaic.combine(samples, rng, min_visibility=self.augmenter.min_visibility)
        paste = self.augmenter.copy_paste
        if paste is not None and rng.random() < paste.p:
            donors = rng.integers(0, len(self.records), paste.donors)
            sample = paste.paste(sample, [self._sample(int(j)) for j in donors], rng)
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
            image = decode_file(record)
        else:
            try:
                image = load_image(record)
            except ValueError as err:
                raise DatasetError(str(err), reason="unreadable image") from None
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


_Sampler = Sampler  # its former name, for code that imports it


def decode_file(record):
    """The record's image file as uint8 HxWx3 RGB, EXIF-oriented, decoded by OpenCV (which releases the GIL).

    Raises :class:`DatasetError` naming the file when it cannot be read or decoded,
    is truncated, or (for records checked at load) no longer has the size it had.
    """
    path = record.image_path
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the image file ({err.strerror or err}; {CHANGED_HINT})",
                           reason="unreadable image") from None
    image_format = "JPEG" if data[:3] == b"\xff\xd8\xff" else "PNG" if data[:8] == b"\x89PNG\r\n\x1a\n" else None
    problem = truncation_problem(data, image_format) if image_format else None
    if problem and not decodes_with_pil(data):  # not merely trailing data after the end marker
        raise DatasetError(f"{path}: {problem} ({CHANGED_HINT})", reason="unreadable image")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        hint = CHANGED_HINT if record.orientation is not None else "missing, empty or not an image"
        raise DatasetError(f"{path}: cannot decode the image ({hint})", reason="unreadable image")
    orientation = record.orientation if record.orientation is not None else _orientation_of(data)
    if record.orientation is not None:  # checked at load: the stored size is known
        expected = (record.width, record.height) if swaps_axes(orientation) else (record.height, record.width)
        if image.shape[:2] != expected:
            raise DatasetError(f"{path}: the image is now {image.shape[1]}x{image.shape[0]} (stored width x "
                               f"height), not {expected[1]}x{expected[0]} ({CHANGED_HINT})", reason="size mismatch")
    return apply_orientation(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), orientation)


def decodes_with_pil(data_or_path):
    """Whether PIL decodes these image bytes (or this file) to the end."""
    import io
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path) as img:
            img.load()
        return True
    except Exception:
        return False


def _orientation_of(data):
    import io
    from PIL import Image

    from kdet.data.image_check import exif_orientation

    try:
        with Image.open(io.BytesIO(data)) as img:
            return exif_orientation(img)
    except Exception:
        return 1


def _normalize(boxes, shape):
    """Pixel boxes -> normalised, clipped to the image."""
    height, width = shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) / np.array([width, height, width, height], np.float32)
    return np.clip(boxes, 0.0, 1.0)


# ------------------------------------------------------------- worker side
_KEEP_SAMPLERS = 4  # a worker keeps the samplers of this many datasets (LRU)
_samplers = collections.OrderedDict()  # payload path -> Sampler, in each worker


def _init_worker(cpus, cv2_threads, parent_pid=None):
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    if parent_pid:
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)  # the parent's CPU set when the pool started (forkserver children
            # otherwise inherit the fork server's, which may date from another pinning)
    if cv2_threads is not None:
        cv2.setNumThreads(cv2_threads)
    _keep_freed_memory()


def _keep_freed_memory():
    """glibc malloc: serve large blocks from the heap and keep freed memory (workers only).

    Decoded images, warps and canvases are MB-sized: by default glibc maps
    each such block afresh and unmaps it on free, so every image page-faults
    ~4 MB of new memory; that made the same work ~1.6x slower in a worker
    process than in the (TensorFlow) training process. A worker keeps at most
    its peak working set instead.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _exit_with_parent(pid):
    """Pool workers wait for tasks forever; leave when the training process is gone (say, killed)."""
    import time

    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except OSError:
            pass


def _sampler_for(path):
    sampler = _samplers.get(path)
    if sampler is None:
        with open(path, "rb") as f:
            sampler = pickle.load(f)
        _samplers[path] = sampler
        while len(_samplers) > _KEEP_SAMPLERS:
            _samplers.popitem(last=False)
    else:
        _samplers.move_to_end(path)
    return sampler


_KEEP_RINGS = 4
_rings = collections.OrderedDict()  # ring file path -> mmap, in each worker


def _ring_view(ring, shape):
    """``ring = (file path, byte offset)``: a writable uint8 view of ``shape`` into that shared file."""
    import mmap

    path, offset = ring
    buffer = _rings.get(path)
    if buffer is None:
        with open(path, "r+b") as f:
            buffer = mmap.mmap(f.fileno(), 0)
        _rings[path] = buffer
        while len(_rings) > _KEEP_RINGS:
            _rings.popitem(last=False)[1].close()
    else:
        _rings.move_to_end(path)
    return np.frombuffer(buffer, np.uint8, int(np.prod(shape)), offset).reshape(shape)


def run_chunk(path, key, indices, ring=None):
    """In a worker: ``(images uint8 [k, H, W, 3], targets [k, max_boxes, 6], original hw [k, 2])``.

    With ``ring``, the images go into that shared-memory slot instead (``None``
    is returned in their place): cheaper than pickling them through a pipe.
    """
    sampler = _sampler_for(path)
    out = None if ring is None else _ring_view(ring, (len(indices), *sampler.size, 3))
    images, targets, sizes = sampler.many([key] * len(indices), indices, out)
    return (images if ring is None else None), targets, sizes


# ------------------------------------------------------------- parent side
_pools = {}  # (workers, cpus, cv2_threads) -> multiprocessing Pool
_pools_lock = threading.Lock()
_payload_dir = None
_ring_dir = None


def _context():
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([__name__])  # workers fork from a server that already imported us
    return ctx


@contextlib.contextmanager
def _worker_environment(hide_main):
    """Environment for starting workers.

    ``hide_main``: multiprocessing re-imports the parent's ``__main__`` script in
    every worker; a training script typically imports TensorFlow at the top, so
    it is hidden when nothing sent to the workers refers to it. Albumentations'
    update check (a network request at import) is switched off in the workers.
    """
    main = sys.modules.get("__main__")
    saved = {}
    if hide_main and main is not None:
        for name in ("__file__", "__spec__"):
            if name in main.__dict__:
                saved[name] = main.__dict__[name]
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
    env = os.environ.get("NO_ALBUMENTATIONS_UPDATE")
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("NO_ALBUMENTATIONS_UPDATE", None)
        else:
            os.environ["NO_ALBUMENTATIONS_UPDATE"] = env
        if main is not None and hide_main:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def usable_cpus():
    """The calling thread's CPU set (Linux affinity), or () where it is unknown."""
    return tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ()


def get_pool(workers, cpus=(), cv2_threads=0, hide_main=True):
    """The shared pool of ``workers`` processes, pinned to ``cpus`` (a CPU set; () = not pinned)."""
    key = (workers, cpus, cv2_threads)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            with _worker_environment(hide_main):
                pool = _context().Pool(workers, initializer=_init_worker, initargs=(cpus, cv2_threads, os.getpid()))
            _pools[key] = pool
        return pool


def close_pools():
    """Stop every worker process started by the input pipeline (also done at exit)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.terminate()
        pool.join()


def worker_pids():
    """Process ids of the live pipeline workers (for CPU accounting in benchmarks)."""
    with _pools_lock:
        return [p.pid for pool in _pools.values() for p in pool._pool if p.is_alive()]


class Payload:
    """A sampler pickled to a private file for the workers; the file goes with this object (or at exit)."""

    def __init__(self, sampler):
        data = pickle.dumps(sampler, protocol=pickle.HIGHEST_PROTOCOL)
        # The workers may skip the parent's __main__ script unless the sampler refers to it
        # (say, a custom transform class defined in the training script).
        self.uses_main = b"__main__" in data
        fd, self.path = tempfile.mkstemp(suffix=".pkl", dir=_private_dir())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self._finalizer = weakref.finalize(self, _remove, self.path)


def _remove(path):
    with contextlib.suppress(OSError):
        os.remove(path)


class Ring:
    """A shared-memory file of ``slots`` slots of ``slot_bytes`` each (``/dev/shm`` when it has room).

    The parent reads the workers' images from it; the file is removed with this
    object (or at exit). Workers still writing to a removed file keep their
    mapping until they drop it.
    """

    def __init__(self, slots, slot_bytes):
        import mmap

        global _ring_dir
        self.slots, self.slot_bytes = slots, slot_bytes
        size = max(1, slots * slot_bytes)
        with _pools_lock:
            if _ring_dir is None:
                base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
                _ring_dir = tempfile.mkdtemp(prefix="kdet-pipeline-", dir=base)
        directory = _ring_dir
        with contextlib.suppress(OSError):
            stat = os.statvfs(directory)
            if stat.f_bavail * stat.f_frsize < 4 * size:  # a small /dev/shm (containers): use the disk's tmp
                directory = _private_dir()
        fd, self.path = tempfile.mkstemp(suffix=".ring", dir=directory)
        try:
            os.ftruncate(fd, size)
            self.buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._finalizer = weakref.finalize(self, _remove, self.path)

    def slot(self, index):
        """``(path, byte offset)`` of slot ``index`` (modulo the slot count), for :func:`run_chunk`."""
        return self.path, (index % self.slots) * self.slot_bytes

    def view(self, index, shape):
        offset = (index % self.slots) * self.slot_bytes
        return np.frombuffer(self.buffer, np.uint8, int(np.prod(shape)), offset).reshape(shape)

    def close(self):
        self._finalizer()


def _private_dir():
    global _payload_dir
    with _pools_lock:
        if _payload_dir is None:
            _payload_dir = tempfile.mkdtemp(prefix="kdet-pipeline-")
        return _payload_dir


@atexit.register
def _cleanup():
    close_pools()
    import shutil

    for directory in (_payload_dir, _ring_dir):
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
