"""Long runs: stopping cleanly on SIGTERM / SIGINT, periodic mid-epoch checkpoints, and resuming mid-epoch.

* **Signals** (:class:`SignalStop`): spot / preemptible machines and job schedulers send SIGTERM
  (or SIGINT) and allow a short grace period. While ``fit`` runs, the first signal is only noted;
  :class:`MidEpochCheckpoint` then lets the current step finish, writes ``last.keras`` (weights and
  optimizer) and ``state.json`` (the pass and the step in it, the time budget's clock, the epoch's
  running metrics) and raises :class:`Interrupted`, which ``tools/train.py`` turns into one line
  ``stopped by SIGTERM at epoch E, step S of N; resume with --resume`` and exit status 128 + the
  signal's number (143 for SIGTERM, 130 for SIGINT, as a shell reports a process the signal ended).
  A signal during an epoch's end (evaluation, checkpoints) is acted on when that work is done;
  a signal before the first step or after the last epoch stops at once (nothing unsaved). A second
  signal exits at once (status 128 + its number); the files on disk are always a complete set,
  because every file is written to a temporary name and renamed (kdet.training.callbacks.atomic_write).
* **Periodic checkpoints** (``train.checkpoint_every_minutes``): the same mid-epoch checkpoint at
  the first step end after that many minutes since the last one, so a kill -9 / OOM kill / power
  loss loses at most that much work (plus one step).
* **Resume mid-epoch** (:func:`fit_resumable`): ``--resume`` from a checkpoint at step S of epoch E
  first trains the rest of pass E (the pipeline's ``skip_batches`` variable makes the pass leave
  out its first S batches before decoding them; the pass order and augmentation come from
  ``(train.seed, epoch)``), then the following epochs. The optimizer's step count comes back with
  the checkpoint, so the learning-rate schedule continues where it was. The run equals one without
  the break (same batches in the same order, same learning rates) to float rounding.

What Keras and TensorFlow offer, and why kdet does not use it here:

* ``keras.callbacks.BackupAndRestore(save_freq=N)`` saves every N batches, but on restore it
  restarts the interrupted epoch from its first batch (only the epoch number is read back), so
  the batches before the save are trained twice; it writes its files in place (a kill mid-write
  leaves a broken backup), counts batches rather than minutes, has no signal handling, and
  deletes its backup when ``fit`` ends. kdet's ``last.keras`` + ``state.json`` are already the
  resume point of ``--resume``; the mid-epoch checkpoint is the same pair, one step count further.
* ``tf.distribute.experimental.PreemptionCheckpointHandler`` coordinates a save across workers
  when one is preempted, but it drives a custom training loop (``handler.run(step_fn)``) with a
  ``tf.train.Checkpoint``, not Keras 3's ``fit`` and ``.keras`` files; Keras 3 dropped the
  ``save_before_preemption`` hook Keras 2 had. Under ``train.strategy="multiworker"`` kdet instead
  agrees on a stop across the workers at every step (:meth:`MidEpochCheckpoint._agreed_signal`).
"""

import os
import signal
import time

import keras

from kdet.training.signals import Interrupted, SignalStop  # noqa: F401  (re-exported)


def _injected_signal():
    """``KDET_TEST_SIGNAL_AT="SIGTERM:E:S"`` (tests only): send that signal to this process after step S of epoch E."""
    spec = os.environ.get("KDET_TEST_SIGNAL_AT")
    if not spec:
        return None
    name, epoch, step = spec.split(":")
    return getattr(signal, name), int(epoch), int(step)


class MidEpochCheckpoint(keras.callbacks.Callback):
    """Mid-epoch checkpoints (on a signal, and every ``every_minutes``) and the stop a signal asks for.

    Args:
        checkpoints: the run's :class:`~kdet.training.callbacks.Checkpoints` (it writes the files).
        steps_per_epoch: N, the optimizer steps of an epoch.
        every_minutes: periodic checkpoints (None or 0: none).
        stop: the run's :class:`SignalStop` (None: no signal handling).
        start: ``(epoch, step)`` the run resumes at; that epoch's batches are numbered from ``step``.
        metrics_state: the running metrics of the resumed epoch, restored when it begins.
        multi_worker: the ``tf.distribute`` strategy when it spans workers (the stop is agreed on).
    """

    def __init__(self, checkpoints, steps_per_epoch, every_minutes=None, stop=None, start=(0, 0),
                 metrics_state=None, multi_worker=None, clock=time.monotonic, verbose=1):
        super().__init__()
        self.checkpoints = checkpoints
        self.steps_per_epoch = int(steps_per_epoch)
        self.every_s = float(every_minutes) * 60.0 if every_minutes else None
        self.stop = stop
        self.start = tuple(start)
        self.metrics_state = metrics_state
        self.multi_worker = multi_worker
        self.clock = clock
        self.verbose = verbose
        self.injected = _injected_signal()
        self.saves = []   # (epoch, step, seconds, bytes) of each mid-epoch checkpoint
        self.epoch, self.offset = self.start[0], 0
        self._add_metrics = False
        self._agree = None

    # ------------------------------------------------------------ Keras hooks
    def on_train_begin(self, logs=None):
        self._last_save = self.clock()
        if self.stop is not None:
            self.stop.deferred = True
        signum = self._agreed_signal()
        if signum is not None:   # arrived before fit: nothing trained in this process yet
            raise Interrupted(signum, "before training started (nothing to save)")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.offset = self.start[1] if epoch == self.start[0] else 0
        self._add_metrics = epoch == self.start[0] and bool(self.metrics_state)
        signum = self._agreed_signal()
        if signum is not None:   # the previous epoch's end (and its checkpoint) is done: nothing new to save
            raise Interrupted(signum, f"at epoch {epoch + 1}, step {self.offset} of {self.steps_per_epoch}")

    def on_train_batch_end(self, batch, logs=None):
        step = self.offset + batch + 1
        if self._add_metrics:   # after the first step: Keras builds the compiled metrics when it traces it
            self._add_metrics = False
            add_metrics(self.model, self.metrics_state)
        if self.injected and self.injected[1:] == (self.epoch, step):
            os.kill(os.getpid(), self.injected[0])
            self.injected = None
        last_step = step >= self.steps_per_epoch   # the epoch's end writes its own checkpoint
        signum = self._agreed_signal() if not last_step else None
        if signum is not None:
            self.save(step)
            raise Interrupted(signum, f"at epoch {self.epoch + 1}, step {step} of {self.steps_per_epoch}")
        if self.every_s and not last_step and self.clock() - self._last_save >= self.every_s:
            self.save(step)

    def on_epoch_end(self, epoch, logs=None):
        self._last_save = self.clock()   # Checkpoints has just written last.keras

    def on_train_end(self, logs=None):
        if self.stop is None:
            return
        self.stop.deferred = False
        done = self.epoch + 1
        self.stop.phase = f"after epoch {done}, the last, in the final evaluation and export"
        signum = self._agreed_signal()
        if signum is not None:
            raise Interrupted(signum, f"after epoch {done}, the last, before the final evaluation and export")

    # ------------------------------------------------------------ the checkpoint
    def save(self, step):
        """``last.keras`` + ``state.json`` at ``step`` of the current epoch (written atomically, in that order)."""
        started = self.clock()
        self.checkpoints.write_last(self.epoch, steps_done=step, more=dict(metrics=metrics_state(self.model)))
        seconds = self.clock() - started
        self._last_save = self.clock()
        path = os.path.join(self.checkpoints.work_dir, "last.keras")
        size = os.path.getsize(path) if os.path.exists(path) else 0
        self.saves.append((self.epoch, step, seconds, size))

    def _agreed_signal(self):
        """The pending signal; under multi-worker, any worker's (every worker calls this at the same step)."""
        local = self.stop.pending if self.stop is not None else None
        if self.multi_worker is None:
            return local
        import tensorflow as tf

        numbers = [int(signal.SIGTERM), int(signal.SIGINT)]
        flags = [1 if local == number else 0 for number in numbers]   # ReduceOp has SUM and MEAN, not MAX
        if self._agree is None:   # a compiled all-reduce (eager collectives warn of their overhead at every step)
            strategy = self.multi_worker
            self._agree = tf.function(lambda f: strategy.reduce("SUM", strategy.run(lambda: tf.identity(f)), axis=None))
        counts = [int(v) for v in self._agree(tf.constant(flags, tf.int32)).numpy()]
        if local is not None:
            return local
        return next((number for number, count in zip(numbers, counts) if count), None)


# ------------------------------------------------------------ the running metrics of an epoch
def metrics_state(model):
    """The values of ``model.metrics``' variables (the epoch's running loss means), as lists."""
    return [[keras.ops.convert_to_numpy(v).tolist() for v in metric.variables] for metric in model.metrics]


def add_metrics(model, state):
    """Add :func:`metrics_state`'s values to the metrics (skipped when they do not match, say after a recipe edit).

    Keras' running means (``Mean``: total and count) and kdet's ``MultiBoxParts`` (sums and a step
    count) accumulate by addition, so the resumed epoch's first steps plus the saved values are what
    the epoch without the break had at that step.
    """
    import numpy as np

    metrics = model.metrics
    if len(metrics) != len(state):
        return False
    pairs = [(v, np.asarray(value)) for metric, values in zip(metrics, state)
             for v, value in zip(metric.variables, values)]
    if any(tuple(v.shape) != value.shape for v, value in pairs) or \
            sum(len(m.variables) for m in metrics) != sum(len(values) for values in state):
        return False
    for variable, value in pairs:
        variable.assign_add(value.astype(variable.dtype))
    return True


# ------------------------------------------------------------ fit, resumed mid-epoch
class _OneRun(keras.callbacks.CallbackList):
    """The callbacks of two ``fit`` calls seen as one run: one ``on_train_begin``, one ``on_train_end``."""

    began = False
    last_fit = False

    def on_train_begin(self, logs=None):
        if not self.began:
            self.began = True
            super().on_train_begin(logs)

    def on_train_end(self, logs=None):
        if self.last_fit:
            super().on_train_end(logs)


def fit_resumable(model, dataset, *, epochs, initial_epoch, callbacks, verbose, steps_per_epoch, resume_step=0,
                  skip_batches=None, tail_dataset=None):
    """``model.fit``; resumed at step ``resume_step`` of ``initial_epoch``, first the rest of that epoch.

    ``tail_dataset`` is the pass with its first ``resume_step`` batches left out (its pipeline reads
    ``skip_batches``, set here to ``resume_step`` and then back to 0). The two ``fit`` calls share
    one callback list that sees one run (one History, one ``on_train_begin`` / ``on_train_end``), and
    the moving average (``use_ema``) is written into the weights only after the second, as one fit does.
    Returns the History.
    """
    if not resume_step:
        return model.fit(dataset, epochs=epochs, initial_epoch=initial_epoch, callbacks=callbacks, verbose=verbose,
                         shuffle=False)
    run = _OneRun(callbacks, add_history=True, add_progbar=verbose != 0, verbose=verbose, epochs=epochs,
                  steps=steps_per_epoch, model=model)
    history = next(c for c in run.callbacks if isinstance(c, keras.callbacks.History))
    skip_batches.assign(resume_step)
    model.optimizer.finalize_variable_values = lambda var_list: None   # the EMA swap waits for the run's end
    try:
        model.fit(tail_dataset, epochs=initial_epoch + 1, initial_epoch=initial_epoch, callbacks=run,
                  verbose=verbose, shuffle=False)
    finally:
        del model.optimizer.finalize_variable_values
        skip_batches.assign(0)
    stopped = model.stop_training
    run.last_fit = True
    # the rest of the run; a stopped (or finished) run's fit has no epoch left, only the run's end
    rest_from = initial_epoch + 1
    model.fit(dataset, epochs=rest_from if stopped else max(epochs, rest_from), initial_epoch=rest_from,
              callbacks=run, verbose=verbose, shuffle=False)
    return history
