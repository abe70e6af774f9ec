"""kNN (streamed) and the linear probe against brute-force NumPy."""

import keras
import numpy as np
import tensorflow as tf

from tfssl import evaluation


def _norm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_streamed_knn_equals_brute_force():
    rng = np.random.default_rng(0)
    q = _norm(rng.normal(size=[20, 5]).astype("float32"))
    bank = _norm(rng.normal(size=[53, 5]).astype("float32"))
    labels = rng.integers(0, 4, [53])
    k, t = 7, 0.1
    batches = [(bank[i:i + 10], labels[i:i + 10]) for i in range(0, 53, 10)]
    scores = evaluation.knn_predict(q, batches, 4, k=k, t=t)
    sims = q @ bank.T
    expected = np.zeros([20, 4])
    for i in range(20):
        top = np.argsort(-sims[i])[:k]
        for j in top:
            expected[i, labels[j]] += np.exp(sims[i, j] / t)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)


def test_knn_accuracy_on_an_identity_encoder():
    enc = keras.Sequential([keras.Input((3,)), keras.layers.Identity()])
    centres = np.eye(3, dtype="float32")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, [60])
    x = centres[y] + 0.05 * rng.normal(size=[60, 3]).astype("float32")
    ds = lambda a, b: tf.data.Dataset.from_tensor_slices({"image": a, "label": b}).batch(16)
    acc = evaluation.knn_accuracy(enc, ds(x[:30], y[:30]), ds(x[30:], y[30:]), 3, k=5)
    assert acc == 1.0


def test_linear_probe_separates_linearly_separable_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=[200, 4]).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int64")
    w, b, mu, sigma = evaluation.fit_linear(x[:100], y[:100], 2, steps=300)
    pred = np.argmax(((x[100:] - mu) / sigma) @ w + b, 1)
    assert np.mean(pred == y[100:]) > 0.95
