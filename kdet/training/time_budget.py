"""``train.time_budget``: as many epochs as fit in a training-time budget (Ultralytics' ``time=``).

The recipe's ``train.epochs`` is the *plan*: its learning-rate schedule (warm-up, step drops,
cosine) and its augmentation phases (``data.close_mosaic``) are laid out over it. With a budget,
:class:`TimeBudget` measures the epochs as they run and fits the plan to the time:

* **Cost of an epoch**: the time since the end of the run's first optimizer step (which holds the
  tracing and compilation) over the epochs done since then; it includes the epoch-end work that
  has happened (checkpoints, ``val_AP`` evaluations), averaged over the epochs, as Ultralytics'
  mean epoch time does.
* **Decision**, after every epoch: ``epochs = done + round(time left / cost)``; the first one is
  printed (``time_budget 23 min: epoch 1 took 19.2 s -> 68 epochs``), later ones when the count
  changes. The learning-rate schedule (a :class:`~kdet.training.optim.FittedSchedule`) then plays
  the rest of the plan in the epochs left, mosaic is switched off for the matching share of
  the last epochs, and the periodic evaluations (``eval.every_n_epochs``, :meth:`TimeBudget.pace`)
  keep their share of the plan: every 10 of 72 planned epochs is every 13 of 97 decided ones,
  and the last epoch is always evaluated.
* **Stop**: after the last decided epoch, or after the first epoch that ends past the budget (so
  a wrong estimate runs past it by less than one epoch).
* **Resume**: the decision and the time used so far go into ``state.json`` (:meth:`state`); a
  resumed run starts from them and measures its own epochs afresh.

The clock runs from ``fit``'s start (data loading and pre-flight before it, the final test
evaluation and export after it, are outside, as in Ultralytics).
"""

import time

import keras

from kdet.log import get_logger

logger = get_logger(__name__)

NEVER = 2 ** 62  # a mosaic_off_from epoch that never comes


class TimeBudget(keras.callbacks.Callback):
    """Fits the number of epochs, the learning-rate schedule and the mosaic phase to ``minutes`` of training.

    Args:
        minutes: the budget.
        planned_epochs: the recipe's ``train.epochs`` (the plan the schedule was built for).
        steps_per_epoch: optimizer steps per epoch.
        close_mosaic: ``data.close_mosaic`` of the plan (mosaic off for its last N epochs); 0: none.
        mosaic_off_from: the pipeline's ``tf.Variable`` (int64) holding the first epoch without mosaic.
        resumed: the ``time_budget`` entry of a resumed run's ``state.json`` (``epochs``, ``elapsed_s``).
        progbar: the fit's ``keras.callbacks.ProgbarLogger``, whose "Epoch i/N" is kept up to date.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, minutes, planned_epochs, steps_per_epoch, close_mosaic=0, mosaic_off_from=None,
                 resumed=None, progbar=None, clock=time.monotonic, verbose=1):
        super().__init__()
        if not minutes or minutes <= 0:
            raise ValueError(f"train.time_budget must be a number of minutes > 0, got {minutes!r}")
        self.budget_s = float(minutes) * 60.0
        self.minutes = float(minutes)
        self.planned_epochs = int(planned_epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.close_mosaic = int(close_mosaic or 0)
        self.mosaic_off_from = mosaic_off_from
        self.epochs = int(resumed["epochs"]) if resumed else self.planned_epochs
        self.used_before_s = float(resumed["elapsed_s"]) if resumed else 0.0
        self.progbar = progbar
        self.clock = clock
        self.verbose = verbose
        self.decided = bool(resumed) and bool(resumed.get("decided", True))  # a mid-epoch stop can precede it
        self.skipped_steps = 0  # a run resumed mid-epoch: the steps of its first epoch done before the break
        self.resumed_mosaic_off = resumed.get("mosaic_off_from") if resumed else None
        self.stopped_by_budget = False
        self.epoch_seconds = None
        self._paced = []  # (callback, its planned every_n_epochs)

    def pace(self, callback):
        """Re-pace ``callback.every_n_epochs`` (a periodic evaluation) with the plan; its ``final_epoch``, if it
        has one, is set to the run's last epoch so that epoch is evaluated too."""
        self._paced.append((callback, int(callback.every_n_epochs)))
        return callback

    # ------------------------------------------------------------ state
    def elapsed(self):
        """Seconds of the budget used so far (this fit and the runs it resumes)."""
        return self.used_before_s + self.clock() - self._fit_start

    def state(self):
        """What ``state.json`` keeps for ``--resume``."""
        state = dict(minutes=self.minutes, epochs=self.epochs, elapsed_s=round(self.elapsed(), 3),
                     epoch_seconds=None if self.epoch_seconds is None else round(self.epoch_seconds, 3))
        if not self.decided:
            state["decided"] = False
        if self.mosaic_off_from is not None:
            state["mosaic_off_from"] = int(self.mosaic_off_from.numpy())
        return state

    def fit_epochs(self, initial_epoch, most=1_000_000):
        """``fit``'s ``epochs``: ``most`` (this callback stops the run), or none left for a finished resumed run."""
        finished = self.decided and (initial_epoch >= self.epochs or self.used_before_s >= self.budget_s)
        return initial_epoch if finished else most

    # ------------------------------------------------------------ Keras hooks
    def on_train_begin(self, logs=None):
        self._fit_start = self.clock()
        self._first_step_end = None
        self._epochs_in_fit = 0
        self._cut_at_step = None
        self._show_epochs()
        if self.mosaic_off_from is not None:  # resumed: the last decision stands
            planned = self.planned_epochs - self.close_mosaic if self.close_mosaic else NEVER
            off = self.resumed_mosaic_off if self.resumed_mosaic_off is not None else planned
            self.mosaic_off_from.assign(max(0, off))
        self._pace_evaluations(self.epochs)

    def on_train_batch_end(self, batch, logs=None):
        if self._first_step_end is None:
            self._first_step_end = self.clock()
        elif not self.model.stop_training and self.elapsed() >= self.budget_s:
            # the budget is wall-clock: a long epoch is cut at the step that uses it up, not finished
            self.model.stop_training = True
            self._cut_at_step = batch + 1

    def on_epoch_end(self, epoch, logs=None):
        self._epochs_in_fit += 1
        done = epoch + 1
        used = self.elapsed()
        if used >= self.budget_s:
            cut = getattr(self, "_cut_at_step", None)
            self.stopped_by_budget = done < self.epochs or cut is not None
            self._pace_evaluations(done)  # this epoch is the last: it is evaluated (the callbacks come after)
            where = f"at step {cut} of epoch {done}" if cut is not None else f"after epoch {done}"
            self._stop(done, f"time_budget {self.minutes:g} min used up ({used / 60:.2f} min) {where}")
            return
        self._decide(done, used)
        if done >= self.epochs:
            self._stop(done, None)

    # ------------------------------------------------------------ the fit
    def _decide(self, done, used):
        """Epochs that fill the budget, from the mean cost of this fit's epochs; re-fit the plan to them."""
        # the first step holds the compilation; a run resumed mid-epoch skipped the first steps of its first epoch
        steps_done = self._epochs_in_fit - (1.0 + self.skipped_steps) / self.steps_per_epoch
        if steps_done <= 0:  # one step per epoch and one epoch so far: nothing measured yet
            return
        self.epoch_seconds = (self.clock() - self._first_step_end) / steps_done
        epochs = done + max(0, int(round((self.budget_s - used) / self.epoch_seconds)))
        if epochs == self.epochs and self.decided:
            return
        first = not self.decided
        self.epochs, self.decided = epochs, True
        self._fit_plan(done)
        self._show_epochs()
        if self.verbose:
            if first:
                logger.info(f"\ntime_budget {self.minutes:g} min: epoch {done} took {self.epoch_seconds:.1f} s "
                            f"(first step's compilation excluded) -> {epochs} epochs{self._mosaic_note()}")
            else:
                logger.info(f"\ntime_budget: {self.epoch_seconds:.1f} s per epoch over the last {self._epochs_in_fit} "
                            f"-> {epochs} epochs{self._mosaic_note()}")

    def _fit_plan(self, done):
        from kdet.training.optim import find_fitted_schedule

        schedule = find_fitted_schedule(self.model.optimizer)
        step = done * self.steps_per_epoch
        if schedule is not None:
            schedule.fit_rest(step, self.epochs * self.steps_per_epoch)
        if self.mosaic_off_from is not None:
            self.mosaic_off_from.assign(self.fitted_mosaic_off_epoch(done, schedule))
        self._pace_evaluations(self.epochs)

    def _pace_evaluations(self, last_epoch):
        """Every paced callback: its planned share of the epochs (at least 1), and ``last_epoch`` evaluated."""
        for callback, planned_every in self._paced:
            callback.every_n_epochs = max(1, int(round(planned_every * self.epochs / self.planned_epochs)))
            if hasattr(callback, "final_epoch"):
                callback.final_epoch = int(last_epoch)

    def fitted_mosaic_off_epoch(self, done, schedule):
        """The first epoch without mosaic: where the re-paced plan reaches its last ``close_mosaic`` epochs.

        Without a fitted schedule, the plan's share of epochs (``close_mosaic / planned_epochs``).
        Never before the next epoch (the past is done) and, with ``close_mosaic >= 1``, at least
        one epoch before the end.
        """
        current = int(self.mosaic_off_from.numpy())
        if not self.close_mosaic or current <= done:  # none, or already off: stays off
            return current
        planned_off = (self.planned_epochs - self.close_mosaic) * self.steps_per_epoch
        step = schedule.step_at(planned_off) if schedule is not None else None
        if step is not None:
            epoch = int(round(step / self.steps_per_epoch))
        else:
            epoch = int(round(self.epochs * (1 - self.close_mosaic / self.planned_epochs)))
        return max(done, min(epoch, self.epochs - 1))

    def _mosaic_note(self):
        if self.mosaic_off_from is None or not self.close_mosaic:
            return ""
        return f", mosaic off for the last {self.epochs - int(self.mosaic_off_from.numpy())}"

    def _stop(self, done, message):
        self.model.stop_training = True
        if message and self.verbose:
            plan = f"decided {self.epochs} epochs" if self.decided else "no epoch after the first step to time yet"
            logger.info(f"\n{message}; stopping ({plan})")

    def _show_epochs(self):
        if self.progbar is not None:
            self.progbar.epochs = self.epochs
