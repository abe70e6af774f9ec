"""Target construction shared by the methods: sharpening and soft cross-entropy.

Method-specific target math (distribution alignment, mixup, ME-MAX, soft
relabelling, ...) is added here by the method that needs it, one function each,
each tested against a NumPy reference in ``tests/test_ops_targets.py``.
"""

from __future__ import annotations

import tensorflow as tf


@tf.function(jit_compile=True, reduce_retracing=True)
def sharpen(p: tf.Tensor, temperature: float) -> tf.Tensor:
    """Temperature sharpening of distributions along the last axis.

    ``sharpen(p, T)_c = p_c^(1/T) / sum_c' p_c'^(1/T)``, computed as
    ``softmax(log(p) / T)`` so that small probabilities do not underflow.

    Args:
      p: [..., C] probabilities (rows sum to 1; zeros allowed).
      temperature: T > 0; T < 1 sharpens, T = 1 is the identity.

    Returns:
      [..., C] sharpened probabilities, same dtype as ``p``.
    """
    p = tf.convert_to_tensor(p)
    t = tf.cast(temperature, p.dtype)
    tiny = tf.constant(1e-30 if p.dtype == tf.float32 else 1e-300, p.dtype)
    return tf.nn.softmax(tf.math.log(tf.maximum(p, tiny)) / t, axis=-1)


@tf.function(jit_compile=True, reduce_retracing=True)
def soft_cross_entropy(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-row cross-entropy ``H(t, softmax(z)) = -sum_c t_c log softmax(z)_c``.

    Args:
      targets: [N, C] target distributions (treated as constants by the caller,
        who wraps them in ``tf.stop_gradient`` where the method says ``sg``).
      logits: [N, C] unnormalised scores.

    Returns:
      [N] cross-entropies (no reduction: methods choose mean and mask).
    """
    return -tf.reduce_sum(targets * tf.nn.log_softmax(logits, axis=-1), axis=-1)


@tf.function(jit_compile=True, reduce_retracing=True)
def l2_normalize(x: tf.Tensor, epsilon: float = 1e-12) -> tf.Tensor:
    """``x / max(||x||_2, eps)`` along the last axis (embeddings before similarities)."""
    return tf.math.l2_normalize(x, axis=-1, epsilon=epsilon)
