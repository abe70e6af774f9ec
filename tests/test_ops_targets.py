"""tfssl.ops.targets against NumPy."""

import numpy as np
import pytest

from tfssl.ops import targets


def _np_sharpen(p, t):
    q = p ** (1.0 / t)
    return q / q.sum(-1, keepdims=True)


@pytest.mark.parametrize("t", [0.25, 0.5, 1.0])
def test_sharpen_matches_numpy(t):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=5).astype(np.float32)
    np.testing.assert_allclose(targets.sharpen(p, t).numpy(), _np_sharpen(p, t), rtol=1e-5, atol=1e-6)


def test_sharpen_handles_zeros_and_tiny_probabilities():
    p = np.array([[1e-30, 0.0, 1.0 - 1e-30], [0.5, 0.5, 0.0]], np.float32)
    out = targets.sharpen(p, 0.25).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[1], [0.5, 0.5, 0.0], atol=1e-6)


def test_soft_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    t = rng.dirichlet(np.ones(4), size=6).astype(np.float32)
    z = rng.normal(size=(6, 4)).astype(np.float32)
    log_sm = z - np.log(np.exp(z).sum(-1, keepdims=True))
    np.testing.assert_allclose(targets.soft_cross_entropy(t, z).numpy(), -(t * log_sm).sum(-1), rtol=1e-5)


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(targets.l2_normalize(x).numpy(), [[0.6, 0.8], [0.0, 0.0]], atol=1e-6)
