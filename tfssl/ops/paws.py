"""PAWS (Assran et al., ICCV 2021) tensor math: the soft nearest-neighbour
classifier, the support-label matrix, the swapped multi-crop targets, the
cross-entropy and ME-MAX.

Notation: ``n`` anchors (every unlabeled view), ``m`` supports, ``C'`` support
columns (the i-th *sampled* class of the step, not a dataset class id).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfssl.ops.targets import sharpen

TARGET_FLOOR = 1e-4  # target entries below this are zeroed (official, for stability)


@tf.function(jit_compile=True, reduce_retracing=True)
def snn(query: tf.Tensor, supports: tf.Tensor, support_labels: tf.Tensor,
        temperature: float = 0.1) -> tf.Tensor:
    """Soft nearest-neighbour class distribution of each query.

    ``snn(q) = softmax_j(norm(q) . norm(s_j) / tau) @ Y``

    Args:
      query: [n, d] embeddings (normalised here).
      supports: [m, d] support embeddings (normalised here).
      support_labels: [m, C'] (smoothed) label rows of the supports.
      temperature: tau (0.1).

    Returns:
      [n, C'] distributions (rows sum to 1 when the label rows do).
    """
    q = tf.math.l2_normalize(query, axis=-1)
    s = tf.math.l2_normalize(supports, axis=-1)
    weights = tf.nn.softmax(tf.matmul(q, s, transpose_b=True) / temperature, axis=-1)
    return tf.matmul(weights, tf.cast(support_labels, weights.dtype))


def support_labels(classes_per_batch: int, imgs_per_class: int, num_views: int = 1,
                   smoothing: float = 0.1, num_chunks: int = 1) -> np.ndarray:
    """The fixed, label-smoothed label matrix of a class-interleaved support batch.

    Layout (what ``tfssl.data.support_stream`` produces): for each view, the
    batch is ``num_chunks`` consecutive chunks; chunk r holds the classes
    ``r*G .. (r+1)*G - 1`` (``G = classes_per_batch / num_chunks``) interleaved,
    ``[c_rG, .., c_rG+G-1, c_rG, ..]``, ``imgs_per_class`` rounds. Views follow
    each other: ``[view 0 rows, view 1 rows, ...]``. ``num_chunks > 1`` is the
    "different classes per replica" layout (one chunk per replica).

    Entries: ``off = smoothing / C'`` everywhere, ``on = 1 - smoothing + off``
    at the row's column (rows sum to 1).

    Returns:
      float32 [num_views * classes_per_batch * imgs_per_class, classes_per_batch].
    """
    if classes_per_batch < 1 or imgs_per_class < 1 or num_views < 1:
        raise ValueError("classes_per_batch, imgs_per_class and num_views must be >= 1.")
    if num_chunks < 1 or classes_per_batch % num_chunks:
        raise ValueError(f"classes_per_batch={classes_per_batch} does not divide into "
                         f"{num_chunks} chunks (one per replica with unique classes).")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}.")
    g = classes_per_batch // num_chunks
    cols = np.concatenate([r * g + np.tile(np.arange(g), imgs_per_class)
                           for r in range(num_chunks)])
    cols = np.tile(cols, num_views)
    off = smoothing / classes_per_batch
    labels = np.full([len(cols), classes_per_batch], off, np.float32)
    labels[np.arange(len(cols)), cols] = 1.0 - smoothing + off
    return labels


@tf.function(jit_compile=True, reduce_retracing=True)
def paws_targets(global_probs: tf.Tensor, num_local: int, sharpen_t: float = 0.25) -> tf.Tensor:
    """Targets of every anchor from the two global views' SNN predictions.

    ``global_probs`` holds ``[view 1 rows (b), view 2 rows (b)]``, each computed
    from the projection ``h`` of that view. The targets are swapped (view 1's
    anchor learns view 2's prediction and vice versa) and sharpened; each local
    crop's target is the mean of the two global targets; entries below 1e-4
    are zeroed (not renormalised, as the official code).

    Args:
      global_probs: [2b, C'] SNN distributions of the global views.
      num_local: local crops per image.
      sharpen_t: T of the sharpening (0.25).

    Returns:
      [(2 + num_local) b, C'] targets, rows in the anchor order
      ``[global 1, global 2, local 1, ..., local num_local]``. No gradient.
    """
    p = tf.stop_gradient(global_probs)
    p1, p2 = tf.split(p, 2, axis=0)
    t = sharpen(tf.concat([p2, p1], axis=0), sharpen_t)
    if num_local:
        t1, t2 = tf.split(t, 2, axis=0)
        local = 0.5 * (t1 + t2)
        t = tf.concat([t] + [local] * num_local, axis=0)
    return tf.where(t < TARGET_FLOOR, tf.zeros_like(t), t)


@tf.function(jit_compile=True, reduce_retracing=True)
def paws_cross_entropy(targets: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
    """``L_paws = 1/n sum_i H(t_i, p_i) = -1/n sum_i sum_c t_ic log p_ic``.

    ``p`` are SNN distributions (not logits); entries with ``t = 0`` contribute
    0 even where ``p`` is 0 (``xlogy``).

    Args:
      targets: [n, C'] (constants).
      probs: [n, C'] anchor predictions.

    Returns:
      scalar mean over the n anchors.
    """
    return -tf.reduce_mean(tf.reduce_sum(tf.math.xlogy(targets, probs), axis=-1))


def me_max(probs: tf.Tensor, sharpen_t: float = 0.25, mean_fn=None) -> tf.Tensor:
    """Mean-entropy maximisation regulariser ``L_me = sum_c p_bar_c log p_bar_c``.

    ``p_bar = mean over anchors (and replicas) of sharpen(p_i, T)``; gradient
    flows through the sharpening. Minimising ``L_me`` spreads the predictions
    over all support classes.

    Args:
      probs: [n, C'] anchor predictions of this replica.
      sharpen_t: T (0.25, the targets' sharpening).
      mean_fn: maps this replica's mean [C'] to the global-batch mean
        (``tfssl.distribute.all_reduce_mean_identity_grad`` under a strategy,
        whose backward is the identity, as the official AllReduce); ``None``
        on one device.

    Returns:
      scalar L_me (in [-log C', 0]).
    """
    p_bar = tf.reduce_mean(sharpen(probs, sharpen_t), axis=0)
    if mean_fn is not None:
        p_bar = mean_fn(p_bar)
    return tf.reduce_sum(tf.math.xlogy(p_bar, p_bar))
