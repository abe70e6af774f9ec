"""Strategies and cross-replica helpers.

Everything a method needs to behave the same on one device and on N replicas:

* ``scale_loss``: Keras 3 SUMS replica gradients in a custom ``train_step``, so
  each replica's loss is divided by ``num_replicas_in_sync``.
* ``all_gather`` / ``all_reduce_mean``: identical values on every replica for
  what the algorithm defines over the global batch (queues, banks, averages).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")

TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
    '"task": {"type": "worker", "index": 0}}\''
)

# No collective timeout (CommunicationOptions.timeout_seconds). Upstream
# behaviour (TF 2.21): with a timeout, every collective call starts two
# "collective_ops" threads that never exit, 4 per training step (measured: 86
# more threads per digits epoch of 21 steps). Two workers calling one
# all-reduce in a loop aborted here ("std::system_error: Resource temporarily
# unavailable") after 8,000-10,000 calls (16k-20k threads), that is after
# 4,000-5,000 training steps: within the first ImageNet epoch at batch 256.
# A lost peer is detected without it: the coordination service's heartbeats
# abort the collectives (measured: the survivor exits 1.3-1.5 s after a kill -9
# of either worker, 9.6 s after a SIGSTOP; tested by
# test_killed_worker_stops_the_other_and_a_rerun_resumes).

# Gradients are all-reduced in packs of up to this many bytes: one collective
# per pack instead of one per variable (a loopback round trip each).
BYTES_PER_PACK = 32 << 20


def parse_tf_config(raw: Optional[str] = None) -> Dict[str, Any]:
    """Reads and checks the standard ``TF_CONFIG`` cluster description.

    Args:
      raw: the JSON text; ``None`` reads the ``TF_CONFIG`` environment variable.

    Returns:
      The parsed dict, with ``cluster`` (``worker`` and optional ``chief`` lists
      of ``host:port``) and ``task`` (``type``, ``index``) checked.

    Raises:
      ValueError: missing, not JSON, or naming a task outside the cluster; the
        message says what is wrong and shows a valid example.
    """
    if raw is None:
        raw = os.environ.get("TF_CONFIG")
    hint = f" Example for worker 0 of two: {TF_CONFIG_EXAMPLE}."
    if not raw:
        raise ValueError("--strategy=multi_worker reads the cluster from the TF_CONFIG "
                         "environment variable, which is not set (for one machine, "
                         "scripts/launch_local.py sets it for you)." + hint)
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e.msg} at position {e.pos})." + hint) from e
    if not isinstance(config, dict):
        raise ValueError("TF_CONFIG must be a JSON object with 'cluster' and 'task'." + hint)
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError("TF_CONFIG has no 'cluster' object." + hint)
    for job, addresses in cluster.items():
        if job not in ("chief", "worker", "evaluator", "ps"):
            raise ValueError(f"TF_CONFIG cluster job {job!r} is not one of chief, worker.")
        if job in ("evaluator", "ps"):
            raise ValueError(f"TF_CONFIG names a {job!r} job: MultiWorkerMirroredStrategy "
                             "uses only 'chief' and 'worker'.")
        if (not isinstance(addresses, list) or not addresses
                or not all(isinstance(a, str) and ":" in a for a in addresses)):
            raise ValueError(f"TF_CONFIG cluster[{job!r}] must be a non-empty list of "
                             f"'host:port' strings, got {addresses!r}.")
    if "worker" not in cluster and "chief" not in cluster:
        raise ValueError("TF_CONFIG cluster lists no 'worker'." + hint)
    if len(cluster.get("chief", [])) > 1:
        raise ValueError("TF_CONFIG cluster lists more than one 'chief'.")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError("TF_CONFIG has no 'task' with 'type' and 'index'." + hint)
    kind, index = task["type"], task["index"]
    if kind not in cluster:
        raise ValueError(f"TF_CONFIG task type {kind!r} is not a job of the cluster "
                         f"({sorted(cluster)}).")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[kind]):
        raise ValueError(f"TF_CONFIG task index {index!r} is outside cluster[{kind!r}], "
                         f"which has {len(cluster[kind])} task(s).")
    return config


def is_chief(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
    """Whether this process writes the run's outputs (summary, logs, exports).

    True outside multi-worker training; under it, for the ``chief`` task, or for
    worker 0 when the cluster has no chief (the TensorFlow convention).
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if not is_multi_worker(strategy) or resolver is None:
        return True
    kind, index = resolver.task_type, resolver.task_id
    return kind == "chief" or (kind == "worker" and index == 0
                               and "chief" not in resolver.cluster_spec().as_dict())


def is_multi_worker(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
    """True under a MultiWorkerMirroredStrategy that spans more than one worker."""
    strategy = strategy or tf.distribute.get_strategy()
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())  # pylint: disable=protected-access


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Sets ``tf.data`` auto-sharding to DATA: under a multi-worker strategy every
    worker runs the same (seeded) pipeline and keeps its part of each global
    batch, so the global batches are those one process would see. (FILE
    sharding, the AUTO choice for file-backed TFDS data, would give each worker
    different files.) No effect without a multi-worker strategy."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with tf.data's autotuning off (``AUTOTUNE`` parallelism then
    means one call per schedulable CPU core).

    For the input of a multi-worker strategy (see
    ``_per_device_datasets_without_autotune``): the autotuning thread of an
    iterator behind a ``MultiDeviceIterator`` does not see the iterator's
    cancellation, so deleting the iterator (``fit`` returning) waits for its
    next optimisation round, and those rounds are 10 ms, 20 ms, ... up to 60 s
    apart. Measured (TF 2.21, supervised digits, 2 workers x 1 thread): ``fit``
    returned 1.2-6.3 s after its last epoch ended, 0 s with autotuning off here
    and in the per-device stage; the step took 8.3 ms against 9.1-9.2 ms with
    it (on one core per worker the tuning thread competes with the step)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def _per_device_datasets_without_autotune() -> None:
    """Upstream behaviour (TF 2.21, ``multi_device_iterator_ops``): a
    distributed dataset's iterator feeds each device through a per-device
    dataset (``_create_device_dataset``: a generator over the worker's buffer
    and a fixed prefetch of 1) built with tf.data's default options, so with
    autotuning on, and its autotuning thread makes deleting the iterator wait
    (see ``without_autotune``). There is nothing to tune in that stage; this
    wraps the function so that it is built with autotuning off. Applied when
    tfssl makes a multi-worker strategy; tests/test_multi_worker.py fails if a
    TF upgrade renames it."""
    from tensorflow.python.data.ops import multi_device_iterator_ops as mdi

    original = mdi._create_device_dataset
    if getattr(original, "_tfssl_without_autotune", False):
        return

    def create_device_dataset(*args, **kwargs):
        return without_autotune(original(*args, **kwargs))

    create_device_dataset._tfssl_without_autotune = True
    mdi._create_device_dataset = create_device_dataset


def multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """``MultiWorkerMirroredStrategy`` over the cluster that ``TF_CONFIG`` names.

    Checks ``TF_CONFIG`` first (clear errors). Collectives use the ring
    implementation on CPU (NCCL where every worker has GPUs), with no timeout
    (see the note above): a peer that dies or stops is detected by the
    coordination service's heartbeats. The per-device stage of distributed
    datasets is built without autotuning (``without_autotune``).
    """
    parse_tf_config()
    _per_device_datasets_without_autotune()
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO,
        bytes_per_pack=BYTES_PER_PACK)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def configure_cpu_devices(num_devices: int) -> None:
    """Splits the host CPU into ``num_devices`` logical devices.

    Must run before TensorFlow initialises its devices (before the first op).
    It lets ``MirroredStrategy`` run, and be tested, on a machine with no GPU.

    Raises:
      ValueError: ``num_devices`` < 1, or the runtime is already initialised with
        a different split.
    """
    if num_devices < 1:
        raise ValueError(f"--num_cpu_devices must be >= 1, got {num_devices}.")
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current is not None and len(current) == num_devices:
        return
    if num_devices == 1:
        return  # one device is always available, however the CPU is split
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError as e:
        have = len(tf.config.list_logical_devices("CPU"))
        raise ValueError(
            f"--num_cpu_devices={num_devices} cannot be applied: TensorFlow is "
            f"already initialised with {have} CPU device(s). Set it before any "
            "TensorFlow op runs."
        ) from e


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Returns the ``tf.distribute`` strategy named by ``--strategy``.

    Args:
      name: ``auto`` (mirrored over all GPUs if more than one, else over the
        logical CPUs if more than one, else default), ``default`` (one device),
        ``mirrored`` (all GPUs, or all logical CPU devices when there is no GPU),
        ``tpu``, or ``multi_worker`` (``MultiWorkerMirroredStrategy`` over the
        cluster in the ``TF_CONFIG`` environment variable; batch sizes stay global).
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy={name!r} is not one of {STRATEGIES}.")
    if name == "multi_worker":
        return multi_worker_strategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    devices = [d.name for d in gpus] if gpus else [d.name for d in cpus]
    if name == "default" or (name == "auto" and len(devices) < 2):
        return tf.distribute.get_strategy()
    cross = None
    if not gpus:
        # NCCL is GPU-only; on logical CPUs reduce through one device.
        cross = tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross)


def num_replicas() -> int:
    """Replicas in sync of the current strategy (1 outside any strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def scale_loss(loss: tf.Tensor) -> tf.Tensor:
    """Per-replica loss / num_replicas: the summed replica gradients then equal
    the gradient of the global-batch mean."""
    return loss / tf.cast(num_replicas(), loss.dtype)


def all_gather(x: tf.Tensor, axis: int = 0) -> tf.Tensor:
    """Concatenates ``x`` over replicas along ``axis`` (replica order), no gradient.

    In a replica context of a multi-replica strategy this is a collective; in
    a single-device context it is the identity.
    """
    ctx = tf.distribute.get_replica_context()
    x = tf.stop_gradient(x)
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return ctx.all_gather(x, axis=axis)


def _dtype_groups(tensors) -> List[List[int]]:
    """The positions of ``tensors`` grouped by dtype (one collective each)."""
    groups: Dict[tf.DType, List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.values())


def all_gather_many(tensors) -> list:
    """``[all_gather(t) for t in tensors]`` (axis 0, no gradient), with one
    all-gather per dtype instead of one per tensor.

    Each tensor is [n_i, ...] with the same shape on every replica; the result
    i is [R * n_i, ...] in replica order. TF's ``ReplicaContext.all_gather``
    makes two collectives per tensor (the shapes, then the padded values), each
    a network round trip beyond one host; here the tensors of a dtype are
    flattened into one [1, T] row, gathered to [R, T] and split again.
    Identity on one device.
    """
    ctx = tf.distribute.get_replica_context()
    tensors = [tf.stop_gradient(tf.convert_to_tensor(t)) for t in tensors]
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return tensors
    out = [None] * len(tensors)
    for idx in _dtype_groups(tensors):
        flat = [tf.reshape(tensors[i], [-1]) for i in idx]
        rows = ctx.all_gather(tf.concat(flat, 0)[None], axis=0)  # [R, T]
        for i, part in zip(idx, tf.split(rows, tf.stack([tf.size(f) for f in flat]), axis=1)):
            t = tensors[i]
            out[i] = tf.reshape(part, tf.concat([[-1], tf.shape(t)[1:]], 0))
            out[i].set_shape([None if t.shape[0] is None else t.shape[0] * ctx.num_replicas_in_sync]
                             + t.shape[1:].as_list())
    return out


def all_gather_with_ids(x: tf.Tensor, ids: tf.Tensor, num_ids: int):
    """(``all_gather(x)``, ``all_gather(ids)`` as int64) for float32 rows ``x``
    [n, ...] and their integer ``ids`` [n] in [-1, num_ids): one collective when
    the ids are exact in float32 (``num_ids <= 2**24``, see ``id_carrier``),
    else one per dtype."""
    carrier = id_carrier(ids, num_ids) if x.dtype == tf.float32 else tf.cast(ids, tf.int64)
    gx, gids = all_gather_many([x, carrier])
    return gx, tf.cast(gids, tf.int64)


def id_carrier(ids: tf.Tensor, num_ids: int) -> tf.Tensor:
    """Integer ``ids`` in [-1, num_ids) in the dtype that travels with float32
    rows in one collective: float32 where that is exact (``num_ids <= 2**24``),
    else int64 (its own collective). Cast the gathered result back to int64;
    an id outside the range stays outside it (float32 rounding keeps values
    >= 2**24 there), so a lookup with it fails as it would have."""
    return tf.cast(tf.cast(ids, tf.int64), tf.float32 if num_ids <= 2 ** 24 else tf.int64)


def sum_and_gather(summed, gathered=()):
    """(``[all-reduce SUM of t for t in summed]``, ``[all_gather(t) for t in
    gathered]``) in one all-reduce per dtype: what a step needs from the other
    replicas once its gradients are known (the gradients, the step's metric
    sums, the keys a queue or bank appends).

    A gathered tensor [n, ...] with a fully static shape (the same on every
    replica) goes into row r (this replica's index) of a zero [R, n, ...]
    buffer that is summed with the rest: x + 0 = x, so the result is exactly
    the rows every replica gave, in replica order, reshaped to [R * n, ...]
    (no gradient). That moves R times the tensor's bytes, so it is for small
    tensors beside the gradients (a batch of keys, not a bank). A gathered
    tensor without a static shape falls back to ``all_gather_many``. Identity
    on one device.

    Args:
      summed: tensors of any shapes and dtypes, summed over replicas.
      gathered: tensors [n_i, ...], concatenated over replicas along axis 0.
    Returns:
      (summed results, gathered results), in the order given.
    """
    ctx = tf.distribute.get_replica_context()
    summed = [tf.convert_to_tensor(t) for t in summed]
    gathered = [tf.stop_gradient(tf.convert_to_tensor(t)) for t in gathered]
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return summed, gathered
    n_rep, r = ctx.num_replicas_in_sync, ctx.replica_id_in_sync_group
    static = [i for i, t in enumerate(gathered) if t.shape.is_fully_defined()]
    slotted = []
    for i in static:
        t = gathered[i]
        pad = tf.stack([r, n_rep - 1 - r])[None]
        rows = tf.pad(t[None], tf.concat([pad, tf.zeros([t.shape.rank, 2], pad.dtype)], 0))
        slotted.append(tf.ensure_shape(rows, [n_rep] + t.shape.as_list()))
    inputs = summed + slotted
    outputs = [None] * len(inputs)
    for idx in _dtype_groups(inputs):
        for i, x in zip(idx, ctx.all_reduce(tf.distribute.ReduceOp.SUM, [inputs[i] for i in idx])):
            outputs[i] = x
    out_gathered = list(gathered)
    for i, rows in zip(static, outputs[len(summed):]):
        t = gathered[i]
        out_gathered[i] = tf.reshape(rows, [n_rep * t.shape[0]] + t.shape[1:].as_list())
    dynamic = [i for i in range(len(gathered)) if i not in static]
    for i, x in zip(dynamic, all_gather_many([gathered[i] for i in dynamic])):
        out_gathered[i] = x
    return outputs[:len(summed)], out_gathered


def all_reduce_mean(x: tf.Tensor) -> tf.Tensor:
    """Mean of ``x`` over replicas (identity on one device)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return ctx.all_reduce(tf.distribute.ReduceOp.MEAN, x)


def all_gather_with_grad(x: tf.Tensor, axis: int = 0) -> tf.Tensor:
    """Concatenates ``x`` over replicas along ``axis``, WITH gradient.

    Backward: the incoming gradient of the gathered tensor is summed over
    replicas (all-reduce SUM) and each replica keeps its own slice. With the
    per-replica loss scaling of ``scale_loss`` this gives exactly the
    single-device gradient of a loss on the concatenated tensor (PAWS's
    supports: every replica's anchors attend to every replica's supports).
    Identity on one device.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x

    @tf.custom_gradient
    def gather(local):
        out = ctx.all_gather(local, axis=axis)

        def grad(dy):
            total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, dy)
            n = tf.shape(local)[axis]
            start = tf.cast(ctx.replica_id_in_sync_group, tf.int32) * n
            return tf.gather(total, tf.range(start, start + n), axis=axis)
        return out, grad

    return gather(x)


def all_reduce_mean_identity_grad(x: tf.Tensor) -> tf.Tensor:
    """Mean of ``x`` over replicas whose backward is the identity (the official
    PAWS AllReduce of ME-MAX's mean prediction): ``x + sg(mean_r x_r - x)``.
    With ``scale_loss`` the replicas' summed gradients equal the single-device
    gradient of a loss on the global mean. Identity on one device."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return x + tf.stop_gradient(ctx.all_reduce(tf.distribute.ReduceOp.MEAN, x) - x)
