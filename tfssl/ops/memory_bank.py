"""Memory banks and queues as pure functions: new contents from old contents.

The method owns the variables (model state) and assigns what these return, with
values that are identical on every replica (gathered first).
"""

from __future__ import annotations

import tensorflow as tf


@tf.function(jit_compile=True, reduce_retracing=True)
def last_occurrence(slots: tf.Tensor) -> tf.Tensor:
    """[N] bool: True where ``slots[i]`` does not occur again later in ``slots``.

    A batch may hold the same image twice (a small labeled set repeats to fill
    the batch); writing only the last occurrence makes the write deterministic.
    """
    slots = tf.cast(slots, tf.int64)
    n = tf.shape(slots)[0]
    same = tf.equal(slots[:, None], slots[None, :])
    later = tf.range(n)[None, :] > tf.range(n)[:, None]
    return tf.logical_not(tf.reduce_any(tf.logical_and(same, later), axis=1))


@tf.function(jit_compile=True, reduce_retracing=True)
def bank_write(bank: tf.Tensor, slots: tf.Tensor, values: tf.Tensor,
               momentum: float = 0.0) -> tf.Tensor:
    """The bank after writing ``values`` at rows ``slots``.

    ``bank[s] = values`` (momentum 0), or ``normalize(m bank[s] + (1 - m) values)``
    (the blended write USB uses with m = 0.7). Where a slot occurs more than
    once, its last occurrence is written. Rows not written are unchanged.

    Args:
      bank: [K, D] current bank.
      slots: [N] int rows to write (in [0, K)).
      values: [N, D] new entries (L2-normalised embeddings).
      momentum: m in [0, 1).

    Returns:
      [K, D] the new bank.
    """
    keep = last_occurrence(slots)
    slots = tf.boolean_mask(tf.cast(slots, tf.int64), keep)
    values = tf.boolean_mask(tf.cast(values, bank.dtype), keep)
    if momentum:
        values = tf.math.l2_normalize(momentum * tf.gather(bank, slots) + (1 - momentum) * values,
                                      axis=-1)
    return tf.tensor_scatter_nd_update(bank, slots[:, None], values)


@tf.function(jit_compile=True, reduce_retracing=True)
def queue_push(queue: tf.Tensor, pointer: tf.Tensor, rows: tf.Tensor) -> tuple:
    """Writes ``rows`` [N, D] into the ring buffer ``queue`` [Q, D] at ``pointer``
    (wrapping around); returns (new queue, new pointer = (pointer + N) mod Q)."""
    q = tf.shape(queue)[0]
    n = tf.shape(rows)[0]
    idx = (tf.cast(pointer, tf.int32) + tf.range(n)) % q
    new = tf.tensor_scatter_nd_update(queue, idx[:, None], tf.cast(rows, queue.dtype))
    return new, tf.cast((tf.cast(pointer, tf.int32) + n) % q, pointer.dtype)
