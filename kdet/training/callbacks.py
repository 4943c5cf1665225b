"""Training callbacks: a non-finite loss guard, a TensorBoard image logger, and what ``--resume`` needs.

The resume files of a work dir are written so that a kill at any moment (SIGKILL, a
pre-empted machine) leaves a usable set: each is written to a temporary file in the
same folder and renamed over the old one (``os.replace``, atomic on POSIX), in the
order ``log.csv`` -> ``best.keras`` -> ``last.keras`` -> ``state.json``. ``state.json`` says how
many epochs ``last.keras`` holds (and its optimizer step count, to check they agree).
"""

import csv
import errno
import io
import json
import math
import os
import shutil
import tempfile

import keras
import numpy as np

from kdet.log import get_logger

logger = get_logger(__name__)

NON_FINITE_CAUSES = (
    "learning rate too high (lower it or add warm-up)",
    "unnormalised inputs (images must be float32 0..255 RGB; the model normalises itself)",
    "degenerate boxes with zero width/height (log(w) of the box encoding becomes -inf)",
    "float16 overflow under mixed_float16 (check the loss-scale optimizer; make the output layer float32)",
)


class NonFiniteLossError(FloatingPointError):
    """Raised by :class:`StopOnNonFiniteLoss` when ``raise_error=True``."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop training at the first batch whose loss is NaN or infinite.

    Keras reports at batch end the running mean loss of the epoch, so it turns
    non-finite exactly at the first bad batch. The callback then sets
    ``model.stop_training = True`` (the current epoch's remaining batches are
    skipped and ``fit`` returns normally, History and earlier checkpoints
    intact), prints a message naming epoch and batch with the likely causes,
    and keeps it in ``self.message`` / ``self.stopped_at = (epoch, batch)``.
    With ``raise_error=True`` it raises :class:`NonFiniteLossError` instead,
    which aborts ``fit`` (use in scripts that must fail loudly).

    Note: the weights have already received the bad update when the loss of
    that batch is seen.
    """

    def __init__(self, raise_error=False, monitor="loss", verbose=1):
        super().__init__()
        self.raise_error = raise_error
        self.monitor = monitor
        self.verbose = verbose
        self.stopped_at = None
        self.message = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        value = float(np.asarray(value))
        if math.isfinite(value):
            return
        self.stopped_at = (self._epoch, batch)
        causes = "".join(f"\n  - {cause}" for cause in NON_FINITE_CAUSES)
        self.message = (
            f"Non-finite {self.monitor} ({value}) at epoch {self._epoch + 1}, batch {batch}: "
            f"training stopped. Likely causes:{causes}"
        )
        self.model.stop_training = True
        if self.raise_error:
            raise NonFiniteLossError(self.message)
        if self.verbose:
            logger.info("\n" + self.message)


# ---------------------------------------------------------------- image logger
def draw_boxes(image, boxes, color=(255, 0, 0), thickness=2):
    """Draw normalised ``xyxy`` boxes on a uint8 ``[H, W, 3]`` image (numpy copy)."""
    canvas = np.array(image, dtype=np.uint8, copy=True)
    height, width = canvas.shape[:2]
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float32).reshape(-1, 4):
        left = int(np.clip(np.floor(x0 * width), 0, width - 1))
        right = int(np.clip(np.ceil(x1 * width) - 1, 0, width - 1))
        top = int(np.clip(np.floor(y0 * height), 0, height - 1))
        bottom = int(np.clip(np.ceil(y1 * height) - 1, 0, height - 1))
        if right < left or bottom < top:
            continue
        t = max(1, int(thickness))
        canvas[top : min(top + t, bottom + 1), left : right + 1] = color
        canvas[max(bottom - t + 1, top) : bottom + 1, left : right + 1] = color
        canvas[top : bottom + 1, left : min(left + t, right + 1)] = color
        canvas[top : bottom + 1, max(right - t + 1, left) : right + 1] = color
    return canvas


def draw_detections(images, detections, score_threshold=0.3, color=(255, 0, 0)):
    """Images ``[B, H, W, 3]`` (0..255) + CONVENTIONS detection dict -> uint8 images with boxes."""
    boxes = np.asarray(detections["boxes"])
    scores = np.asarray(detections["scores"])
    counts = np.asarray(detections["num_detections"])
    drawn = []
    for i, image in enumerate(np.asarray(images)):
        keep = np.arange(boxes.shape[1]) < counts[i]
        keep &= scores[i] >= score_threshold
        drawn.append(draw_boxes(np.clip(image, 0, 255), boxes[i][keep], color=color))
    return np.stack(drawn)


def write_image_summary(name, images, step):
    """``tf.summary.image``; without the tensorboard package, the same summary written by hand.

    TensorBoard's image plugin stores a string tensor ``[width, height, png, ...]``
    tagged with plugin name "images"; we write exactly that with ``tf.summary.write``.
    """
    import tensorflow as tf

    try:
        return tf.summary.image(name, images, step=step, max_outputs=len(images))
    except Exception as error:  # tensorboard not installed: TBNotInstalledError
        if type(error).__name__ != "TBNotInstalledError":
            raise
    from tensorflow.core.framework import summary_pb2

    height, width = images.shape[1:3]
    encoded = [tf.io.encode_png(image) for image in images]
    tensor = tf.stack([tf.constant(str(width)), tf.constant(str(height))] + encoded)
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="images")
    )
    return tf.summary.write(name, tensor, step=step, metadata=metadata)


class ImageLogger(keras.callbacks.Callback):
    """Write a few images with predicted boxes to TensorBoard every ``every_n_epochs``.

    Args:
        log_dir: TensorBoard directory (a ``images`` sub-writer is used).
        images: small batch ``[B, H, W, 3]`` float 0..255 RGB.
        detect_fn: ``detect_fn(images) -> detection dict`` (docs/CONVENTIONS.md).
        score_threshold: draw detections scoring at least this.
    """

    def __init__(self, log_dir, images, detect_fn, score_threshold=0.3, every_n_epochs=1, max_images=4, name="detections"):
        super().__init__()
        self.log_dir = str(log_dir)
        self.images = np.asarray(images, dtype=np.float32)[:max_images]
        self.detect_fn = detect_fn
        self.score_threshold = score_threshold
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.name = name
        self._writer = None

    def _get_writer(self):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir.rstrip("/") + "/images")
        return self._writer

    def log_images(self, step):
        detections = {k: keras.ops.convert_to_numpy(v) for k, v in self.detect_fn(self.images).items()}
        drawn = draw_detections(self.images, detections, self.score_threshold)
        with self._get_writer().as_default():
            write_image_summary(self.name, drawn, step)
        self._writer.flush()
        return drawn

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs == 0:
            self.log_images(epoch)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()


# ---------------------------------------------------------------- atomic files, checkpoints, log
TEMP_PREFIX = ".kdet-tmp-"


#: errno values of a write the folder cannot take (full disk, quota, read-only, file size limit)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_DISK_TEXTS = ("No space left on device", "Disk quota exceeded", "Read-only file system", "File too large",
               "Permission denied", "errno = 28", "errno = 122", "errno = 30", "errno = 27")


class CheckpointWriteError(OSError):
    """A training file the work dir cannot take; the message (one line) names the folder and the bytes needed."""

    def __init__(self, message, errno_=None):
        super().__init__(errno_, message)
        self.message = message

    def __str__(self):
        return self.message


def disk_error_reason(err, space_only=False):
    """The reason (strerror) when ``err`` is a failed write of the kinds in :data:`DISK_ERRNOS`, else None.

    h5py and TensorFlow report these without ``errno`` (the text holds it), so the text counts too.
    """
    if isinstance(err, CheckpointWriteError):
        return None
    reason = _disk_reason(err)
    if space_only and reason in ("Permission denied", os.strerror(errno.EACCES), os.strerror(errno.EPERM)):
        return None   # a file the run reads may be unreadable too: not a full disk
    return reason


def _disk_reason(err):
    number = getattr(err, "errno", None)
    if isinstance(number, int) and number in DISK_ERRNOS:
        return os.strerror(number)
    text = str(err)
    for mark in _DISK_TEXTS:
        if mark in text:
            return {"errno = 28": "No space left on device", "errno = 122": "Disk quota exceeded",
                    "errno = 30": "Read-only file system", "errno = 27": "File too large"}.get(mark, mark)
    return None


def _megabytes(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def atomic_write(path, write, suffix="", expected_bytes=None):
    """Call ``write(temp_path)``, then rename the temp file over ``path``; a kill leaves the old file intact.

    A write the folder cannot take (full disk, quota, read-only, see :data:`DISK_ERRNOS`) removes the
    temporary file and raises :class:`CheckpointWriteError`, one line naming the folder and about how
    many bytes the file needs (``expected_bytes``, else the size of the file it replaces).
    """
    folder = os.path.dirname(os.path.abspath(path))
    temp = None
    try:
        fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX + os.path.basename(path) + ".", suffix=suffix, dir=folder)
        os.close(fd)
        write(temp)
        _fsync(temp)   # on disk before the rename: a power loss leaves the old file or the whole new one
        os.replace(temp, path)
        _fsync(folder)
    except Exception as err:
        reason = disk_error_reason(err)
        if reason is None:
            raise
        if temp is not None and os.path.exists(temp):
            os.remove(temp)   # before counting the free bytes
        raise _write_error(path, folder, reason, expected_bytes, err) from err
    finally:
        if temp is not None and os.path.exists(temp):
            os.remove(temp)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:   # folders on some file systems cannot be synced; a file that cannot is a failed write
        if os.path.isfile(path):
            raise
        del err
    finally:
        os.close(fd)


def _write_error(path, folder, reason, expected_bytes, err):
    need = expected_bytes() if callable(expected_bytes) else expected_bytes
    need = need or (os.path.getsize(path) if os.path.exists(path) else None)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    needs = f"{os.path.basename(path)} needs about {need} bytes ({_megabytes(need)})" if need else \
        f"{os.path.basename(path)} needs more room"
    has = f", {free} bytes free" if free is not None else ""
    kept = f"; the previous {os.path.basename(path)} is intact" if os.path.exists(path) else ""
    return CheckpointWriteError(f"{folder}: cannot write {os.path.basename(path)} ({reason}): {needs}{has}{kept}; "
                                "free space (or make the folder writable) and run again with --resume",
                                getattr(err, "errno", None))


def atomic_write_text(path, text):
    def write(temp):
        with open(temp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write, expected_bytes=len(text.encode()))


def remove_stale_temp_files(folder):
    """Temporary files a killed run left behind (they are never the only copy of anything)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(TEMP_PREFIX):
                os.remove(os.path.join(folder, name))


def save_model_atomic(model, path):
    # keras wants the .keras suffix on the temp file
    atomic_write(path, model.save, suffix=".keras", expected_bytes=lambda: _model_bytes(model, path))


def _model_bytes(model, path):
    """About the size of ``model``'s ``.keras`` file: the file it replaces, else its variables' bytes."""
    if os.path.exists(path):
        return os.path.getsize(path)
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.variables) + (list(optimizer.variables) if optimizer is not None else [])
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)) + 65536


class PassEpoch(keras.callbacks.Callback):
    """Sets ``variable`` to the epoch about to start (``make_dataset(epoch=variable)`` draws its pass from it)."""

    def __init__(self, variable):
        super().__init__()
        self.variable = variable

    def on_epoch_begin(self, epoch, logs=None):
        self.variable.assign(epoch)


class Checkpoints(keras.callbacks.Callback):
    """``last.keras`` every epoch, ``best.keras`` when ``monitor`` improves, then ``state.json``; all atomic.

    Epochs whose logs lack ``monitor`` (no evaluation that epoch) leave ``best.keras`` alone
    without a warning. ``best`` (from a previous run's ``state.json``) keeps a resumed run
    from overwriting a better ``best.keras``.
    """

    def __init__(self, work_dir, monitor=None, mode="max", best=None, extra_state=None):
        super().__init__()
        self.extra_state = extra_state  # a callable: more entries for state.json
        self.work_dir = work_dir
        self.monitor = monitor
        self.better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
        self.best = dict(best) if best else None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = logs.get(self.monitor) if self.monitor else None
        if value is not None and math.isfinite(float(value)) and (
                self.best is None or self.better(float(value), self.best["value"])):
            save_model_atomic(self.model, os.path.join(self.work_dir, "best.keras"))
            self.best = dict(monitor=self.monitor, value=float(value), epoch=epoch + 1)
        self.write_last(epoch + 1)

    def write_last(self, epochs_done, steps_done=0, more=None):
        """``last.keras`` then ``state.json``: ``epochs_done`` whole epochs plus ``steps_done`` steps of the next
        (a mid-epoch checkpoint, kdet.training.preemption); ``more``: further ``state.json`` entries."""
        save_model_atomic(self.model, os.path.join(self.work_dir, "last.keras"))
        state = dict(epochs_done=epochs_done, iterations=int(self.model.optimizer.iterations.numpy()))
        if steps_done:
            state["steps_done"] = int(steps_done)
        if self.best:
            state["best"] = self.best
        if self.extra_state:
            state.update(self.extra_state())
        state.update(more or {})
        atomic_write_text(os.path.join(self.work_dir, "state.json"), json.dumps(state, indent=1))


class EarlyStoppingOnEvaluations(keras.callbacks.EarlyStopping):
    """``EarlyStopping`` over the evaluated epochs that never stops a run before it has learnt something.

    Epochs whose logs lack ``monitor`` (no evaluation) are skipped without a warning. A stop that
    patience asks for is held while the best value is below ``min_value`` (val_AP at noise level:
    nothing measurable learnt yet, so "no improvement" is noise too) or before ``min_fraction`` of
    ``planned_epochs()`` (the plan, re-paced by a time budget) is done; each hold prints why.
    """

    def __init__(self, min_value=0.0, min_fraction=0.0, planned_epochs=None, **kwargs):
        super().__init__(**kwargs)
        self.min_value = float(min_value or 0.0)
        self.min_fraction = float(min_fraction or 0.0)
        self.planned_epochs = planned_epochs
        self.holds = []  # (epoch, reason) of every stop held back

    def get_monitor_value(self, logs):
        return (logs or {}).get(self.monitor)

    def on_epoch_end(self, epoch, logs=None):
        stopping_already = self.model.stop_training  # another callback's stop (the time budget) is not ours
        super().on_epoch_end(epoch, logs)
        if stopping_already or self.stopped_epoch != epoch or not self.model.stop_training:
            return
        reason = self.hold_reason(epoch)
        if reason:
            self.model.stop_training, self.stopped_epoch = False, 0
            self.holds.append((epoch, reason))
            logger.info(f"early stopping held at epoch {epoch + 1}: {reason}")

    def hold_reason(self, epoch):
        """Why a stop after ``epoch`` (0-based) would be premature, or None."""
        if self.best is None or self.best < self.min_value:
            best = "none" if self.best is None or not np.isfinite(self.best) else f"{self.best:.4f}"
            return (f"the best {self.monitor} ({best}) is below {self.min_value:g}, its noise level "
                    "(train.early_stopping_min_value): nothing measurable learnt yet")
        planned = int(self.planned_epochs()) if self.planned_epochs else None
        if planned and epoch + 1 < self.min_fraction * planned:
            return (f"{epoch + 1} of {planned} planned epochs done, under "
                    f"train.early_stopping_min_fraction={self.min_fraction:g} of the plan")
        return None


class CSVLog(keras.callbacks.Callback):
    """``log.csv``: one row per epoch, a column for every key that ever appears in the epoch logs.

    Columns are ``epoch`` then the keys in order of first appearance; a key missing from an
    epoch (``val_AP`` on epochs without evaluation) is an empty cell. The whole file is
    rewritten atomically each epoch (so a column appearing later is added to the header).
    ``keep_epochs`` rows of an existing file are kept (a resumed run; later rows are the
    epochs it repeats and are dropped), ``keep_epochs=0`` starts a new file.
    """

    def __init__(self, path, keep_epochs=0):
        super().__init__()
        self.path = path
        self.rows = [row for row in read_log(path) if int(float(row["epoch"])) < keep_epochs] if keep_epochs else []

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch}
        row.update({key: _cell(value) for key, value in (logs or {}).items()})
        self.rows = [r for r in self.rows if int(float(r["epoch"])) != epoch] + [row]
        atomic_write_text(self.path, format_log(self.rows))


def _cell(value):
    value = keras.ops.convert_to_numpy(value) if not isinstance(value, (int, float, str)) else value
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else " ".join(str(v) for v in value.ravel())
    return repr(float(value)) if isinstance(value, (float, np.floating)) else value


def read_log(path):
    """The rows of a ``log.csv`` as dicts (strings; empty cells ``""``); none when there is no file."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("epoch") not in (None, "")]


def format_log(rows):
    columns = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
