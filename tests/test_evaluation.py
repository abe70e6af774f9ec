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


def test_monitors_add_their_metrics_to_the_epoch_logs():
    from tfssl import methods, models

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = np.arange(40) % 4
    x = (y[:, None, None, None] / 4.0 + 0.05 * rng.normal(size=[40, 8, 8, 1])).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices({"image": x, "label": y}).batch(10)
    train = tf.data.Dataset.from_tensor_slices(
        {"labeled": {"weak": x, "label": y}}).batch(10).repeat()
    m = methods.Supervised(models.encoder(models.small_cnn((8, 8, 1), width=4), (0.5,), (0.3,)), 4)
    m.compile(optimizer=keras.optimizers.SGD(0.01))
    h = m.fit(train, epochs=2, steps_per_epoch=2, verbose=0, callbacks=[
        evaluation.KNNMonitor(ds, ds, 4, k=3, every=2),
        evaluation.LinearProbeMonitor(ds, ds, 4, every=1, steps=100),
        evaluation.TestAccuracy(ds, every=1, use_ema=False)])
    assert len(h.history["knn_top1"]) == 1  # every=2: only after epoch 2
    assert len(h.history["linear_probe_top1"]) == 2
    # Features of 4 well-separated intensity levels: the probe and kNN find them.
    assert h.history["linear_probe_top1"][-1] > 0.9 and h.history["knn_top1"][-1] > 0.9
    assert 0.0 <= h.history["val_top1"][-1] <= 1.0
