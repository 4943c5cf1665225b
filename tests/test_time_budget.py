"""train.time_budget (epochs fitted to minutes, the LR schedule re-paced) and data.close_mosaic (mosaic off
for the last epochs, switched in the input pipeline by the epoch variable)."""

import csv
import json
import math
import os
import types

import numpy as np
import pytest

from kdet.data.records import Record


# ------------------------------------------------------------------ FittedSchedule
def cosine_reference(step, base_lr=1.0, total=100, warmup=10):
    """The planned schedule, by hand: linear warm-up from 0.001x, then cosine to 0 over ``total``."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
    factor = 0.001 * (1 - min(step / warmup, 1.0)) + min(step / warmup, 1.0)
    return base_lr * cosine * factor


def test_fitted_schedule_plays_the_rest_of_the_plan_in_the_steps_left_and_survives_saving():
    import keras

    from kdet.training.optim import FittedSchedule, cosine_schedule

    schedule = FittedSchedule(cosine_schedule(1.0, 100, warmup_steps=10), planned_steps=100)
    lr = lambda s: float(keras.ops.convert_to_numpy(schedule(s)))  # noqa: E731
    for step in (0, 5, 20, 70):  # not re-fitted: the plan itself
        assert lr(step) == pytest.approx(cosine_reference(step), rel=1e-5)
    before = lr(20)
    schedule.fit_rest(20, total_steps=60)  # the budget allows 60 steps, not 100: 80 planned steps in 40
    assert lr(20) == pytest.approx(before, rel=1e-6)  # no jump
    for step in (30, 45, 59):
        assert lr(step) == pytest.approx(cosine_reference(20 + (step - 20) * 2.0), rel=1e-4, abs=1e-7), step
    assert lr(60) == pytest.approx(0.0, abs=1e-7)  # the plan's end at the run's end
    assert schedule.step_at(80) == pytest.approx(50.0)  # planned step 80 comes at step 20 + 60 / 2
    schedule.fit_rest(40, total_steps=80)  # slower again: the 40 planned steps left over 40 steps
    assert lr(60) == pytest.approx(cosine_reference(80), rel=1e-4)

    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    for step in (40, 55, 79):
        assert float(keras.ops.convert_to_numpy(restored(step))) == pytest.approx(lr(step), rel=1e-6)


# ------------------------------------------------------------------ TimeBudget, on a fake clock
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def budget_and_model(minutes=1.0, planned=10, steps=4, close_mosaic=2, resumed=None, clock=None):
    import keras
    import tensorflow as tf

    from kdet.training.optim import FittedSchedule, cosine_schedule
    from kdet.training.time_budget import TimeBudget

    schedule = FittedSchedule(cosine_schedule(1.0, planned * steps), planned_steps=planned * steps)
    model = types.SimpleNamespace(optimizer=keras.optimizers.SGD(learning_rate=schedule), stop_training=False)
    mosaic_off = tf.Variable(0, dtype=tf.int64)
    budget = TimeBudget(minutes, planned, steps, close_mosaic=close_mosaic, mosaic_off_from=mosaic_off,
                        resumed=resumed, clock=clock or Clock(), verbose=1)
    budget.set_model(model)
    return budget, model, schedule, mosaic_off


def run_epoch(budget, epoch, steps, seconds_per_step, compile_seconds=0.0):
    budget.on_epoch_begin(epoch)
    for batch in range(steps):
        budget.clock.now += seconds_per_step + (compile_seconds if batch == 0 else 0.0)
        budget.on_train_batch_end(batch)
    budget.on_epoch_end(epoch)


def test_first_epoch_without_its_compilation_decides_the_epochs_and_the_mosaic_phase(capsys):
    budget, model, schedule, mosaic_off = budget_and_model()
    budget.on_train_begin()
    assert int(mosaic_off.numpy()) == 8  # the plan: 10 epochs, mosaic off for the last 2
    run_epoch(budget, 0, 4, seconds_per_step=1.0, compile_seconds=4.0)  # 8 s, of which 4 s compilation
    # 3 s for the 3 steps after the first: 4 s an epoch; 60 - 8 s left: 13 more epochs
    assert budget.epochs == 14 and not model.stop_training
    assert "time_budget 1 min: epoch 1 took 4.0 s (first step's compilation excluded) -> 14 epochs" in \
        capsys.readouterr().out
    # planned steps 4..40 now over steps 4..56: planned step 32 (mosaic off) at 4 + 28 * 52 / 36 = 44.4 -> epoch 11
    assert float(schedule.pace.numpy()[2]) == pytest.approx(36 / 52)
    assert int(mosaic_off.numpy()) == 11
    for epoch in range(1, 14):
        assert not model.stop_training, epoch
        run_epoch(budget, epoch, 4, seconds_per_step=1.0)
    assert model.stop_training and budget.epochs == 14
    assert budget.elapsed() == pytest.approx(60.0)
    assert float(schedule(14 * 4).numpy()) == pytest.approx(0.0, abs=1e-6)  # the plan's end at the run's end


def test_a_slower_machine_than_measured_stops_within_one_epoch_of_the_budget():
    budget, model, _, _ = budget_and_model()
    budget.on_train_begin()
    run_epoch(budget, 0, 4, seconds_per_step=1.0, compile_seconds=4.0)  # decides 14 epochs of 4 s
    epoch = 1
    while not model.stop_training:
        run_epoch(budget, epoch, 4, seconds_per_step=3.0)  # then every epoch takes 12 s
        epoch += 1
        assert epoch < 20
    assert budget.epochs == epoch < 14
    assert abs(budget.elapsed() - 60.0) <= 12.0  # within one (slow) epoch of the budget
    # a single epoch that eats the rest: the budget stops the run after it
    budget, model, _, _ = budget_and_model()
    budget.on_train_begin()
    run_epoch(budget, 0, 4, seconds_per_step=1.0, compile_seconds=4.0)
    run_epoch(budget, 1, 4, seconds_per_step=20.0)
    assert model.stop_training and budget.stopped_by_budget and budget.elapsed() == pytest.approx(88.0)


def test_a_long_epoch_is_cut_at_the_step_that_uses_the_budget_up(capsys):
    """Epoch-sized overshoot is unfair in a race at equal time: the step that reaches the budget stops the fit."""
    budget, model, _, _ = budget_and_model()
    budget.on_train_begin()
    run_epoch(budget, 0, 4, seconds_per_step=1.0, compile_seconds=4.0)  # 8 s: decides 14 epochs of 4 s
    budget.on_epoch_begin(1)
    stopped_at = None
    for batch in range(4):  # 20 s a step now: 28, 48, 68 s -> the third step of epoch 2 uses the minute up
        budget.clock.now += 20.0
        budget.on_train_batch_end(batch)
        if model.stop_training:
            stopped_at = batch + 1
            break  # as Keras' fit loop does
    budget.on_epoch_end(1)
    assert stopped_at == 3 and budget.stopped_by_budget and budget.elapsed() == pytest.approx(68.0)
    assert "time_budget 1 min used up (1.13 min) at step 3 of epoch 2" in capsys.readouterr().out


def test_resumed_budget_keeps_the_decision_and_the_time_used():
    budget, model, schedule, mosaic_off = budget_and_model()
    budget.on_train_begin()
    for epoch in range(3):
        run_epoch(budget, epoch, 4, seconds_per_step=1.0, compile_seconds=4.0 if epoch == 0 else 0.0)
    state = json.loads(json.dumps(budget.state()))  # through state.json
    assert state == dict(minutes=1.0, epochs=14, elapsed_s=16.0, epoch_seconds=4.0, mosaic_off_from=11)

    clock = Clock()
    clock.now = 100.0  # a fresh process: its own clock
    resumed, model2, _, mosaic_off2 = budget_and_model(resumed=state, clock=clock)
    resumed.on_train_begin()
    assert int(mosaic_off2.numpy()) == 11 and resumed.epochs == 14 and resumed.elapsed() == 16.0
    for epoch in range(3, 13):
        assert not model2.stop_training
        run_epoch(resumed, epoch, 4, seconds_per_step=1.0, compile_seconds=4.0 if epoch == 3 else 0.0)
    # the resumed process compiled again (4 s of the budget): 13 epochs fit, not 14
    assert model2.stop_training and resumed.epochs == 13 and resumed.elapsed() == pytest.approx(60.0)
    assert 4 <= int(mosaic_off2.numpy()) <= 12
    # resumed once more, after the end: no epoch left to run
    finished, _, _, _ = budget_and_model(resumed=resumed.state())
    assert finished.fit_epochs(13) == 13 and resumed.fit_epochs(12) > 13


# ------------------------------------------------------------------ close_mosaic in the input pipeline
COLORS = [(16 * i, 255 - 16 * i, (80 * i) % 256) for i in range(16)]


def solid_records():
    return [Record(image_id=i, image_path=None, width=32, height=32, boxes=[[4, 4, 28, 28]], classes=[0],
                   image=np.full((32, 32, 3), color, np.uint8)) for i, color in enumerate(COLORS)]


def one_pass(dataset):
    images, targets = zip(*[(i.numpy(), t.numpy()) for i, t in dataset])
    return np.concatenate(images), np.concatenate(targets)


def colors_per_image(images):
    return [len(np.unique(image.reshape(-1, 3), axis=0)) for image in images]


@pytest.mark.parametrize("workers", [0, 2])
def test_close_mosaic_switches_mosaic_off_at_the_epoch_and_a_resumed_run_agrees(workers):
    import tensorflow as tf

    from kdet.data.augment import mosaic
    from kdet.data.pipeline import close_worker_pools, make_dataset

    def dataset(epoch, off_from):
        return make_dataset(solid_records(), image_size=32, batch_size=8, augment=[mosaic(p=1.0)], max_boxes=8,
                            seed=3, workers=workers, epoch=epoch, mosaic_off_from=off_from)

    try:
        epoch, off_from = tf.Variable(0, dtype=tf.int64), tf.Variable(1, dtype=tf.int64)  # close_mosaic=1 of 2
        ds = dataset(epoch, off_from)
        first_images, first_targets = one_pass(ds)
        epoch.assign(1)
        second_images, second_targets = one_pass(ds)
        # epoch 0: mosaics (several tiles, boxes from several images); epoch 1: each image as it is
        assert min(colors_per_image(first_images)) >= 2
        assert np.mean((first_targets[:, :, 4] >= 0).sum(1)) > 2
        assert colors_per_image(second_images) == [1] * 16
        assert sorted(tuple(i[0, 0]) for i in second_images) == sorted(COLORS)
        assert ((second_targets[:, :, 4] >= 0).sum(1) == 1).all()
        np.testing.assert_allclose(second_targets[:, 0, :4], [[0.125, 0.125, 0.875, 0.875]] * 16)
        # resumed at epoch 1: a new dataset (as a new process builds it) gives the same pass, and epoch 0
        # the same mosaics: the switch depends on the epoch, not on how often the dataset was iterated
        epoch2 = tf.Variable(1, dtype=tf.int64)
        resumed = dataset(epoch2, tf.Variable(1, dtype=tf.int64))
        np.testing.assert_array_equal(one_pass(resumed)[0], second_images)
        epoch2.assign(0)
        np.testing.assert_array_equal(one_pass(resumed)[0], first_images)
    finally:
        close_worker_pools()


# ------------------------------------------------------------------ the engine, a real tiny run
class VirtualTimeBudget:
    """A ``TimeBudget`` on a virtual clock: 1 s per training step, 3 s more for each fit's first (compilation)."""

    @staticmethod
    def install(monkeypatch):
        import kdet.training.time_budget as module

        clock = Clock()

        class Virtual(module.TimeBudget):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **dict(kwargs, clock=clock))
                self.first_batch = True

            def on_train_batch_end(self, batch, logs=None):
                clock.now += 1.0 + (3.0 if self.first_batch else 0.0)
                self.first_batch = False
                super().on_train_batch_end(batch, logs)

        monkeypatch.setattr(module, "TimeBudget", Virtual)


def test_engine_fits_the_run_to_the_budget_records_the_decision_and_resumes_it(tmp_path, monkeypatch, capsys):
    import keras

    import kdet.engine as engine
    from test_engine import fixed_recipe, tiny_train_records

    from kdet.data.augment import hflip, mosaic, resize

    VirtualTimeBudget.install(monkeypatch)
    monkeypatch.setattr(engine, "finish", lambda *args, **kwargs: {})  # the final evaluation is not at stake
    original_fit = keras.Model.fit
    runs = []

    def fit(model, *args, **kwargs):  # the first run is killed after one epoch
        if not runs:
            kwargs["epochs"] = 1
        history = original_fit(model, *args, **kwargs)
        runs.append(dict(iterations=int(model.optimizer.iterations.numpy()),
                         learning_rate=float(model.optimizer.learning_rate.numpy())))
        return history

    monkeypatch.setattr(keras.Model, "fit", fit)
    # planned: 4 epochs of 2 steps, cosine from 1e-3 to 0, mosaic off for the last epoch; budget 12 (virtual) s
    recipe = fixed_recipe(tiny_train_records(), epochs=4, time_budget=0.2)
    recipe["data"].update(test=None, augment=[mosaic(p=0.5), hflip(), resize()], batch_size=4, close_mosaic=1)
    recipe["eval"]["every_n_epochs"] = 100  # never in the plan: only the run's last epoch is evaluated
    work = str(tmp_path / "work")
    engine.train(recipe, work)
    first = json.load(open(os.path.join(work, "state.json")))
    # epoch 1: 4 + 1 s; 1 s an epoch-step after the compilation -> 2 s an epoch; 7 s left -> 1 + round(3.5) = 5
    assert "time_budget 0.2 min: epoch 1 took 2.0 s (first step's compilation excluded) -> 5 epochs" in \
        capsys.readouterr().out
    # the 6 planned steps left over the 8 steps left: planned step 6 (mosaic off) at step 2 + 4 / 0.75 -> epoch 4
    assert first["epochs_done"] == 1
    assert first["time_budget"] == dict(minutes=0.2, epochs=5, elapsed_s=5.0, epoch_seconds=2.0, mosaic_off_from=4)

    engine.train(recipe, work, resume=True)
    state = json.load(open(os.path.join(work, "state.json")))
    # resumed epoch 2 compiles again (5 s): 10 s used, 2 s an epoch -> 3 epochs; the rest of the plan (from
    # planned step 3.5) in steps 4..6, mosaic off for the last epoch; epoch 3 ends at the budget
    assert state["epochs_done"] == 3
    assert state["time_budget"] == dict(minutes=0.2, epochs=3, elapsed_s=12.0, epoch_seconds=2.0, mosaic_off_from=2)
    with open(os.path.join(work, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and [bool(row.get("val_AP")) for row in rows] == [False, False, True]
    # the compiled train step read the re-paced schedule, restored with the checkpoint: the cosine's end
    assert runs[0]["iterations"] == 2 and runs[1]["iterations"] == 6
    assert runs[0]["learning_rate"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 8)), rel=1e-5)
    assert runs[1]["learning_rate"] == pytest.approx(0.0, abs=1e-9)


class PeriodicEvaluation:
    """What the budget paces: ``every_n_epochs`` and ``final_epoch``, and the epochs it would evaluate."""

    def __init__(self, every_n_epochs):
        from kdet.metrics.callback import COCOEvalCallback

        self.every_n_epochs = every_n_epochs
        self.final_epoch = None
        self.evaluated = []
        self._due = COCOEvalCallback.on_epoch_end.__get__(self)  # the real rule, its evaluate() recorded
        self.eval_params = types.SimpleNamespace(stat_names=[])
        self.verbose = 0
        self.prefix = "val_"

    def evaluate(self):
        self.evaluated.append(self._epoch)
        return {}

    def on_epoch_end(self, epoch):
        self._epoch = epoch + 1
        self._due(epoch, logs=None)


def test_evaluations_keep_their_share_of_the_plan_and_the_last_epoch_is_evaluated():
    budget, model, _, _ = budget_and_model(minutes=2.0, planned=10, close_mosaic=0)
    evaluation = budget.pace(PeriodicEvaluation(every_n_epochs=5))  # twice in the 10 planned epochs
    budget.on_train_begin()
    epoch = 0
    while not model.stop_training:
        run_epoch(budget, epoch, 4, seconds_per_step=1.0, compile_seconds=4.0 if epoch == 0 else 0.0)
        evaluation.on_epoch_end(epoch)
        epoch += 1
    # 120 s at 4 s an epoch: 29 epochs decided, so every 5 of 10 planned becomes every round(14.5) = 14 (or 15)
    assert budget.epochs == 29 and evaluation.every_n_epochs in (14, 15)
    assert evaluation.evaluated[-1] == 29 and len(evaluation.evaluated) == 3  # two in the plan's pace + the last


def test_a_run_the_budget_cuts_short_is_evaluated_after_its_last_epoch():
    budget, model, _, _ = budget_and_model(close_mosaic=0)
    evaluation = budget.pace(PeriodicEvaluation(every_n_epochs=1000))  # "only at the end"
    budget.on_train_begin()
    run_epoch(budget, 0, 4, seconds_per_step=1.0, compile_seconds=4.0)  # decides 14 epochs
    evaluation.on_epoch_end(0)
    run_epoch(budget, 1, 4, seconds_per_step=20.0)  # then one epoch eats the budget
    evaluation.on_epoch_end(1)
    assert model.stop_training and budget.stopped_by_budget and evaluation.evaluated == [2]
