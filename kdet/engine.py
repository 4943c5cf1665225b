"""The training run driven by a recipe; ``tools/train.py`` is a thin wrapper.

The flow is the one data takes: sources -> records -> tf.data (augmentation,
batching) -> model -> loss / decode + NMS -> metrics -> reports and export.
The components are built by :mod:`kdet.build` (recipe -> sources, records, datasets,
model, loss, optimizer) and used for detection by :mod:`kdet.inference`; this module
runs the training (callbacks, resume, time budget, final evaluation, export) and then the
post-training steps (:func:`post_training_steps`: the run report and the label review).
Its builder and inference names are re-exported, so ``kdet.engine.build_model`` and the
like keep working.
"""

import json
import os
import time

import keras
import numpy as np

from kdet.build import (AUTO_CACHE_BYTES, build_eval_dataset, build_learning_rate, build_loss,  # noqa: F401
                        build_model, build_optimizer, build_train_dataset, class_names_of, compile_model,
                        ema_start_weight_warning, freezing_callbacks, load_records, load_sources, oversampled,
                        resolve_backbone_weights, resolve_small_data)
from kdet.config import load_recipe
from kdet.defaults import default_of
from kdet.errors import RecipeError, UserError  # noqa: F401  (importable from here too)
from kdet.inference import candidate_counts, eval_settings, evaluate_records, predict_records  # noqa: F401
from kdet.log import fit_verbose, get_logger

logger = get_logger(__name__)


# ------------------------------------------------------------------ training
def build_callbacks(recipe, work_dir, class_names, val_dataset, resume_point=None, extra_state=None,
                    planned_epochs=None):
    """Checkpoints, logs, COCO evaluation, early stopping, freezing and the non-finite guard.

    ``resume_point`` (from `load_resume_point`) keeps ``log.csv``'s rows of the finished
    epochs and the best value ``best.keras`` was saved at; ``extra_state()`` returns more
    entries for ``state.json`` (the time budget's); ``planned_epochs()`` is the run's plan (the time
    budget's, re-paced), which early stopping waits for a share of.
    """
    from kdet.training.callbacks import Checkpoints, CSVLog, EarlyStoppingOnEvaluations, StopOnNonFiniteLoss

    train_cfg, eval_cfg = recipe["train"], recipe.get("eval", {})
    callbacks = [StopOnNonFiniteLoss(raise_error=True)]
    callbacks += freezing_callbacks(train_cfg)
    monitor = None
    if val_dataset is not None:
        from kdet.metrics.callback import COCOEvalCallback

        settings = eval_settings(recipe)
        callbacks.append(COCOEvalCallback(val_dataset, every_n_epochs=eval_cfg.get("every_n_epochs", 1),
                                          class_names=class_names,
                                          detect_fn=lambda model, images: model.detect(images, **settings)))
        monitor = eval_cfg.get("monitor", "val_AP")
        if train_cfg.get("early_stopping_patience"):
            callbacks.append(EarlyStoppingOnEvaluations(
                monitor=monitor, mode="max", patience=int(train_cfg["early_stopping_patience"]),
                restore_best_weights=True, min_value=train_cfg.get("early_stopping_min_value"),
                min_fraction=train_cfg.get("early_stopping_min_fraction"),
                planned_epochs=planned_epochs or (lambda: train_cfg["epochs"])))
    epochs_done, best = (resume_point["epochs_done"], resume_point.get("best")) if resume_point else (0, None)
    callbacks += [
        _image_logger(work_dir, val_dataset, eval_cfg.get("every_n_epochs", 1)),
        CSVLog(os.path.join(work_dir, "log.csv"), keep_epochs=epochs_done),   # written before state.json
        Checkpoints(work_dir, monitor=monitor, mode="max", best=best, extra_state=extra_state),  # + state.json
        keras.callbacks.TensorBoard(os.path.join(work_dir, "tensorboard"), write_graph=False),
    ]
    return callbacks


def _image_logger(work_dir, val_dataset, every_n_epochs):
    """A few validation images with their predicted boxes, into TensorBoard."""
    from kdet.training.callbacks import ImageLogger

    if val_dataset is None:
        return keras.callbacks.Callback()
    images = next(iter(val_dataset))[0][:4].numpy()
    image_logger = ImageLogger(os.path.join(work_dir, "tensorboard"), images, detect_fn=None,
                               every_n_epochs=every_n_epochs)
    image_logger.detect_fn = lambda batch: image_logger.model.detect(batch)
    return image_logger


def load_resume_point(work_dir, steps_per_epoch):
    """``{"model", "epochs_done", "best"}`` from ``last.keras`` + ``state.json``; None without a checkpoint.

    The files are written in the order ``last.keras`` then ``state.json`` (each atomically),
    so after a kill ``state.json`` is either right or one epoch behind ``last.keras``; the
    optimizer step count written in ``state.json`` tells the two apart. A checkpoint that
    does not load or a ``state.json`` that disagrees with it is a `UserError` naming the file.
    """
    last, state_path = os.path.join(work_dir, "last.keras"), os.path.join(work_dir, "state.json")
    if not os.path.exists(last):
        return None
    have_state = os.path.exists(state_path)
    state = _read_state(state_path) if have_state else dict(epochs_done=0, iterations=0)
    model = _load_checkpoint(last)
    steps = int(model.optimizer.iterations.numpy())
    epochs_done, saved_steps = state["epochs_done"], state.get("iterations")
    position = epochs_done * steps_per_epoch + int(state.get("steps_done") or 0)   # mid-epoch checkpoints: steps_done
    metrics = state.get("metrics")
    if saved_steps is not None and steps != saved_steps:
        if not saved_steps < steps <= saved_steps + steps_per_epoch:
            said = (f"says {epochs_done} epochs ({saved_steps} optimizer steps) are done" if have_state
                    else "is missing (so no epoch is known to be done)")
            raise UserError(f"{state_path} {said}, but "
                            f"{last} holds {steps} steps: they are not from the same run; remove the work dir's "
                            "state.json and last.keras to start over")
        ahead = steps - saved_steps   # killed between writing last.keras and state.json
        position, metrics = position + ahead, None
        logger.info(f"{last} is {'one epoch' if ahead == steps_per_epoch else f'{ahead} steps'} ahead of {state_path} "
                    "(the run was stopped between the two writes)")
    epochs_done, steps_done = divmod(position, steps_per_epoch)
    return dict(model=model, epochs_done=epochs_done, steps_done=steps_done, best=state.get("best"),
                time_budget=state.get("time_budget"), metrics=metrics if steps_done else None)


def _read_state(path):
    try:
        with open(path) as f:
            state = json.load(f)
        epochs = state["epochs_done"]
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs_done must be a whole number >= 0, got {epochs!r}")
        return state
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = f"no field {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise UserError(f"{path}: not a kdet training state ({reason}); remove it and last.keras "
                        "to start over") from err


def _load_checkpoint(path):
    """``last.keras`` through kdet's loader (kdet's classes registered); a damaged file is a `UserError`."""
    from kdet.cli import ToolError, load_keras_model

    try:
        model = load_keras_model(path)
    except ToolError as err:
        raise UserError(f"{err}: restore it, or remove it to start over") from err
    if getattr(model, "optimizer", None) is None:
        raise UserError(f"{path}: the checkpoint has no optimizer state (not written by kdet's training)")
    return model


def train(recipe, work_dir, resume=False):
    """Train, evaluate and export as the recipe says; returns the final metrics dict.

    Under ``train.strategy="multiworker"`` every worker runs this; the chief writes
    ``work_dir`` and the others write to a temporary folder removed at the end
    (``kdet.training.strategy.writer_dir``); all resume from ``work_dir``.
    """
    import contextlib

    from kdet.training.signals import SignalStop
    from kdet.training.strategy import make_strategy, writer_dir
    from kdet.training.workdir_lock import WorkDirBusy, WorkDirLock

    os.makedirs(work_dir, exist_ok=True)
    # first: a multi-worker strategy must set up its collectives before any other TensorFlow op
    strategy = make_strategy(recipe["train"].get("strategy", "default"))
    with writer_dir(strategy, work_dir) as out_dir:
        try:  # the writer takes the work dir before touching a file in it (kdet/training/workdir_lock.py)
            lock = WorkDirLock(work_dir) if out_dir == work_dir else contextlib.nullcontext()
            with lock, SignalStop() as stop:   # SIGTERM / SIGINT: a checkpoint, then Interrupted
                return _train(recipe, work_dir, out_dir, resume, strategy, stop)
        except WorkDirBusy as err:
            raise UserError(str(err)) from None


def _train(recipe, work_dir, out_dir, resume, strategy, stop=None):
    import tensorflow as tf

    from kdet.training.precision import setup_precision
    from kdet.training.strategy import prepare_fit, shard_by_data

    train_cfg = recipe["train"]
    keras.utils.set_random_seed(int(train_cfg.get("seed", 0)))
    setup_precision(train_cfg.get("mixed_precision", "float32"))
    _check_strategy_backend(train_cfg.get("strategy", "default"))

    sources = load_sources(recipe)
    if sources["train"] is None:
        raise RecipeError("the recipe has no data.train source")
    class_names = class_names_of(recipe, sources)
    records = load_records(sources)
    recipe = resolve_small_data(recipe, len(records["train"]))
    recipe = resolve_backbone_weights(recipe, class_names)
    _print_data_summary(records, class_names)
    recipe = _preflight(recipe, records, class_names, out_dir)
    train_cfg = recipe["train"]  # both steps above may return a new recipe
    records["train"] = oversampled(recipe, records["train"], class_names)
    val_records = records["val"] or None
    test_records = records["test"] or val_records

    epoch_records = _repeated_to_epoch_size(recipe, records["train"])  # class weights count each image once
    seed = train_cfg.get("seed")
    # seeded: each epoch's data order and augmentation come from (seed, epoch), so a resumed run repeats none
    pass_epoch = tf.Variable(0, dtype=tf.int64, trainable=False) if seed is not None else None
    skip_batches = tf.Variable(0, dtype=tf.int64, trainable=False)  # > 0 only for a pass resumed mid-epoch
    steps_per_epoch = len(epoch_records) // recipe["data"]["batch_size"]
    if steps_per_epoch < 1:
        raise RecipeError(f"{len(epoch_records)} training images are fewer than one batch "
                          f"({recipe['data']['batch_size']})")
    _resolve_auto_epochs(train_cfg, steps_per_epoch, num_images=len(records["train"]))
    mosaic_off_from = _mosaic_switch(recipe, pass_epoch)
    passes = build_train_dataset(recipe, epoch_records, seed=seed, epoch=pass_epoch, mosaic_off_from=mosaic_off_from,
                                 skip_batches=skip_batches)

    def epochs_of(steps):  # a known epoch length; workers: each takes its part of every global batch
        return shard_by_data(passes.apply(tf.data.experimental.assert_cardinality(steps)))

    train_ds = epochs_of(steps_per_epoch)
    # with meta: val_AP's small / medium / large ranges use the original image sizes, as the final evaluation
    val_ds = build_eval_dataset(recipe, val_records, with_meta=True) if val_records else None

    from kdet.training.callbacks import remove_stale_temp_files

    remove_stale_temp_files(out_dir)   # partial saves of a killed run
    resume_point, initial_epoch, resume_step = None, 0, 0
    with strategy.scope():
        if resume:
            resume_point = load_resume_point(work_dir, steps_per_epoch)
        if resume_point:
            model, initial_epoch = resume_point["model"], resume_point["epochs_done"]
            resume_step = resume_point["steps_done"]
            if resume_step:
                logger.info(f"resuming from {os.path.join(work_dir, 'last.keras')} at epoch {initial_epoch + 1}, "
                            f"step {resume_step} of {steps_per_epoch}")
            else:
                logger.info(f"resuming from {os.path.join(work_dir, 'last.keras')} after epoch {initial_epoch}")
            if recipe["model"].get("init_from"):
                logger.info("--resume wins: model.init_from is not applied (the checkpoint holds the run's weights)")
        else:
            if resume:
                logger.info(f"--resume: no checkpoint in {work_dir}, starting from scratch")
            model = build_model(recipe, class_names)
            compile_model(recipe, model, class_names, records["train"], steps_per_epoch)
    budget = _time_budget(recipe, steps_per_epoch, mosaic_off_from, resume_point)
    callbacks = build_callbacks(recipe, out_dir, class_names, val_ds, resume_point,
                                extra_state=(lambda: dict(time_budget=budget.state())) if budget is not None else None,
                                planned_epochs=(lambda: budget.epochs) if budget is not None else None)
    if budget is not None:  # first: it decides before val_AP and the checkpoint of the epoch are written
        for callback in callbacks:
            if hasattr(callback, "every_n_epochs"):  # val_AP and the TensorBoard images keep their share
                budget.pace(callback)
        callbacks[:0] = [budget] + ([budget.progbar] if budget.progbar else [])
    if pass_epoch is not None:
        from kdet.training.callbacks import PassEpoch

        callbacks.insert(0, PassEpoch(pass_epoch))
    callbacks.append(_mid_epoch_checkpoints(recipe, callbacks, steps_per_epoch, stop, strategy, resume_point))
    if budget is not None:
        budget.skipped_steps = resume_step
    prepare_fit(model, train_ds, strategy)
    started = time.time()
    from kdet.training.preemption import fit_resumable

    epochs = budget.fit_epochs(initial_epoch) if budget is not None else int(train_cfg["epochs"])
    # train_ds shuffles itself (fit's shuffle=False); resumed mid-epoch: the rest of that pass first
    history = fit_resumable(model, train_ds, epochs=max(epochs, initial_epoch + 1) if resume_step else epochs,
                            initial_epoch=initial_epoch, callbacks=callbacks,
                            verbose=fit_verbose(recipe.get("verbose", 1)),  # a log file: one line per epoch
                            steps_per_epoch=steps_per_epoch, resume_step=resume_step, skip_batches=skip_batches,
                            tail_dataset=epochs_of(steps_per_epoch - resume_step) if resume_step else None)
    train_seconds = time.time() - started
    if budget is not None:
        train_seconds = budget.elapsed()  # the whole budget's time, with the runs this one resumes
        logger.info(f"time_budget {budget.minutes:g} min: {initial_epoch + len(history.epoch)} epochs in "
                    f"{train_seconds / 60:.2f} min")
    if val_records and train_cfg.get("ema_momentum") is not None:
        _evaluate_averaged_weights(model, val_records, class_names, recipe)
    run = _run_summary(recipe, callbacks, budget, model, steps_per_epoch)
    return finish(model, recipe, out_dir, class_names, test_records, train_seconds, train_records=records["train"],
                  run=run)


def _run_summary(recipe, callbacks, budget, model, steps_per_epoch):
    """What the training did against its plan and why it stopped (the run report's evidence)."""
    from kdet.training.callbacks import EarlyStoppingOnEvaluations

    train_cfg, model_cfg = recipe["train"], recipe["model"]
    planned = int(budget.epochs if budget is not None else train_cfg["epochs"])
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    stopper = next((c for c in callbacks if isinstance(c, EarlyStoppingOnEvaluations)), None)
    if stopper is not None and stopper.stopped_epoch > 0:
        stopped_by = (f"early stopping after epoch {stopper.stopped_epoch + 1} ({stopper.patience} evaluations "
                      f"without a better {stopper.monitor})")
    elif budget is not None and budget.stopped_by_budget:
        stopped_by = f"the time budget ({budget.minutes:g} min)"
    else:
        stopped_by = "the plan's last epoch"
    return dict(planned_epochs=planned, steps_per_epoch=steps_per_epoch, planned_steps=planned * steps_per_epoch,
                steps_done=steps, stopped_by=stopped_by, learning_rate=train_cfg.get("learning_rate"),
                backbone=model_cfg.get("backbone"), width_multiplier=model_cfg.get("width_multiplier", 1.0))


def _mid_epoch_checkpoints(recipe, callbacks, steps_per_epoch, stop, strategy, resume_point):
    """The ``MidEpochCheckpoint`` callback: on SIGTERM / SIGINT, and every ``train.checkpoint_every_minutes``."""
    from kdet.training.callbacks import Checkpoints
    from kdet.training.preemption import MidEpochCheckpoint
    from kdet.training.strategy import is_multi_worker

    every = recipe["train"].get("checkpoint_every_minutes", default_of("train", "checkpoint_every_minutes"))
    if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float)) or every < 0):
        raise RecipeError(f"train.checkpoint_every_minutes must be a number of minutes >= 0 (0 or None: only at "
                          f"epoch ends), got {every!r}")
    checkpoints = next(c for c in callbacks if isinstance(c, Checkpoints))
    start = (resume_point["epochs_done"], resume_point["steps_done"]) if resume_point else (0, 0)
    return MidEpochCheckpoint(checkpoints, steps_per_epoch, every_minutes=every, stop=stop, start=start,
                              metrics_state=(resume_point or {}).get("metrics"),
                              multi_worker=strategy if is_multi_worker(strategy) else None)


def _check_strategy_backend(kind):
    """``train.strategy``: the tf.distribute strategies need the TensorFlow backend."""
    if kind != "default" and keras.backend.backend() != "tensorflow":
        raise RecipeError(f"train.strategy={kind!r} is a tf.distribute strategy: it needs KERAS_BACKEND=tensorflow "
                          f"(under {keras.backend.backend()} only 'default' runs; multi-device training there is "
                          "keras.distribution, which kdet does not set up)")


def _mosaic_switch(recipe, pass_epoch):
    """The ``tf.Variable`` holding the first epoch without mosaic, for ``data.close_mosaic`` (None without it)."""
    import tensorflow as tf

    from kdet.data.augment import Mosaic

    close = int(recipe["data"].get("close_mosaic") or 0)
    if not close:
        return None
    if close < 0:
        raise RecipeError(f"data.close_mosaic must be a number of epochs >= 0, got {close}")
    if not any(isinstance(t, Mosaic) for t in recipe["data"].get("augment") or []):
        logger.info(f"note: data.close_mosaic={close} does nothing: data.augment has no mosaic() entry")
        return None
    if pass_epoch is None:
        raise RecipeError("data.close_mosaic needs train.seed (the epoch reaches the input pipeline "
                          "through the seeded passes)")
    first_off = max(0, int(recipe["train"]["epochs"]) - close)
    return tf.Variable(first_off, dtype=tf.int64, trainable=False)


def _time_budget(recipe, steps_per_epoch, mosaic_off_from, resume_point):
    """The ``TimeBudget`` callback for ``train.time_budget`` (None without one)."""
    minutes = recipe["train"].get("time_budget")
    if minutes is None:
        return None
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0:
        raise RecipeError(f"train.time_budget must be a number of minutes > 0, got {minutes!r}")
    from kdet.training.time_budget import TimeBudget

    verbose = recipe.get("verbose", 1)
    return TimeBudget(minutes, recipe["train"]["epochs"], steps_per_epoch,
                      close_mosaic=recipe["data"].get("close_mosaic") or 0, mosaic_off_from=mosaic_off_from,
                      resumed=(resume_point or {}).get("time_budget"),
                      progbar=keras.callbacks.ProgbarLogger() if verbose else None)


def _preflight(recipe, records, class_names, work_dir):
    """Pre-flight checks (printed briefly, ``preflight.txt`` in full); fits "auto" anchors first."""
    from kdet.analysis.preflight import preflight_for_training

    return preflight_for_training(recipe, records, class_names, work_dir, verbose=recipe.get("verbose", 1))


def _evaluate_averaged_weights(model, val_records, class_names, recipe):
    """The in-training evaluations saw the raw weights; ``fit`` has since written in their moving average."""
    coco, _, _ = evaluate_records(model, val_records, class_names, recipe)
    logger.info(f"moving-average weights on {len(val_records)} validation images: AP50 {coco['AP50']:.4f}  "
                f"AP {coco['AP']:.4f}")


def _repeated_to_epoch_size(recipe, train_records):
    """Whole copies of a small training set so one epoch has about ``data.min_images_per_epoch`` images.

    Keeps per-epoch work (checkpoint, log, evaluation) in proportion to training on tiny sets.
    """
    minimum = recipe["data"].get("min_images_per_epoch")
    if not minimum or not train_records or len(train_records) >= minimum:
        return train_records
    copies = max(1, int(round(minimum / len(train_records))))
    if copies == 1:
        return train_records
    logger.info(f"train: {len(train_records)} images repeated {copies}x per epoch "
                f"(data.min_images_per_epoch={minimum})")
    return list(train_records) * copies


def _resolve_auto_epochs(train_cfg, steps_per_epoch, num_images=None):
    """``train.epochs="auto"``: about ``train.auto_steps`` optimizer steps, in whole epochs (written back).

    With ``train.auto_steps_per_image``, a small set gets fewer: that many steps per training image
    (a tiny set overfits long before ``auto_steps``).
    """
    if train_cfg.get("epochs") != "auto":
        return
    steps = int(train_cfg.get("auto_steps") or 3000)
    why = f"train.auto_steps={steps}"
    per_image = train_cfg.get("auto_steps_per_image")
    if per_image and num_images and per_image * num_images < steps:
        steps = int(round(per_image * num_images))
        why = f"train.auto_steps_per_image={per_image:g} x {num_images} training images, below train.auto_steps"
    train_cfg["epochs"] = max(1, int(round(steps / steps_per_epoch)))
    logger.info(f"train.epochs='auto': {train_cfg['epochs']} epochs of {steps_per_epoch} steps ({why})")


def finish(model, recipe, work_dir, class_names, test_records, train_seconds, train_records=None, run=None):
    """Final evaluation, metrics.json, the run report and the SavedModel export."""
    from kdet.export import export_saved_model
    from kdet.metrics._coco_common import format_summary

    metrics = {"train_seconds": round(train_seconds, 1)}
    if test_records:
        coco, ground_truth, results = evaluate_records(model, test_records, class_names, recipe)
        metrics.update(coco)
        with open(os.path.join(work_dir, "test_detections.json"), "w") as f:
            json.dump(results, f)
        logger.info(format_summary(coco))
        logger.info(f"mAP@0.5 (COCO AP50) on {len(test_records)} held-out images: {coco['AP50']:.4f}"
                    f"   VOC all-point mAP50: {coco['VOC_mAP50']:.4f}")
        _run_report(model, recipe, work_dir, class_names, test_records, ground_truth, results, train_records, run)
    else:
        logger.info("no validation or test images: no final evaluation (add a test split to the data, or lower "
                    "data.min_val_images to hold some training images out)")
    export_dir = os.path.join(work_dir, "saved_model")
    if keras.backend.backend() == "tensorflow":
        export_saved_model(model, export_dir, class_names, **eval_settings(recipe))
        metrics["saved_model"] = export_dir
    else:
        export_dir = metrics["saved_model"] = None
        _save_for_export(model, work_dir, class_names)
    with open(os.path.join(work_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=float)
    logger.info(f"training took {train_seconds / 60:.1f} min; metrics: {work_dir}/metrics.json"
                + (f"; SavedModel: {export_dir}" if export_dir else ""))
    return metrics


def _save_for_export(model, work_dir, class_names):
    """Other backends: the final model as ``final.keras`` and the command that exports it under TensorFlow."""
    import shlex

    final = os.path.join(work_dir, "final.keras")
    model.save(final)
    logger.info(f"SavedModel export needs the TensorFlow backend: skipped under {keras.backend.backend()}; "
                f"export the final model with: KERAS_BACKEND=tensorflow python tools/export.py {final} "
                f"{os.path.join(work_dir, 'saved_model')} --classes {shlex.quote(','.join(class_names))}")


class FinishedRun:
    """What a training run hands each post-training step: ``step(run)`` reads these attributes.

    ``model`` (trained), ``recipe``, ``work_dir``, ``class_names``, ``test_records`` (the evaluated
    split), ``ground_truth`` and ``results`` (its COCO json and detections), ``train_records``,
    ``summary`` (what the training did against its plan, ``_run_summary``).
    """

    def __init__(self, model, recipe, work_dir, class_names, test_records, ground_truth, results,
                 train_records=None, summary=None):
        self.model, self.recipe, self.work_dir, self.class_names = model, recipe, work_dir, class_names
        self.test_records, self.ground_truth, self.results = test_records, ground_truth, results
        self.train_records, self.summary = train_records, summary


def post_training_steps():
    """The steps ``finish`` runs after the final evaluation, in order, each ``step(run: FinishedRun)``:
    the run report (``kdet.metrics.run_report``), then the label review when the recipe asks for it
    (``kdet.analysis.label_issues``). They build and predict through kdet.build / kdet.inference only."""
    from kdet.analysis.label_issues import after_training as review_labels
    from kdet.metrics.run_report import after_training as write_report

    return [write_report, review_labels]


def _run_report(model, recipe, work_dir, class_names, test_records, ground_truth, results, train_records, run=None):
    """The post-training steps (run report, label review) on the finished run."""
    finished = FinishedRun(model, recipe, work_dir, class_names, test_records, ground_truth, results,
                           train_records=train_records, summary=run)
    for step in post_training_steps():
        step(finished)


def _print_data_summary(records, class_names):
    for split, recs in records.items():
        if recs:
            counts = np.bincount(np.concatenate([r.classes for r in recs] or [np.zeros(0, int)]),
                                 minlength=len(class_names))
            per_class = ", ".join(f"{n} {c}" for n, c in zip(class_names, counts))
            logger.info(f"{split}: {len(recs)} images ({per_class})")


def train_from_recipe_file(path, overrides=(), work_dir=None, resume=False):
    """What ``tools/train.py`` does: load the recipe, train, evaluate, export."""
    try:
        recipe = load_recipe(path, overrides)
        work_dir = work_dir or os.path.join("work_dirs", recipe["name"])
        return train(recipe, work_dir, resume=resume)
    except (RecipeError, FloatingPointError) as err:  # FloatingPointError: the non-finite loss guard
        raise UserError(str(err)) from err
    except Exception as err:  # a bad image met inside the input pipeline (say, changed since loading)
        from kdet.data.pipeline import input_error
        from kdet.training.callbacks import disk_error_reason

        reason = disk_error_reason(err, space_only=True)
        if reason is not None and work_dir:   # a write the work dir cannot take, outside the checkpoints
            detail = (str(err).strip().splitlines() or [""])[0][:200]
            raise UserError(f"{work_dir}: {reason} while writing the run's files ({detail}); the last checkpoint "
                            "is intact: free space (or make the folder writable) and run again with --resume") from None
        if input_error(err) is None:
            raise
        raise UserError(str(input_error(err))) from None
