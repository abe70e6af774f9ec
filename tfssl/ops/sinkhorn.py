"""Sinkhorn-Knopp for SeLa's self-labelling, in the log domain, chunked over N.

SeLa (Asano et al., 2020) finds pseudo-labels Q that split N images equally
over K clusters and agree with the model's probabilities P as much as
possible: ``max_Q <Q, log P>  s.t.  Q 1 = 1/N, Q^T 1 = 1/K`` with an entropy
term of weight 1/lambda. Its solution is ``Q = diag(c) P^lambda diag(r)``
(rows i, clusters k) with scalings found by alternating

    r_k = (1/K) / sum_i p_ik^lambda c_i        c_i = (1/N) / sum_k p_ik^lambda r_k

until ``sum_i |c_i / c_i' - 1| < tol`` (checked every 10 iterations, as the
official code does). P^25 underflows in float32, so everything here runs on
logs: ``log r_k = -log K - logsumexp_i(lambda log p_ik + log c_i)`` and
likewise for c. The [N, K] matrix is read in chunks of rows, so no [N, K]
temporary is made: N=1.28M x K=3000 needs only the 15 GB input in float32.
Labels are ``argmax_k (log r_k + lambda log p_ik)``.

With the rows sharded over replicas (a ``tf.distribute`` value, one shard
per replica), the per-cluster sums are combined across replicas each
iteration; the result equals the unsharded one.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

_NEG_INF = float("-inf")


def _logaddexp(a, b):
    m = tf.maximum(a, b)
    m_safe = tf.where(tf.math.is_finite(m), m, tf.zeros_like(m))
    return m_safe + tf.math.log(tf.exp(a - m_safe) + tf.exp(b - m_safe))


def _num_chunks(n, chunk):
    return (n + chunk - 1) // chunk


def _window(log_p, i, chunk):
    """Rows [start, start + chunk) with start = min(i * chunk, n - chunk): the
    last window is shifted back so every window has the static size."""
    n = tf.shape(log_p)[0]
    start = tf.minimum(i * chunk, n - chunk)
    return start, tf.slice(log_p, [start, 0], [chunk, tf.shape(log_p)[1]])


@tf.function(jit_compile=True, reduce_retracing=True)
def column_logsumexp(log_p, log_c, lam, chunk: int):
    """``logsumexp_i(lam * log_p[i, k] + log_c[i])`` for each k: float32 [K]."""
    n = tf.shape(log_p)[0]

    def body(i, acc):
        start, block = _window(log_p, i, chunk)
        lc = tf.slice(log_c, [start], [chunk])
        fresh = start + tf.range(chunk) >= i * chunk  # rows not counted yet
        lc = tf.where(fresh, lc, _NEG_INF)
        return i + 1, _logaddexp(acc, tf.reduce_logsumexp(lam * block + lc[:, None], axis=0))

    _, acc = tf.while_loop(lambda i, _: i < _num_chunks(n, chunk), body,
                           (tf.constant(0), tf.fill([tf.shape(log_p)[1]], _NEG_INF)))
    return acc


@tf.function(jit_compile=True, reduce_retracing=True)
def row_update(log_p, log_r, lam, log_n, chunk: int):
    """``log c_i = -log N - logsumexp_k(lam * log_p[i, k] + log_r[k])``: [N]."""
    n = tf.shape(log_p)[0]

    def body(i, out):
        start, block = _window(log_p, i, chunk)
        new = -log_n - tf.reduce_logsumexp(lam * block + log_r[None, :], axis=1)
        idx = (start + tf.range(chunk))[:, None]
        return i + 1, tf.tensor_scatter_nd_update(out, idx, new)

    _, out = tf.while_loop(lambda i, _: i < _num_chunks(n, chunk), body,
                           (tf.constant(0), tf.zeros([n], tf.float32)))
    return out


@tf.function(jit_compile=True, reduce_retracing=True)
def assign(log_p, log_r, log_c, lam, log_n, chunk: int):
    """Labels ``argmax_k(log r_k + lam log p_ik)`` [N] int32, and the summed
    cost ``-sum_i sum_k N q_ik log p_ik`` (q = the transport plan)."""
    n = tf.shape(log_p)[0]

    def body(i, labels, cost):
        start, block = _window(log_p, i, chunk)
        scores = lam * block + log_r[None, :]
        lab = tf.argmax(scores, axis=1, output_type=tf.int32)
        idx = (start + tf.range(chunk))[:, None]
        lc = tf.slice(log_c, [start], [chunk])
        fresh = tf.cast(start + tf.range(chunk) >= i * chunk, tf.float32)
        q = tf.exp(scores + lc[:, None] + log_n)  # rows sum to ~1
        part = -tf.reduce_sum(fresh * tf.reduce_sum(q * block, axis=1))
        return i + 1, tf.tensor_scatter_nd_update(labels, idx, lab), cost + part

    _, labels, cost = tf.while_loop(
        lambda i, *_: i < _num_chunks(n, chunk), body,
        (tf.constant(0), tf.zeros([n], tf.int32), tf.constant(0.0)))
    return labels, cost


@tf.function(jit_compile=True)
def _error(log_c, log_c_new):
    return tf.reduce_sum(tf.abs(tf.exp(log_c - log_c_new) - 1.0))


@dataclasses.dataclass
class SinkhornResult:
    """Labels (int32 [N], or per-replica shards when the input was sharded),
    the log scalings, and diagnostics: iterations run, the last checked
    error, and the mean cost ``-1/N sum_ik N q_ik log p_ik`` (nats)."""

    labels: object
    log_r: tf.Tensor
    log_c: object
    iterations: int
    error: float
    cost: float


def sinkhorn(log_p, lam: float, tol: float = 0.1, max_iters: int = 1000,
             check_every: int = 10, chunk_size: int = 65536,
             strategy: tf.distribute.Strategy = None) -> SinkhornResult:
    """Balanced assignment of N rows to K clusters by Sinkhorn-Knopp.

    Args:
      log_p: float32 [N, K] log-probabilities (log-softmax of the head), or,
        with ``strategy``, a distributed value holding one [N_r, K] shard per
        replica (rows split over replicas).
      lam: lambda (25 ImageNet, 10 CIFAR in the paper).
      tol: stop when ``sum_i |c_i / c_i' - 1| < tol`` (0.1 ImageNet, 0.01 CIFAR).
      max_iters: iteration bound.
      check_every: the error is computed every this many iterations (10, as
        the official code), starting with the first.
      chunk_size: rows per chunk.
      strategy: the strategy whose replicas hold the shards.

    Returns:
      ``SinkhornResult``.
    """
    if lam <= 0:
        raise ValueError(f"lambda must be > 0, got {lam}.")
    if tol <= 0 or max_iters < 1 or check_every < 1 or chunk_size < 1:
        raise ValueError("tol must be > 0 and max_iters, check_every, chunk_size >= 1.")
    lam_t = tf.constant(lam, tf.float32)
    if strategy is None or (strategy.num_replicas_in_sync == 1 and not _is_distributed(log_p)):
        return _single(tf.convert_to_tensor(log_p, tf.float32), lam_t, tol, max_iters,
                       check_every, chunk_size)
    return _sharded(strategy, log_p, lam_t, tol, max_iters, check_every, chunk_size)


def _is_distributed(x):
    return isinstance(x, tf.distribute.DistributedValues)


def _single(log_p, lam, tol, max_iters, check_every, chunk_size):
    n, k = int(log_p.shape[0]), int(log_p.shape[1])
    if n < 1 or k < 1:
        raise ValueError(f"log_p must be [N, K] with N, K >= 1, got {log_p.shape}.")
    chunk = min(chunk_size, n)
    log_n = tf.constant(math.log(n), tf.float32)
    log_r = tf.fill([k], -math.log(k))
    log_c = tf.fill([n], -math.log(n))
    it, err = 0, float("inf")
    while err > tol and it < max_iters:
        log_r = -math.log(k) - column_logsumexp(log_p, log_c, lam, chunk)
        log_c_new = row_update(log_p, log_r, lam, log_n, chunk)
        if it % check_every == 0:
            err = float(_error(log_c, log_c_new))
        log_c = log_c_new
        it += 1
    labels, cost = assign(log_p, log_r, log_c, lam, log_n, chunk)
    return SinkhornResult(labels, log_r, log_c, it, err, float(cost) / n)


def _sharded(strategy, log_p, lam, tol, max_iters, check_every, chunk_size):
    local_n = strategy.run(lambda x: tf.shape(x)[0], (log_p,))
    n = int(strategy.reduce(tf.distribute.ReduceOp.SUM, local_n, axis=None))
    k = int(strategy.experimental_local_results(log_p)[0].shape[1])
    log_n = tf.constant(math.log(n), tf.float32)
    log_c = strategy.run(lambda x: tf.fill([tf.shape(x)[0]], -math.log(n)), (log_p,))
    log_r = tf.fill([k], -math.log(k))

    def chunk(x):  # per shard: its own static row count
        return min(chunk_size, int(x.shape[0]))

    it, err = 0, float("inf")
    while err > tol and it < max_iters:
        part = strategy.run(lambda x, c: column_logsumexp(x, c, lam, chunk(x))[None],
                            (log_p, log_c))
        parts = strategy.gather(part, axis=0)  # [replicas, K]
        log_r = -math.log(k) - tf.reduce_logsumexp(parts, axis=0)
        log_c_new = strategy.run(lambda x: row_update(x, log_r, lam, log_n, chunk(x)),
                                 (log_p,))
        if it % check_every == 0:
            local_err = strategy.run(_error, (log_c, log_c_new))
            err = float(strategy.reduce(tf.distribute.ReduceOp.SUM, local_err, axis=None))
        log_c = log_c_new
        it += 1
    out = strategy.run(lambda x, c: assign(x, log_r, c, lam, log_n, chunk(x)),
                       (log_p, log_c))
    labels, local_cost = out
    cost = strategy.reduce(tf.distribute.ReduceOp.SUM, local_cost, axis=None)
    return SinkhornResult(labels, log_r, log_c, it, err, float(cost) / n)
