"""Sinkhorn-Knopp (log domain, chunked, sharded) against the official float64
linear-space algorithm in NumPy."""

import numpy as np
import pytest
import tensorflow as tf

from tfssl import testing
from tfssl.ops.sinkhorn import sinkhorn


def reference(log_p, lam, tol, check_every=10, max_iters=1000):
    """The official algorithm: float64, linear space, P^lambda."""
    p = np.exp(log_p.astype(np.float64)).T ** lam  # [K, N]
    k, n = p.shape
    r, c = np.ones(k) / k, np.ones(n) / n
    err, it = np.inf, 0
    while err > tol and it < max_iters:
        r = (1 / k) / (p @ c)
        c_new = (1 / n) / (r @ p)
        if it % check_every == 0:
            err = np.nansum(np.abs(c / c_new - 1))
        c = c_new
        it += 1
    q = (p * r[:, None]) * c[None, :]  # [K, N]
    return np.argmax(q, 0), q.T, it


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _problem(n=300, k=7, scale=3.0, seed=0, skew=0.0):
    rng = np.random.default_rng(seed)
    z = scale * rng.normal(size=[n, k])
    z[:, 0] += skew  # a model that prefers cluster 0
    return _log_softmax(z).astype(np.float32)


@pytest.mark.parametrize("method", ["scaled", "log"])
def test_matches_the_float64_reference_labels_marginals_and_iterations(method):
    log_p = _problem()
    want, q, iters = reference(log_p, lam=10, tol=0.01)
    res = sinkhorn(log_p, lam=10, tol=0.01, method=method)
    np.testing.assert_array_equal(res.labels.numpy(), want)
    assert res.iterations == iters
    q_ours = np.exp(res.log_c.numpy()[:, None] + res.log_r.numpy()[None, :] + 10 * log_p)
    np.testing.assert_allclose(q_ours, q, rtol=2e-3, atol=1e-9)
    # Marginals: rows 1/N, columns 1/K (columns are exact after the r step's
    # successor c step only up to tol; rows exact).
    np.testing.assert_allclose(q_ours.sum(1), 1 / 300, rtol=1e-4)
    np.testing.assert_allclose(q_ours.sum(0), 1 / 7, rtol=0.02)
    assert res.error < 0.01 and res.converged and res.cost > 0


@pytest.mark.parametrize("method", ["scaled", "log"])
def test_survives_where_float32_linear_space_underflows(method):
    log_p = _problem(n=200, k=10, scale=6.0, seed=1)
    lam = 25.0
    with np.errstate(all="ignore"):
        p32 = np.exp(log_p).T.astype(np.float32) ** np.float32(lam)
        r = np.float32(1 / 10) / (p32 @ np.full(200, 1 / 200, np.float32))
    assert not np.all(np.isfinite(r)) or (p32 == 0).mean() > 0.3  # linear float32 breaks
    want, _, _ = reference(log_p, lam=lam, tol=0.1)
    res = sinkhorn(log_p, lam=lam, tol=0.1, method=method)
    assert np.all(np.isfinite(res.log_r.numpy())) and np.all(np.isfinite(res.log_c.numpy()))
    np.testing.assert_array_equal(res.labels.numpy(), want)


@pytest.mark.parametrize("method", ["scaled", "log"])
def test_chunked_equals_unchunked(method):
    log_p = _problem(n=257, k=5, seed=2)
    whole = sinkhorn(log_p, lam=10, tol=0.01, chunk_size=10_000, method=method)
    chunked = sinkhorn(log_p, lam=10, tol=0.01, chunk_size=16, method=method)  # 257 = 16*16+1
    np.testing.assert_array_equal(chunked.labels.numpy(), whole.labels.numpy())
    np.testing.assert_allclose(chunked.log_r.numpy(), whole.log_r.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked.log_c.numpy(), whole.log_c.numpy(), rtol=1e-5, atol=1e-5)
    assert chunked.iterations == whole.iterations
    assert chunked.cost == pytest.approx(whole.cost, rel=1e-4)


def test_sharded_over_two_replicas_equals_one_device():
    log_p = _problem(n=240, k=6, seed=3)
    one = sinkhorn(log_p, lam=10, tol=0.01, chunk_size=50)
    strategy = testing.mirrored_cpu_strategy(2)
    shards = [log_p[:130], log_p[130:]]  # unequal shards are fine
    dist = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(shards[ctx.replica_id_in_sync_group]))
    two = sinkhorn(dist, lam=10, tol=0.01, chunk_size=50, strategy=strategy)
    labels = np.concatenate([x.numpy() for x in strategy.experimental_local_results(two.labels)])
    np.testing.assert_array_equal(labels, one.labels.numpy())
    np.testing.assert_allclose(two.log_r.numpy(), one.log_r.numpy(), rtol=1e-5, atol=1e-5)
    assert two.iterations == one.iterations
    assert two.cost == pytest.approx(one.cost, rel=1e-4)


@pytest.mark.parametrize("method", ["scaled", "log"])
def test_equipartition_even_when_the_model_prefers_one_cluster(method):
    log_p = _problem(n=1000, k=10, scale=1.0, seed=4, skew=3.0)
    assert np.bincount(log_p.argmax(1), minlength=10)[0] > 500  # argmax is lopsided
    res = sinkhorn(log_p, lam=25, tol=0.01, method=method)
    counts = np.bincount(res.labels.numpy(), minlength=10)
    assert counts.min() >= 80 and counts.max() <= 120  # about N/K = 100 each


def test_iteration_bound_and_bad_arguments():
    res = sinkhorn(_problem(), lam=10, tol=1e-12, max_iters=7)
    assert res.iterations == 7 and not res.converged
    with pytest.raises(ValueError, match="lambda"):
        sinkhorn(_problem(), lam=0)


def test_scaled_equals_log_on_a_confident_model_with_large_lambda():
    # p^25 spans far more than float32's range: absorption must keep it stable.
    log_p = _problem(n=500, k=20, scale=8.0, seed=5, skew=10.0)
    a = sinkhorn(log_p, lam=25, tol=0.01, method="scaled")
    b = sinkhorn(log_p, lam=25, tol=0.01, method="log")
    want, _, iters = reference(log_p, lam=25, tol=0.01)
    np.testing.assert_array_equal(a.labels.numpy(), b.labels.numpy())
    np.testing.assert_array_equal(a.labels.numpy(), want)
    assert a.iterations == b.iterations == iters
    np.testing.assert_allclose(a.log_r.numpy() - a.log_r.numpy().mean(),
                               b.log_r.numpy() - b.log_r.numpy().mean(), rtol=1e-4, atol=1e-3)
    assert a.cost == pytest.approx(b.cost, rel=1e-3)


def test_scaled_in_place_on_a_variable():
    log_p = _problem(n=300, k=6, seed=6)
    want = sinkhorn(log_p, lam=10, tol=0.01, method="log")
    var = tf.Variable(log_p)
    got = sinkhorn(var, lam=10, tol=0.01, overwrite=True, chunk_size=64)
    np.testing.assert_array_equal(got.labels.numpy(), want.labels.numpy())
    assert not np.allclose(var.numpy(), log_p)  # the kernel now lives there
    assert got.cost == pytest.approx(want.cost, rel=1e-3)


@pytest.mark.parametrize("problem", [dict(n=257, k=5, seed=2, lam=10.0),  # 16 blocks + 1 row
                                     dict(n=500, k=20, scale=8.0, seed=5, skew=10.0, lam=25.0)])
def test_kernel_in_row_blocks_equals_one_block(problem, monkeypatch):
    # The scaled loop fuses the two matvecs block by block; the second problem
    # also drifts, so the blocks are rebuilt from the input (absorption).
    from tfssl.ops import sinkhorn as module

    lam = problem.pop("lam")
    log_p = _problem(**problem)
    monkeypatch.setattr(module, "_BLOCK_BYTES", 1 << 30)
    one = sinkhorn(log_p, lam=lam, tol=0.01)
    monkeypatch.setattr(module, "_BLOCK_BYTES", 4 * log_p.shape[1] * 16)  # 16 rows a block
    assert len(module._block_starts(*log_p.shape)) - 1 == -(-log_p.shape[0] // 16)
    blocked = sinkhorn(log_p, lam=lam, tol=0.01)
    want, _, iters = reference(log_p, lam=lam, tol=0.01)
    np.testing.assert_array_equal(blocked.labels.numpy(), want)
    np.testing.assert_array_equal(blocked.labels.numpy(), one.labels.numpy())
    assert blocked.iterations == one.iterations == iters
    np.testing.assert_allclose(blocked.log_r.numpy(), one.log_r.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(blocked.log_c.numpy(), one.log_c.numpy(), rtol=1e-5, atol=1e-4)
    assert blocked.cost == pytest.approx(one.cost, rel=1e-4)


def test_repeat_calls_at_other_sizes_with_as_many_blocks(monkeypatch):
    from tfssl.ops import sinkhorn as module

    monkeypatch.setattr(module, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(module, "_MAX_BLOCKS", 4)
    for n in (40, 80, 70):  # 4 blocks each: 10, 20, and 18 + 18 + 18 + 16 rows
        log_p = _problem(n=n, k=5, seed=n)
        want, _, iters = reference(log_p, lam=10, tol=0.01)
        res = sinkhorn(log_p, lam=10, tol=0.01)
        np.testing.assert_array_equal(res.labels.numpy(), want)
        assert res.iterations == iters
