"""tf.distribute strategies for Keras ``fit`` (TensorFlow backend only).

Usage::

    strategy = make_strategy("mirrored")
    batch = global_batch_size(per_replica=16, strategy=strategy)
    with strategy.scope():
        model = build_model(...)
        model.compile(optimizer=..., loss=...)
    model.fit(distribute_dataset(train_ds.batch(batch), strategy), ...)

Keras' ``fit`` distributes the (globally batched) dataset itself when the
model was built and compiled under ``strategy.scope()``; the loss is averaged
over the global batch, so results match single-device training with the same
global batch (BatchNorm excepted: per-replica batch statistics unless
``BatchNormalization(synchronized=True)``).
"""

import contextlib
import json
import os
import tempfile

import tensorflow as tf

KINDS = ("default", "mirrored", "multiworker", "tpu")


def make_strategy(kind="default", devices=None, tpu=None):
    """Return a ``tf.distribute.Strategy``.

    Args:
        kind: "default" (no distribution), "mirrored" (all local GPUs, or
            ``devices``), "multiworker" (cluster from ``TF_CONFIG``) or "tpu".
        devices: for "mirrored", e.g. ``["/gpu:0", "/gpu:1"]`` or ``["/cpu:0", "/cpu:1"]``.
        tpu: TPU name or address for ``TPUClusterResolver`` ("" / None: local or from env).
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown strategy {kind!r}: expected one of {KINDS}.")
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        return _mirrored(devices)
    if kind == "multiworker":
        return _multiworker()
    return _tpu(tpu)


def _mirrored(devices):
    if devices:
        available = {d.name.lower().replace("/job:localhost/replica:0/task:0", "") for d in tf.config.list_logical_devices()}
        wanted = [_normalise_device(d) for d in devices]
        missing = [d for d, w in zip(devices, wanted) if w not in available]
        if missing:
            raise ValueError(
                f"MirroredStrategy: devices {missing} do not exist; logical devices are "
                f"{sorted(available)}. (Logical CPUs must be configured before TensorFlow initialises.)"
            )
    return tf.distribute.MirroredStrategy(devices=devices)


def _normalise_device(name):
    kind, _, index = name.lower().strip("/").replace("device:", "").partition(":")
    return f"/device:{kind}:{index or 0}"


def _multiworker():
    config = os.environ.get("TF_CONFIG")
    if not config:
        raise RuntimeError(
            "multiworker strategy needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}).'
        )
    try:
        json.loads(config)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON: {error}") from error
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)


def _tpu(tpu):
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise RuntimeError(f"No TPU available (tpu={tpu!r}): {error}") from error
    return tf.distribute.TPUStrategy(resolver)


def global_batch_size(per_replica, strategy=None):
    """Per-replica batch size x number of replicas in sync."""
    strategy = strategy or tf.distribute.get_strategy()
    return int(per_replica) * strategy.num_replicas_in_sync


def shard_by_data(dataset):
    """Set ``AutoShardPolicy.DATA``: every worker reads all files, keeps its share of elements.

    Needed when the input is not split into at least as many files as workers
    (e.g. one TFRecord, or a generator); harmless on a single worker.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def distribute_dataset(dataset, strategy=None, for_fit=True):
    """Prepare a globally batched ``tf.data.Dataset`` for ``strategy``.

    For Keras ``fit`` (``for_fit=True``) only the shard policy is set (Keras
    distributes the dataset itself); for custom loops the
    ``strategy.experimental_distribute_dataset`` result is returned.
    """
    strategy = strategy or tf.distribute.get_strategy()
    dataset = shard_by_data(dataset)
    if for_fit:
        return dataset
    return strategy.experimental_distribute_dataset(dataset)


def is_multi_worker(strategy):
    """True for a ``MultiWorkerMirroredStrategy`` (one process of a cluster, even of one)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


@contextlib.contextmanager
def writer_dir(strategy, work_dir):
    """Where this process writes a run's files: ``work_dir`` on the chief (and without multi-worker),
    else a temporary folder, removed on leaving.

    Every worker still writes its checkpoints and export (to its own folder), as TensorFlow's
    multi-worker guide asks: reading distributed variables for a save may run collective ops
    that all workers must join; only the chief's files are kept.
    """
    if strategy.extended.should_checkpoint:
        yield work_dir
        return
    task = strategy.cluster_resolver
    with tempfile.TemporaryDirectory(prefix=f"kdet_{task.task_type}{task.task_id}_") as scratch:
        yield scratch


def prepare_fit(model, dataset, strategy):
    """Work around two faults of Keras 3's ``fit`` under a multi-worker strategy (keras-team/keras#20585).

    * Before the first step ``fit`` builds the loss and metrics from one input batch, which
      it first averages over the replicas with ``strategy.reduce`` on the nested
      ``(images, targets)``: ``MultiWorkerMirroredStrategy`` cannot reduce a nested value
      across workers ("Attempt to convert a value (PerReplica...)"). Only shapes are needed:
      build from ``dataset.element_spec`` here and skip that step.
    * Each step's logs (scalars) are averaged across workers with ``reduce(..., axis=0)``,
      which fails on a scalar ("Invalid reduction dimension 0"): average them whole.

    No-op for other strategies (and where Keras no longer has these private steps).
    """
    if not is_multi_worker(strategy) or not hasattr(model, "_maybe_symbolic_build"):
        return
    with strategy.scope():
        model._symbolic_build(data_batch=dataset.element_spec)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    _average_scalar_logs_whole()


def _average_scalar_logs_whole():
    from keras.src.backend.tensorflow import trainer

    keras_reduce = trainer.reduce_per_replica
    if getattr(keras_reduce, "kdet_fixed", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and is_multi_worker(strategy):
            def mean(value):
                one = value.values[0] if isinstance(value, tf.distribute.DistributedValues) else value
                if one.shape.rank == 0:
                    return strategy.reduce("MEAN", value, axis=None)
                return keras_reduce(value, strategy, reduction)

            return tf.nest.map_structure(mean, values)
        return keras_reduce(values, strategy, reduction)

    reduce_per_replica.kdet_fixed = True
    trainer.reduce_per_replica = reduce_per_replica
