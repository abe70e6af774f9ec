"""Strategies and cross-replica helpers.

Everything a method needs to behave the same on one device and on N replicas:

* ``scale_loss``: Keras 3 SUMS replica gradients in a custom ``train_step``, so
  each replica's loss is divided by ``num_replicas_in_sync``.
* ``all_gather`` / ``all_reduce_mean``: identical values on every replica for
  what the algorithm defines over the global batch (queues, banks, averages).
"""

from __future__ import annotations

import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")

MULTI_WORKER_REFUSAL = (
    "--strategy=multi_worker is not supported yet: Keras 3's fit() fails under "
    "MultiWorkerMirroredStrategy for models with a custom train_step (its "
    "symbolic build and its per-step metric reduction both break). Use "
    "--strategy=mirrored on one host until tfssl's multi-worker support lands."
)


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
        ``tpu``, or ``multi_worker`` (refused for now, with the reason).
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy={name!r} is not one of {STRATEGIES}.")
    if name == "multi_worker":
        raise ValueError(MULTI_WORKER_REFUSAL)
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


def all_reduce_mean(x: tf.Tensor) -> tf.Tensor:
    """Mean of ``x`` over replicas (identity on one device)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return ctx.all_reduce(tf.distribute.ReduceOp.MEAN, x)
