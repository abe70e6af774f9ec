"""ASCL / MoCo / ASCL-BYOL: soft labels against NumPy, the queue, ghost BN,
replicas, resume, fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import methods, models, testing
from tfssl.methods.ascl import ASCL, ASCLBYOL, MoCo
from tfssl.models.backbones import GhostBatchNormalization
from tfssl.ops import targets


def _np_labels(d, kind, k):
    n = d.shape[1]
    c = 1 + (d * np.log(np.maximum(d, 1e-30))).sum(-1) / np.log(n)
    rest = np.zeros_like(d)
    if kind == "ascl":
        rest = np.minimum(1.0, k * c[:, None] * d)
    elif kind in ("ahcl", "hard"):
        for i in range(len(d)):
            top = np.argsort(-d[i])[:k]
            rest[i, top] = c[i] if kind == "ahcl" else 1.0
    y = np.concatenate([np.ones([len(d), 1]), rest], 1)
    return y / y.sum(-1, keepdims=True), c


@pytest.mark.parametrize("kind", ["ascl", "ahcl", "hard", "moco"])
@pytest.mark.parametrize("k", [1, 3])
def test_soft_labels_match_numpy(kind, k):
    rng = np.random.default_rng(0)
    d = rng.dirichlet(np.full(6, 0.3), size=5).astype("float32")
    d[0] = 1 / 6  # uniform: c = 0
    d[1] = [0.999, 0.0002, 0.0002, 0.0002, 0.0002, 0.0002]  # peaked: K c d > 1 is clipped
    y = targets.ascl_soft_labels(d, kind, k).numpy()
    want, c = _np_labels(d.astype("float64"), kind, k)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(targets.entropy_confidence(d).numpy(), c, rtol=1e-4, atol=1e-6)
    assert abs(c[0]) < 1e-6
    assert (y[:, 0] >= 1 / (1 + k) - 1e-6).all()  # the positive keeps >= 1/(1+K)
    if kind == "ascl":
        assert abs(y[0, 0] - 1) < 1e-6  # uniform d: no soft neighbour
        if k == 3:  # the clip before normalising: 3 * c * 0.999 > 1 -> 1, so y_0 = y_1
            np.testing.assert_allclose(y[1, 0], y[1, 1], rtol=1e-5)
    if kind == "moco":
        np.testing.assert_array_equal(y[:, 0], 1.0)


def test_ghost_batch_norm_normalises_each_group():
    x = np.random.default_rng(1).normal(size=(16, 2, 2, 3)).astype("float32") * 3 + 1
    layer = GhostBatchNormalization(groups=4, momentum=0.9, epsilon=1e-5)
    y = layer(x, training=True).numpy()
    g = x.reshape(4, 4, 2, 2, 3)
    mean, var = g.mean((1, 2, 3), keepdims=True), g.var((1, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * mean.mean(0).ravel(), rtol=1e-5)
    with pytest.raises(ValueError, match="does not divide into 4 groups"):
        layer(x[:6], training=True)


def _encoder(norm="none"):
    return models.encoder(models.small_cnn((8, 8, 1), width=8, norm=norm), (0.5,), (0.25,))


def _data(n=32, b=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, [n, 8, 8, 1]).astype("float32")
    return tf.data.Dataset.from_tensor_slices({"unlabeled": {
        "query": x, "key": np.clip(x * 1.1, 0, 1), "label": np.arange(n) % 10,
        "index": np.arange(n)}}).batch(b)


def test_queue_wraps_around_with_labels_and_pointer():
    keras.utils.set_random_seed(0)
    m = ASCL(_encoder(), queue_size=24, proj_dims=(16, 8))
    m.compile(optimizer=keras.optimizers.SGD(0.0))
    batches = list(_data(32, 8))
    for i, batch in enumerate(batches):  # 4 batches of 8 into 24 slots
        m.train_on_batch(batch)
        assert int(m.queue_pointer.numpy()) == (8 * (i + 1)) % 24
    labels = m.queue_labels.numpy()
    np.testing.assert_array_equal(labels[:8], np.arange(24, 32) % 10)  # the 4th batch wrapped
    np.testing.assert_array_equal(labels[8:], np.arange(8, 24) % 10)
    q = m.queue.numpy()
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="does not divide by the global batch"):
        m.check_global_batch(16)
    bad = ASCL(_encoder(), queue_size=20, proj_dims=(16, 8))
    bad.compile(optimizer=keras.optimizers.SGD(0.0))
    with pytest.raises(ValueError, match="does not divide by the global batch"):
        bad.train_on_batch(batches[0])  # 8 does not divide 20


@pytest.mark.parametrize("cls", [ASCL, ASCLBYOL])
def test_two_replicas_match_one_device(cls):
    def build():
        m = cls(_encoder("sync_batch"), queue_size=16, proj_dims=(16, 8), momentum=0.9,
                **({"pred_hidden": 16} if cls is ASCLBYOL else {}))
        m.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        return m

    one, _ = testing.assert_replicas_match(build, _data(24, 8), steps=3)
    assert any(k.endswith("queue") for k in one) and any(k.endswith("queue_pointer") for k in one)


def test_resume_restores_queue_and_key_encoder(tmp_path):
    keras.utils.set_random_seed(0)
    m = ASCL(_encoder("batch"), queue_size=16, proj_dims=(16, 8))
    m.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    m.fit(_data(24, 8), epochs=1, steps_per_epoch=3, verbose=0)
    path = str(tmp_path / "w.weights.h5")
    m.save_weights(path)
    keras.utils.set_random_seed(5)
    m2 = ASCL(_encoder("batch"), queue_size=16, proj_dims=(16, 8))
    m2.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    m2.optimizer.build(m2.trainable_variables)
    m2.load_weights(path)
    for name in ("queue", "queue_labels", "queue_pointer"):
        np.testing.assert_array_equal(getattr(m2, name).numpy(), getattr(m, name).numpy())
    for a, b in zip(m2.key_encoder.weights + m2.key_projector.weights,
                    m.key_encoder.weights + m.key_projector.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(m.key_encoder.weights[1].numpy(), m.encoder.weights[1].numpy())


@pytest.mark.parametrize("cls", [ASCL, MoCo, ASCLBYOL])
def test_fit_loss_falls(cls):
    # 64 images, a queue of 16. The loss first rises while real keys replace the
    # random initial queue, then falls as the model learns to tell instances apart.
    keras.utils.set_random_seed(0)
    m = cls(_encoder(), queue_size=16, proj_dims=(32, 16), momentum=0.9)
    m.compile(optimizer=keras.optimizers.Adam(0.005))
    h = m.fit(_data(64, 16).repeat(), epochs=8, steps_per_epoch=4, verbose=0)
    assert h.history["loss"][-1] < 0.85 * max(h.history["loss"][:4])


def test_registered_and_config_round_trip():
    assert methods.get("ascl") is ASCL and methods.get("moco") is MoCo
    assert methods.get("ascl_byol") is ASCLBYOL
    m = ASCL(_encoder(), queue_size=32, kind="ahcl", num_neighbours=2, proj_dims=(16, 8))
    m2 = ASCL.from_config(m.get_config())
    assert (m2.queue_size, m2.kind, m2.num_neighbours, m2.proj_dims) == (32, "ahcl", 2, (16, 8))
    assert MoCo(_encoder(), queue_size=16, proj_dims=(16, 8)).kind == "moco"
    with pytest.raises(ValueError, match="kind must be one of"):
        ASCL(_encoder(), kind="soft")


def test_key_view_is_weak_by_default_and_strong_on_request():
    """The weak key (official ``get_weak_augment``: resized crop + flip) keeps a
    flat image's value exactly, the strong views (colour jitter) change it.
    Mutants: the key built from the query's recipe by default; ``key_view``
    ignored."""
    opts = dict(size=8, channels=1, flip=False, pad=1)
    image = tf.fill([8, 8, 1], tf.constant(100, tf.uint8))

    def flat(x):  # every pixel still the image's own value (geometry only)
        return np.abs(x.numpy() - 100 / 255.0).max() < 1e-5

    tf.random.set_seed(0)
    _, views = ASCL.views(opts)
    assert all(flat(views["key"](image)) for _ in range(8))
    assert not all(flat(views["query"](image)) for _ in range(8))
    _, views = ASCL.views(opts, key_view="strong")
    keys = [views["key"](image) for _ in range(8)]
    assert not all(flat(k) for k in keys)  # jittered like the query
    assert not np.allclose(keys[0], keys[1])
    with pytest.raises(ValueError, match="key_view"):
        ASCL.views(opts, key_view="medium")
