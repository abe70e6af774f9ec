"""Similarity-based targets: SimMatch's unfold / aggregate label propagation."""

from __future__ import annotations

import tensorflow as tf


@tf.function(jit_compile=True, reduce_retracing=True)
def instance_similarity(z: tf.Tensor, bank: tf.Tensor, temperature: float) -> tf.Tensor:
    """``q_ij = softmax_j(z_i . bank_j / t)``: a distribution over the K bank entries.

    Args:
      z: [B, D] L2-normalised embeddings.
      bank: [K, D] L2-normalised bank embeddings.
      temperature: t (0.1 in SimMatch).

    Returns:
      [B, K] probabilities.
    """
    return tf.nn.softmax(tf.matmul(z, bank, transpose_b=True) / temperature, axis=-1)


@tf.function(jit_compile=True, reduce_retracing=True)
def unfold(p: tf.Tensor, bank_labels: tf.Tensor) -> tf.Tensor:
    """Unfold class probabilities onto the bank entries: ``p_unf[i, j] = p[i, label_j]``.

    Args:
      p: [B, C] class probabilities.
      bank_labels: [K] int labels of the bank entries.

    Returns:
      [B, K].
    """
    return tf.gather(p, tf.cast(bank_labels, tf.int32), axis=1)


@tf.function(jit_compile=True, reduce_retracing=True)
def aggregate(q: tf.Tensor, bank_labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    """Aggregate a distribution over bank entries into classes:
    ``q_agg[i, c] = sum_j q[i, j] 1[label_j == c]``.

    Args:
      q: [B, K] distribution over the bank.
      bank_labels: [K] int labels.
      num_classes: C.

    Returns:
      [B, C].
    """
    onehot = tf.one_hot(tf.cast(bank_labels, tf.int32), num_classes, dtype=q.dtype)
    return tf.matmul(q, onehot)


@tf.function(jit_compile=True, reduce_retracing=True)
def calibrated_targets(p: tf.Tensor, q: tf.Tensor, bank_labels: tf.Tensor,
                       alpha: float) -> tuple:
    """SimMatch's label propagation between the semantic and instance spaces.

    ``q_hat = normalize_rows(q * unfold(p))`` (instance target, [B, K]) and
    ``p_hat = alpha p + (1 - alpha) aggregate(q)`` (semantic target, [B, C]; the
    official code mixes linearly).

    Args:
      p: [B, C] (aligned) teacher class probabilities of the weak views.
      q: [B, K] teacher instance similarities to the labeled bank.
      bank_labels: [K] int labels of the bank.
      alpha: weight of p in p_hat (0.9).

    Returns:
      (q_hat [B, K], p_hat [B, C]).
    """
    q_scaled = q * unfold(p, bank_labels)
    q_hat = q_scaled / tf.maximum(tf.reduce_sum(q_scaled, axis=-1, keepdims=True), 1e-12)
    p_hat = alpha * p + (1.0 - alpha) * aggregate(q, bank_labels, tf.shape(p)[-1])
    return q_hat, p_hat
