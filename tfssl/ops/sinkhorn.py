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

Two formulations, same iterates (so the same labels and iteration counts as
the official float64 code):

* ``log``: every iteration is two logsumexp passes over the matrix. Stable
  for any lambda, but it pays an exp per entry per pass: it is compute bound
  (about 10 GB/s of matrix here, against 28 GB/s of memory bandwidth).
* ``scaled`` (default): stabilised scaling with absorption (Schmitzer 2019).
  The first iteration runs in the log domain; its scalings are then absorbed
  into a float32 kernel ``Kt_ik = exp(lambda log p_ik + log c_i + log r_k)``,
  which is already close to the transport plan, so no relevant entry
  underflows however large lambda is. Later iterations are two matrix-vector
  products on Kt (``r~ = (1/K) / Kt^T c~``, ``c~ = (1/N) / Kt r~``), no exp:
  memory bound. Kt is kept in row blocks of about 1 MB; one pass over the
  blocks ends an iteration (``c~_b = (1/N) / Kt_b r~``) and begins the next
  (``sum_b Kt_b^T c~_b``) while each block is still in cache, so the matrix
  comes from memory once per iteration (up to 128 blocks: a larger matrix
  gets larger blocks, which may not stay in cache), and many iterations run
  per graph call. Per iteration, on repeat calls, that is 1.75-4.9x the
  official float64 NumPy loop measured in the same run, with the same labels
  (BENCHMARKS.md). The log-domain warm-up runs until the cluster scalings
  move by less than e^1 per iteration. When a
  scaling drifts past exp(+-20) the kernel is rebuilt from the input with the
  new scalings (one exp pass), so entries that had underflowed come back; if
  a sum still underflows to zero, the solver falls back to ``log``.
  Kt can instead reuse the input's memory (``overwrite=True`` with a
  ``tf.Variable`` input, one block), so the 1.28M x 3000 problem needs one
  15 GB matrix;
  then drift is absorbed by rescaling Kt in place and entries that underflowed
  stay zero: on pathological, non-converging problems (a model near-certain of
  one cluster for every image at lambda 25) the result can then differ from
  the log domain's. ``SinkhornResult.converged`` says whether tol was met.

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

    @property
    def converged(self) -> bool:
        return self.error <= self._tol

    _tol: float = dataclasses.field(default=0.0, repr=False)


METHODS = ("scaled", "log")


def sinkhorn(log_p, lam: float, tol: float = 0.1, max_iters: int = 1000,
             check_every: int = 10, chunk_size: int = 65536,
             strategy: tf.distribute.Strategy = None, method: str = "scaled",
             overwrite: bool = False) -> SinkhornResult:
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
      strategy: the strategy whose replicas hold the shards (sharded input
        always uses the ``log`` formulation).
      method: ``scaled`` (default; memory bound) or ``log`` (see the module doc).
      overwrite: with ``scaled`` and a ``tf.Variable`` input, build the kernel
        in the variable's memory (its content is destroyed; no second [N, K]
        buffer; no fallback to ``log`` is then possible).

    Returns:
      ``SinkhornResult``.
    """
    if lam <= 0:
        raise ValueError(f"lambda must be > 0, got {lam}.")
    if tol <= 0 or max_iters < 1 or check_every < 1 or chunk_size < 1:
        raise ValueError("tol must be > 0 and max_iters, check_every, chunk_size >= 1.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    lam_t = tf.constant(lam, tf.float32)
    if strategy is None or (strategy.num_replicas_in_sync == 1 and not _is_distributed(log_p)):
        if method == "scaled":
            res = _scaled(log_p, lam_t, tol, max_iters, check_every, chunk_size, overwrite)
            if res is not None:
                return res
        return _single(tf.convert_to_tensor(log_p, tf.float32), lam_t, tol, max_iters,
                       check_every, chunk_size)
    return _sharded(strategy, log_p, lam_t, tol, max_iters, check_every, chunk_size)


# Kernel entries below this are set to 0: they are >= 20 orders of magnitude
# under any entry that matters, and would otherwise drift into float32
# denormals, which are slow on CPUs.
_FLUSH = 1e-30


@tf.function(jit_compile=True, reduce_retracing=True)
def _fill_kernel(block, log_c, log_r, lam):
    x = tf.exp(lam * block + log_c[:, None] + log_r[None, :])
    return tf.where(x < _FLUSH, 0.0, x)


@tf.function(jit_compile=True, reduce_retracing=True)
def _absorb_block(block, c, r):
    x = block * c[:, None] * r[None, :]
    return tf.where(x < _FLUSH, 0.0, x)


@tf.function(jit_compile=True, reduce_retracing=True)
def _scaled_assign(kern, r, c, alpha, beta, lam, n):
    """Labels argmax_k Kt_ik r~_k, and the summed cost -sum_ik N q_ik log p_ik
    with log p recovered from the kernel (entries that underflowed count 0)."""
    scores = kern * r[None, :]
    labels = tf.argmax(scores, axis=1, output_type=tf.int32)
    q = scores * c[:, None] * n
    log_kern = tf.math.log(tf.maximum(kern, 1e-38))
    log_p = (log_kern - alpha[:, None] - beta[None, :]) / lam
    cost = -tf.reduce_sum(tf.where(kern > 0, q * log_p, 0.0))
    return labels, cost


def _dense_reads(var: tf.Variable):
    """Slice assignment puts a resource variable in copy-on-read mode: every
    later read copies the whole buffer (half the speed here, and a second
    15 GB buffer for ImageNet's kernel). Turn it off before reading."""
    tf.raw_ops.DisableCopyOnRead(resource=var.handle)


def read_rows(var: tf.Variable, start: int, end: int) -> tf.Tensor:
    """Rows [start, end) of a [N, K] variable without copying all of it."""
    _dense_reads(var)
    return var[start:end]


def write_rows(var: tf.Variable, start: int, value) -> None:
    """Writes ``value`` into rows [start, start + len) of a [N, K] variable in
    place (no read of the variable, so no whole-buffer copy)."""
    value = tf.convert_to_tensor(value, var.dtype)
    tf.raw_ops.ResourceStridedSliceAssign(
        ref=var.handle, begin=[start, 0], end=[start + int(value.shape[0]), int(var.shape[1])],
        strides=[1, 1], value=value)


@tf.function
def _scaled_steps(blocks, c, it, err, it_end, check_every, tol, absorb_at, n, k):
    """Iterations on the absorbed kernel, in one graph call, from iteration
    ``it`` until the first of: ``it_end``; the error at a check iteration
    (``it % check_every == 0``) is <= tol; a scaling drifted past
    ``absorb_at`` (|log| of any entry of r~ or c~); a sum is not finite.

    An iteration is ``r~ = (1/K) / Kt^T c~`` then ``c~' = (1/N) / Kt r~``.
    The kernel comes in row blocks Kt_b (``blocks``, each a variable of about
    a core's L2 cache), and one pass over them does the second half of an
    iteration and the first half of the next: ``c~_b = (1/N) / Kt_b r~`` and
    ``sum_b Kt_b^T c~_b``, while Kt_b is still in cache. So an iteration reads
    the kernel from memory once, not twice (when a block fits the cache); the
    blocks are independent, so the runtime runs them on both cores. (Matvecs:
    Eigen/oneDNN gemv run at memory bandwidth; XLA's reductions reached a
    third of it here.) Many iterations per call keep the host out of the loop.

    Args:
      blocks: list of float32 [N_b, K] variables, the rows of Kt in order.
      c: float32 [N], the row scalings c~ before iteration ``it``.

    Returns:
      r~ [K] and c~ [N] after the last iteration run, and [the next
      iteration's index (float), error, all finite, max |log scaling|] as one
      float32 tensor.
    """
    sizes = tf.stack([tf.shape(b)[0] for b in blocks])  # not traced in: shapes vary

    # Plain MatMul ops on column/row vectors: tf.linalg.matvec would add two
    # reshapes per call to a graph of a few hundred ops.
    def column_pass(c_parts):  # (1/K) / sum_b Kt_b^T c~_b, from c~_b [N_b, 1]
        s = tf.add_n([tf.matmul(cb, b, transpose_a=True) for b, cb in zip(blocks, c_parts)])
        return (1.0 / k) / tf.reshape(s, [-1])

    def fused_pass(r):  # c~ = (1/N) / Kt r~, and the next r~ from it
        r_col = tf.reshape(r, [-1, 1])
        c_parts = [(1.0 / n) / tf.matmul(b, r_col) for b in blocks]
        return tf.reshape(tf.concat(c_parts, 0), [-1]), column_pass(c_parts)

    def cond(i, r, r_next, c, err, finite, drift):
        return (i < it_end) & finite & (drift <= absorb_at) & (err > tol)

    def body(i, r, r_next, c, err, finite, drift):
        r = r_next
        c_new, r_next = fused_pass(r)
        # Reductions only (no elementwise log): a NaN or inf shows in the sum,
        # an overflowed denominator as a zero minimum.
        lo = tf.minimum(tf.reduce_min(c_new), tf.reduce_min(r))
        hi = tf.maximum(tf.reduce_max(c_new), tf.reduce_max(r))
        finite = tf.math.is_finite(tf.reduce_sum(c_new) + tf.reduce_sum(r)) & (lo > 0)
        drift = tf.maximum(tf.abs(tf.math.log(lo)), tf.abs(tf.math.log(hi)))
        err = tf.cond(i % check_every == 0,
                      lambda: tf.reduce_sum(tf.abs(c / c_new - 1.0)), lambda: err)
        return i + 1, r, r_next, c_new, err, finite, drift  # not finite: the caller stops

    r_first = column_pass(tf.split(tf.reshape(c, [-1, 1]), sizes))
    i, r, _, c, err, finite, drift = tf.while_loop(
        cond, body, (it, r_first, r_first, c, err, tf.constant(True), tf.constant(0.0)))
    return r, c, tf.stack([tf.cast(i, tf.float32), err, tf.cast(finite, tf.float32), drift])


def _rows(src, start, end):
    return read_rows(src, start, end) if isinstance(src, tf.Variable) else src[start:end]


# Rows per kernel block: about 1 MB, so a block stays in a core's L2 cache
# between the two matvecs of _scaled_steps, and at most _MAX_BLOCKS blocks
# (the step's graph has a few ops per block; its tracing and optimisation
# take about 7 ms a block, paid once per shape).
_BLOCK_BYTES = 1 << 20
_MAX_BLOCKS = 128


def _block_starts(n, k):
    rows = max(_BLOCK_BYTES // (4 * k), -(-n // _MAX_BLOCKS), 1)
    return list(range(0, n, rows)) + [n]


def _map_rows_in_place(var, chunk, fn):
    """var[rows] <- fn(var[rows], start, end), chunk by chunk (no second [N, K]
    buffer)."""
    n = int(var.shape[0])
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        write_rows(var, start, fn(read_rows(var, start, end), start, end))
    _dense_reads(var)


def _build_blocks(src, alpha, beta, lam, bounds, blocks=None):
    """Kernel blocks exp(lam * log p + alpha_i + beta_k) of rows
    [bounds[j], bounds[j + 1]) from ``src``: new variables, or written into
    ``blocks``."""
    out = []
    for j, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        value = _fill_kernel(_rows(src, start, end), alpha[start:end], beta, lam)
        if blocks is None:
            out.append(tf.Variable(value, trainable=False))
            _dense_reads(out[-1])
        else:
            blocks[j].assign(value)
    return out or blocks


def _scaled(log_p, lam, tol, max_iters, check_every, chunk_size, overwrite,
            absorb_at: float = 20.0, warmup_max: int = 100):
    """Stabilised scaling (see the module docstring). Returns None when a
    kernel sum underflows and the input is still there to retry in log space."""
    if tf.distribute.has_strategy():
        raise RuntimeError(
            "sinkhorn() builds its [N, K] kernel in a local variable: call it outside "
            "strategy.scope() (Keras callbacks already run outside it), or pass the rows "
            "sharded over replicas with strategy=.")
    in_place = overwrite and isinstance(log_p, tf.Variable)
    if isinstance(log_p, tf.Variable):
        _dense_reads(log_p)  # a slice-filled input would otherwise be copied on read
    src = log_p if isinstance(log_p, tf.Variable) else tf.convert_to_tensor(log_p, tf.float32)
    n, k = int(src.shape[0]), int(src.shape[1])
    chunk = min(chunk_size, n)
    log_n = tf.constant(math.log(n), tf.float32)
    # Warm-up in the log domain (the official iterations, exactly) until the
    # cluster scalings move by less than e^1 per iteration: the kernel built
    # then is close to the plan, so what underflows in it stays irrelevant.
    log_c = tf.fill([n], -math.log(n))
    log_r = tf.fill([k], -math.log(k))
    src_t = tf.convert_to_tensor(src)
    it, err = 0, float("inf")
    # Rebuilding from the input restores underflowed entries, so one log
    # iteration suffices then; in place, warm up until the scalings settle.
    warmup = warmup_max if in_place else 1
    while err > tol and it < min(max_iters, warmup):
        log_r_new = -math.log(k) - column_logsumexp(src_t, log_c, lam, chunk)
        log_c_new = row_update(src_t, log_r_new, lam, log_n, chunk)
        if it % check_every == 0:
            err = float(_error(log_c, log_c_new))
        moved = float(tf.reduce_max(tf.abs(log_r_new - log_r))) if it else float("inf")
        log_r, log_c = log_r_new, log_c_new
        it += 1
        if moved < 1.0:
            break
    del src_t
    if err <= tol or it >= max_iters:
        labels, cost = assign(tf.convert_to_tensor(src), log_r, log_c, lam, log_n, chunk)
        return SinkhornResult(labels, log_r, log_c, it, err, float(cost) / n, tol)
    # Absorb: Kt = exp(lam log p + log c + log r), in row blocks (copy), or
    # in the input's own memory (in place: one block, the input variable).
    alpha, beta = log_c, log_r
    if in_place:
        _map_rows_in_place(src, chunk, lambda rows, start, end: _fill_kernel(
            rows, alpha[start:end], beta, lam))
        blocks = [src]
    else:
        bounds = _block_starts(n, k)
        blocks = _build_blocks(src, alpha, beta, lam, bounds)
    c = tf.ones([n])
    r = tf.ones([k])
    consts = (tf.constant(check_every), tf.constant(tol, tf.float32),
              tf.constant(absorb_at, tf.float32), tf.constant(float(n)), tf.constant(float(k)))
    while err > tol and it < max_iters:
        r, c, status = _scaled_steps(blocks, c, tf.constant(it), tf.constant(err, tf.float32),
                                     tf.constant(max_iters), *consts)
        done, err, finite, drift = (float(x) for x in status.numpy())
        it = int(done)
        if not finite:
            if in_place:
                raise FloatingPointError(
                    "Sinkhorn's scaled kernel underflowed and the input was overwritten: "
                    "rerun with method='log'.")
            return None
        if drift > absorb_at:
            alpha, beta = alpha + tf.math.log(c), beta + tf.math.log(r)
            if in_place:  # the input is gone: rescale what the kernel holds
                _map_rows_in_place(src, chunk, lambda rows, start, end: _absorb_block(
                    rows, c[start:end], r))
            else:  # rebuild from the input: entries that underflowed come back
                _build_blocks(src, alpha, beta, lam, bounds, blocks)
            c, r = tf.ones([n]), tf.ones([k])
    labels, cost = [], tf.constant(0.0)
    row_bounds = list(range(0, n, chunk)) + [n] if in_place else bounds
    for j, (start, end) in enumerate(zip(row_bounds[:-1], row_bounds[1:])):
        kern = read_rows(src, start, end) if in_place else blocks[j]
        lab, part = _scaled_assign(kern, r, c[start:end], alpha[start:end], beta,
                                   lam, tf.cast(n, tf.float32))
        labels.append(lab)
        cost += part
    return SinkhornResult(tf.concat(labels, 0), beta + tf.math.log(r), alpha + tf.math.log(c),
                          it, err, float(cost) / n, tol)


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
    return SinkhornResult(labels, log_r, log_c, it, err, float(cost) / n, tol)


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
    return SinkhornResult(labels, log_r, log_c, it, err, float(cost) / n, tol)
