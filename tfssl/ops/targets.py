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


@tf.function(jit_compile=True, reduce_retracing=True)
def guess_labels(probs: tf.Tensor, temperature: float) -> tf.Tensor:
    """MixMatch label guessing: ``q = sharpen(1/K sum_k p_k, T)``.

    Args:
      probs: [K, B, C] class probabilities of the K augmentations of B images.
      temperature: T of the sharpening (0.5 in MixMatch).

    Returns:
      [B, C] guessed label distributions (the same guess labels every view).
    """
    return sharpen(tf.reduce_mean(probs, axis=0), temperature)


def mixup_draws(n: int, alpha: float, seed) -> tuple:
    """Per-sample MixUp coefficients and partners, from a stateless seed.

    ``lambda_i ~ Beta(alpha, alpha)`` (as ``g1 / (g1 + g2)``, ``g ~ Gamma(alpha)``)
    and a uniformly random permutation of the n rows. A function of ``seed``
    only, so every replica (and a resumed run) draws the same values.

    Args:
      n: rows of the batch being mixed.
      alpha: Beta concentration (0.75 in MixMatch).
      seed: int [2] stateless seed.

    Returns:
      (lambda [n] float32 in (0, 1), permutation [n] int32).
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    g1 = tf.random.stateless_gamma([n], seeds[0], alpha=alpha)
    g2 = tf.random.stateless_gamma([n], seeds[1], alpha=alpha)
    lam = g1 / tf.maximum(g1 + g2, 1e-30)
    perm = tf.argsort(tf.random.stateless_uniform([n], seeds[2]))
    return lam, perm


@tf.function(jit_compile=True, reduce_retracing=True)
def mixup(x: tf.Tensor, p: tf.Tensor, lam: tf.Tensor, perm: tf.Tensor) -> tuple:
    """MixUp with ``lambda' = max(lambda, 1 - lambda)`` per sample (MixMatch):
    ``x'_i = lambda'_i x_i + (1 - lambda'_i) x_perm(i)``, same for the targets,
    so each mixed row stays closer to its own row than to its partner.

    Args:
      x: [N, ...] inputs.
      p: [N, C] target distributions.
      lam: [N] coefficients lambda in [0, 1].
      perm: [N] partner indices (a permutation).

    Returns:
      (x' [N, ...], p' [N, C]).
    """
    lam = tf.maximum(lam, 1.0 - lam)
    lx = tf.reshape(tf.cast(lam, x.dtype), [-1] + [1] * (len(x.shape) - 1))
    lp = tf.cast(lam, p.dtype)[:, None]
    x_mix = lx * x + (1.0 - lx) * tf.gather(x, perm)
    p_mix = lp * p + (1.0 - lp) * tf.gather(p, perm)
    return x_mix, p_mix


@tf.function(jit_compile=True, reduce_retracing=True)
def distribution_alignment(p: tf.Tensor, model_mean: tf.Tensor,
                           target: tf.Tensor = None) -> tf.Tensor:
    """Distribution alignment: ``p~ = normalize(p * target / model_mean)``.

    Args:
      p: [B, C] class probabilities.
      model_mean: [C] running mean of the model's predictions (SimMatch: the mean
        of a queue of batch means).
      target: [C] target marginal (default uniform).

    Returns:
      [B, C] aligned probabilities.
    """
    if target is None:
        target = tf.fill(tf.shape(model_mean), 1.0 / tf.cast(tf.shape(model_mean)[0], p.dtype))
    q = p * (target + 1e-6) / (model_mean + 1e-6)
    return q / tf.reduce_sum(q, axis=-1, keepdims=True)


@tf.function(jit_compile=True, reduce_retracing=True)
def filled_rows_mean(queue: tf.Tensor) -> tf.Tensor:
    """Mean of the rows of a zero-initialised queue of distributions that have
    been written (rows that sum to more than 0): ``1/|F| sum_{r in F} queue_r``.

    SimMatch's DA queue starts empty: the official code divides by the mean of
    a zero-initialised queue, which after the row normalisation equals the mean
    over the filled rows (the zeros only scale it).

    Args:
      queue: [L, C] rows of batch-mean probabilities, zeros where unwritten.

    Returns:
      [C] (zeros if no row is filled).
    """
    filled = tf.cast(tf.reduce_sum(queue, axis=-1) > 0, queue.dtype)
    return tf.reduce_sum(queue * filled[:, None], axis=0) / tf.maximum(tf.reduce_sum(filled), 1.0)


@tf.function(jit_compile=True, reduce_retracing=True)
def thresholded_cross_entropy(p_hat: tf.Tensor, logits: tf.Tensor, threshold: float,
                              hard: bool = False) -> tuple:
    """Confidence-masked pseudo-label loss (FixMatch / SimMatch):
    ``L_u = 1/B_u sum_i 1[max_c p_hat_ic >= tau] H(t_i, softmax(logits_i))`` with
    ``t_i = p_hat_i`` (soft, SimMatch) or ``onehot(argmax p_hat_i)`` (hard,
    FixMatch). The mean runs over ALL B_u rows: masked rows count in the
    denominator.

    Args:
      p_hat: [B_u, C] targets (constants).
      logits: [B_u, C] student logits of the strong views.
      threshold: tau.
      hard: argmax targets.

    Returns:
      (L_u scalar, mask [B_u] float).
    """
    mask = tf.cast(tf.reduce_max(p_hat, -1) >= threshold, logits.dtype)
    t = tf.one_hot(tf.argmax(p_hat, -1), tf.shape(p_hat)[-1], dtype=logits.dtype) if hard else p_hat
    return tf.reduce_mean(mask * soft_cross_entropy(t, logits)), mask


@tf.function(jit_compile=True, reduce_retracing=True)
def entropy_confidence(d: tf.Tensor) -> tf.Tensor:
    """ASCL's confidence ``c = 1 - H(d) / log(n)`` of distributions d [B, n]:
    0 for a uniform d, 1 for a one-hot d. Returns [B]."""
    n = tf.cast(tf.shape(d)[-1], d.dtype)
    h = -tf.reduce_sum(d * tf.math.log(tf.maximum(d, 1e-30)), axis=-1)
    return 1.0 - h / tf.math.log(n)


def ascl_soft_labels(d: tf.Tensor, kind: str, num_neighbours: int = 1) -> tf.Tensor:
    """ASCL's soft targets over the 1 + n logits ``[q.k, q.queue_1..n]``.

    With ``c = entropy_confidence(d)`` and the positive's weight y_0 = 1:
    ``ascl``: y_j = min(1, K c d_j); ``ahcl``: y_j = c on the top-K entries of d;
    ``hard``: y_j = 1 on the top-K; ``moco``: y_j = 0. Then ``y <- y / sum(y)``
    (the clip comes before the normalisation), so the positive keeps a weight
    >= 1 / (1 + K).

    Args:
      d: [B, n] teacher distribution of each key over the queue (softmax of
        ``k . queue / T2``).
      kind: ascl | ahcl | hard | moco.
      num_neighbours: K.

    Returns:
      [B, 1 + n] rows summing to 1.
    """
    if kind not in ("ascl", "ahcl", "hard", "moco"):
        raise ValueError(f"kind must be one of ascl, ahcl, hard, moco; got {kind!r}.")
    return _ascl_soft_labels(d, kind, num_neighbours)


@tf.function(jit_compile=True, reduce_retracing=True)
def _ascl_soft_labels(d, kind, num_neighbours):
    b = tf.shape(d)[0]
    if kind == "moco" or num_neighbours == 0:
        rest = tf.zeros_like(d)
    elif kind == "ascl":
        c = entropy_confidence(d)[:, None]
        rest = tf.minimum(1.0, num_neighbours * c * d)
    else:
        top = tf.math.top_k(d, k=num_neighbours).indices
        onehot = tf.reduce_sum(tf.one_hot(top, tf.shape(d)[-1], dtype=d.dtype), axis=1)
        rest = onehot * (entropy_confidence(d)[:, None] if kind == "ahcl" else 1.0)
    y = tf.concat([tf.ones([b, 1], d.dtype), rest], axis=1)
    return y / tf.reduce_sum(y, axis=-1, keepdims=True)
