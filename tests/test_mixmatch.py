"""MixMatch: ops against NumPy, the BN / weight-decay / EMA rules, replicas, fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import methods, models, testing
from tfssl.methods.mixmatch import MixMatch
from tfssl.ops import mixmatch as mm
from tfssl.ops import targets


def _np_sharpen(p, t):
    q = p ** (1 / t)
    return q / q.sum(-1, keepdims=True)


def test_guess_labels_average_over_k_then_sharpen():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=(3, 4)).astype("float32")  # K=3, B=4, C=5
    want = _np_sharpen(probs.mean(0), 0.5)
    np.testing.assert_allclose(targets.guess_labels(probs, 0.5).numpy(), want, rtol=1e-5)


def test_mixup_per_sample_lambda_prime_at_least_half():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 2, 2, 1)).astype("float32")
    p = rng.dirichlet(np.ones(3), size=6).astype("float32")
    lam = np.array([0.1, 0.9, 0.5, 0.3, 0.7, 0.0], "float32")
    perm = np.array([3, 0, 5, 1, 2, 4], "int32")
    xm, pm = targets.mixup(x, p, lam, perm)
    # The mixing weight of each row's own input, recovered from the op's output
    # (x' - x_perm = l' (x - x_perm)): l' = max(l, 1 - l), never below 1/2.
    # Mutant that fails: lambda' = lambda (the max dropped).
    diff = (x - x[perm]).reshape(6, -1)
    got = ((xm.numpy() - x[perm]).reshape(6, -1) * diff).sum(-1) / (diff ** 2).sum(-1)
    lp = np.maximum(lam, 1 - lam)
    np.testing.assert_allclose(got, lp, rtol=1e-4)
    assert (got >= 0.5 - 1e-5).all()
    np.testing.assert_allclose(xm.numpy(), lp[:, None, None, None] * x
                               + (1 - lp[:, None, None, None]) * x[perm], rtol=1e-6)
    np.testing.assert_allclose(pm.numpy(), lp[:, None] * p + (1 - lp[:, None]) * p[perm], rtol=1e-6)
    np.testing.assert_allclose(pm.numpy().sum(-1), 1.0, rtol=1e-6)


def test_mixup_draws_beta_and_permutation_and_determinism():
    lam, perm = targets.mixup_draws(20000, 0.75, tf.constant([3, 7], tf.int64))
    lam = lam.numpy()
    assert sorted(perm.numpy().tolist()) == list(range(20000))
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) = 0.1 for a = 0.75.
    assert abs(lam.mean() - 0.5) < 0.01 and abs(lam.var() - 0.1) < 0.005
    again, _ = targets.mixup_draws(20000, 0.75, tf.constant([3, 7], tf.int64))
    other, _ = targets.mixup_draws(20000, 0.75, tf.constant([3, 8], tf.int64))
    np.testing.assert_array_equal(again.numpy(), lam)
    assert not np.allclose(other.numpy(), lam)


def _np_interleave(batches):
    g, b = len(batches), len(batches[0])
    sizes = [b // g] * g
    for i in range(b - sum(sizes)):
        sizes[-1 - i] += 1
    cuts = np.concatenate([[0], np.cumsum(sizes)])
    out = [list(np.split(t, cuts[1:-1])) for t in batches]
    for s in range(1, g):
        out[0][s], out[s][s] = out[s][s], out[0][s]
    return [np.concatenate(o) for o in out]


@pytest.mark.parametrize("b,g", [(9, 3), (64, 3), (10, 3), (7, 2)])
def test_interleave_matches_numpy_and_round_trips(b, g):
    batches = [np.arange(b)[:, None] + 100 * k for k in range(g)]
    got = mm.interleave([tf.constant(t) for t in batches])
    for o, w in zip(got, _np_interleave(batches)):
        np.testing.assert_array_equal(o.numpy(), w)
    # The first forward holds rows of every batch; each other one, labeled rows too.
    assert {int(v) // 100 for v in got[0].numpy().ravel()} == set(range(g))
    for k in range(1, g):
        assert {int(v) // 100 for v in got[k].numpy().ravel()} == {0, k}
    back = mm.interleave(got)
    for o, t in zip(back, batches):
        np.testing.assert_array_equal(o.numpy(), t)
    # The same cuts when the batch size is known only at run time.
    dyn = tf.function(mm.interleave, input_signature=[[tf.TensorSpec([None, 1], tf.int64)] * g])
    for o, w in zip(dyn([tf.constant(t) for t in batches]), _np_interleave(batches)):
        np.testing.assert_array_equal(o.numpy(), w)
    assert mm.interleave_offsets(10, 3) == [0, 3, 6, 10]


def test_l2_loss_is_mean_over_batch_and_classes_and_ramp():
    rng = np.random.default_rng(2)
    q = rng.dirichlet(np.ones(4), size=5).astype("float32")
    z = rng.normal(size=(5, 4)).astype("float32")
    sm = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    np.testing.assert_allclose(mm.l2_unlabeled_loss(q, z).numpy(), ((q - sm) ** 2).mean(), rtol=1e-5)
    assert [float(mm.linear_rampup(s, 1000)) for s in (0, 250, 1000, 5000)] == [0, 0.25, 1, 1]
    assert float(mm.linear_rampup(5, 0)) == 1.0


def _encoder(norm="batch", width=8):
    return models.encoder(models.small_cnn((8, 8, 1), width=width, norm=norm), (0.5,), (0.25,))


def _batches(n_steps=3, b=8, same_image=False, seed=0):
    rng = np.random.default_rng(seed)
    n = n_steps * b
    x = rng.uniform(0, 1, [n, 8, 8, 1]).astype("float32")
    if same_image:
        x[:] = x[0]
    y = (np.arange(n) % 10).astype("int64")
    u0 = x if same_image else rng.uniform(0, 1, [n, 8, 8, 1]).astype("float32")
    u1 = x if same_image else np.clip(u0 + 0.05, 0, 1).astype("float32")
    return tf.data.Dataset.from_tensor_slices({
        "labeled": {"weak": x, "label": y, "index": np.arange(n)},
        "unlabeled": {"aug0": u0, "aug1": u1, "label": y, "index": np.arange(n)}}).batch(b)


def _bn_values(model):
    return [v.numpy() for v in model._bn_stats]


@pytest.mark.parametrize("interleave", [True, False])
def test_only_the_first_forward_updates_bn_statistics(interleave):
    # All rows the same image: mixing leaves the rows unchanged, so every forward
    # has the same batch statistics and only the NUMBER of updates kept shows.
    batch = next(iter(_batches(1, same_image=True)))
    keras.utils.set_random_seed(0)
    m = MixMatch(_encoder(), 10, interleave=interleave, weight_decay=0.0)
    m.compile(optimizer=keras.optimizers.SGD(0.0))
    before = _bn_values(m)
    m.train_on_batch(batch)
    keras.utils.set_random_seed(0)
    ref = MixMatch(_encoder(), 10)
    rows = 8 if interleave else 24  # the first of three forwards / the one concatenated forward
    ref(tf.repeat(batch["labeled"]["weak"][:1], rows, 0), training=True)  # exactly one update
    for got, want, b in zip(_bn_values(m), _bn_values(ref), before):
        assert not np.allclose(want, b)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_decoupled_weight_decay_touches_kernels_only():
    batch = next(iter(_batches(1)))
    snaps = []
    for wd in (0.0, 0.5):
        keras.utils.set_random_seed(0)
        m = MixMatch(_encoder(), 10, weight_decay=wd, ema_decay=None)
        m.compile(optimizer=keras.optimizers.SGD(0.1))
        m.train_on_batch(batch)
        snaps.append({v.path: v.numpy() for v in m.trainable_variables})
    kernels = [p for p in snaps[0] if p.endswith("kernel")]
    assert kernels and len(kernels) < len(snaps[0])
    for p in snaps[0]:
        factor = 1 - 0.5 * 0.1 if p.endswith("kernel") else 1.0
        np.testing.assert_allclose(snaps[1][p], snaps[0][p] * factor, rtol=1e-5, atol=1e-7,
                                   err_msg=p)


def test_ema_is_what_evaluation_and_export_use(tmp_path):
    from tfssl import export

    keras.utils.set_random_seed(0)
    m = MixMatch(_encoder(), 10, ema_decay=0.5)
    m.compile(optimizer=keras.optimizers.Adam(0.05))
    m.fit(_batches(3).repeat(), epochs=1, steps_per_epoch=3, verbose=0)
    assert m.evaluate_with_ema
    x = np.random.default_rng(5).uniform(0, 1, [4, 8, 8, 1]).astype("float32")
    online = m.predict(x, verbose=0)
    bn = _bn_values(m)
    with m.ema_applied():
        ema = m.predict(x, verbose=0)
        for a, b in zip(_bn_values(m), bn):  # the raw model's BN statistics
            np.testing.assert_array_equal(a, b)
    assert not np.allclose(online, ema, atol=1e-4)
    paths = export.export_model(m, str(tmp_path), use_ema=True)
    served = tf.saved_model.load(paths["classifier"]).signatures["serving_default"]
    out = list(served(tf.constant((x * 255).round().astype("uint8"))).values())
    probs = [o.numpy() for o in out if o.shape[-1] == 10][0]
    with m.ema_applied():
        want = tf.nn.softmax(m((x * 255).round() / 255, training=False)).numpy()
    np.testing.assert_allclose(probs, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm,interleave", [("sync_batch", False), ("none", True)])
def test_two_replicas_match_one_device(norm, interleave):
    # MixUp draws are global (all-gathered batch, stateless seed), so the step does
    # not depend on the replica count. With BN, the interleaved forwards' batches
    # depend on the replica layout, so that case runs without BN.
    def build():
        m = MixMatch(_encoder(norm), 10, interleave=interleave, lambda_u=10.0,
                     rampup_images=16, ema_decay=0.9)
        m.compile(optimizer=keras.optimizers.Adam(0.01))
        return m

    testing.assert_replicas_match(build, _batches(3), steps=3)


def test_fit_loss_falls_and_registration():
    assert methods.get("mixmatch") is MixMatch
    assert MixMatch.include_labeled_in_unlabeled is False
    keras.utils.set_random_seed(0)
    m = MixMatch(_encoder(), 10, lambda_u=1.0, rampup_images=32)
    m.compile(optimizer=keras.optimizers.Adam(0.01))
    h = m.fit(_batches(4).repeat(), epochs=6, steps_per_epoch=4, verbose=0)
    assert h.history["loss_x"][-1] < 0.8 * h.history["loss_x"][0]
    m2 = MixMatch.from_config(m.get_config())
    assert (m2.lambda_u, m2.rampup_images, m2.interleave) == (1.0, 32, True)


def test_interleave_needs_equal_batches():
    m = MixMatch(_encoder(), 10)
    m.compile(optimizer=keras.optimizers.SGD(0.1))
    x = np.zeros([4, 8, 8, 1], "float32")
    batch = {"labeled": {"weak": x, "label": np.zeros([4], "int64")},
             "unlabeled": {"aug0": np.zeros([8, 8, 8, 1], "float32"),
                           "aug1": np.zeros([8, 8, 8, 1], "float32")}}
    with pytest.raises(ValueError, match="interleave needs the unlabeled batch equal"):
        m.train_on_batch(batch)
