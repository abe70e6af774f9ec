"""SeLa: label table, loss, relabelling and its schedule."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import methods, models, testing
from tfssl.methods.sela import Relabel, SeLa, balanced_random_labels, relabel_times
from tfssl.ops.sinkhorn import sinkhorn


def _encoder(norm="none"):
    return models.encoder(models.small_cnn((8, 8, 1), width=4, norm=norm), (0.5,), (0.25,))


def test_initial_labels_are_balanced_random_per_head():
    y = balanced_random_labels(3, 103, 10, seed=0)
    assert y.shape == (3, 103)
    for h in range(3):
        counts = np.bincount(y[h], minlength=10)
        assert counts.min() == 10 and counts.max() == 11
    assert not np.array_equal(y[0], y[1])


def test_loss_is_the_mean_over_heads_of_ce_with_labels_looked_up_by_index():
    keras.utils.set_random_seed(0)
    m = SeLa(_encoder(), num_train=50, num_clusters=5, num_heads=3)
    m.compile(optimizer=keras.optimizers.SGD(0.0))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, [6, 8, 8, 1]).astype("float32")
    idx = np.array([3, 49, 0, 17, 17, 8])
    logits = m.head_logits(m.encoder(x)).numpy()  # [hc, B, K]
    table = m.labels.numpy()
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    expected = -np.mean([logp[h, np.arange(6), table[h, idx]] for h in range(3)])
    logs = m.train_on_batch({"unlabeled": {"view": x, "index": idx}}, return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)


def test_relabel_writes_the_sinkhorn_labels_of_each_head():
    keras.utils.set_random_seed(0)
    m = SeLa(_encoder(), num_train=64, num_clusters=4, num_heads=2, lam=10, tol=0.01)
    feats = np.random.default_rng(0).normal(size=[64, m.feature_dim]).astype("float32")
    before = m.labels.numpy().copy()
    stats = m.relabel(feats, heads=[1])
    after = m.labels.numpy()
    np.testing.assert_array_equal(after[0], before[0])  # head 0 untouched
    want = sinkhorn(tf.nn.log_softmax(m.cluster_heads[1](feats)), 10, 0.01).labels.numpy()
    np.testing.assert_array_equal(after[1], want)
    assert stats["sinkhorn_iterations"] >= 1
    assert stats["labels_changed"] == pytest.approx(np.mean(after[1] != before[1]))


def test_relabel_times():
    # 10 passes of 100 images, linear: (10 + 1.0001) x 100 x j / 4
    want = [1100.01 * j / 4 for j in range(5)]
    np.testing.assert_allclose(relabel_times(1000, 100, 5, "linear"), want)
    np.testing.assert_allclose(relabel_times(100, 100, 3, "quadratic"),
                               [0, 101 / 4, 101])
    with pytest.raises(ValueError, match="schedule"):
        relabel_times(1, 1, 2, "cubic")


def _official_cifar_fractions(n, bs, epochs, nopts):
    """The official CIFAR loop (self-label cifar.py:186-187, 291-295), run step
    by step: the fraction of the run's steps at which each relabelling fires."""
    times = ((epochs + 1.0001) * n * np.linspace(0, 1, nopts)[::-1]).tolist()
    times = [(epochs + 10) * n] + times
    steps_per_epoch = -(-n // bs)  # DataLoader without drop_last
    total = epochs * steps_per_epoch
    fired = []
    for niter in range(total):
        if niter * bs >= times[-1]:
            times.pop()
            fired.append(niter / total)
    return np.array(fired)


class _Counter:
    """Stand-in for the optimizer step counter / ``relabels_done``."""

    def __init__(self, v=0):
        self.v = v

    def numpy(self):
        return self.v

    def assign(self, v):
        self.v = int(v)


def _schedule_fractions(epochs, steps_per_epoch, batch, n=50000, nopts=400,
                        schedule="linear"):
    """Runs ``Relabel``'s decision at every step of a run (no network):
    fractions of the run's steps at which it relabels."""
    import types

    m = SeLa.__new__(SeLa)  # only the schedule's attributes
    m.num_train, m.nopts, m.schedule = n, nopts, schedule
    times = SeLa.relabel_schedule(m, epochs, steps_per_epoch, batch)
    fake = types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=_Counter()),
                                 relabels_done=_Counter(), num_heads=10,
                                 relabel=lambda f, heads=None: {})
    cb = Relabel(None, times, batch, one_head_per_call=True, verbose=False)
    cb._model = fake
    cb._features = lambda: None
    total = epochs * steps_per_epoch
    fired = []
    for step in range(total):
        fake.optimizer.iterations.v = step
        before = len(cb.history)
        cb.on_train_batch_begin(step)
        if len(cb.history) > before:
            fired.append(step / total)
    return np.array(fired)


@pytest.mark.parametrize("epochs,steps_per_epoch,batch", [
    (400, 391, 128),    # the official recipe (flags/sela_cifar10.cfg)
    (400, 100, 500),    # 400 passes in epochs of 1 pass, another batch
    (40, 1000, 500),    # 400 passes in 40 epochs of 10 passes
])
def test_relabel_schedule_matches_the_official_cifar_schedule(epochs, steps_per_epoch, batch):
    """The relabellings fire at the official CIFAR script's fractions of the
    run (400 epochs of 50000 images, batch 128, nopts 400, linear) for any
    steps per epoch and batch that make the same 400 passes, each within 0.15%
    of the run (the official loop counts its last, partial batch of an epoch
    as full: 391 x 128 = 50048 images an epoch). The official run fires 399
    (the 400th is past the end); its 399th, due at 399.995 passes, fires at
    99.9% of the run only through that overcount, so tfssl may miss it when
    its own steps count exact passes.

    Mutant caught: ``relabel_schedule`` taking one tfssl epoch for one pass
    (``relabel_times(epochs * N, ...)``, the old code): with 40 epochs of 10
    passes every relabelling comes in the first 10% of the run."""
    official = _official_cifar_fractions(50000, 128, 400, 400)
    ours = _schedule_fractions(epochs, steps_per_epoch, batch)
    assert len(official) == 399
    assert len(official) - 1 <= len(ours) <= len(official)
    assert official[len(ours):].min(initial=1.0) > 0.998
    np.testing.assert_allclose(ours, official[:len(ours)],
                               atol=1.5e-3 + 1.0 / (epochs * steps_per_epoch))
    assert ours[-1] > 0.99


def test_relabel_schedule_matches_the_official_imagenet_schedule():
    """ImageNet (self-label main.py:134-135, 161): 401 epochs of N = 1281167 at
    batch 256, nopts 100, quadratic; the official step of relabelling j is the
    first with ``step x 256 >= (400 + 1.01) N (j / 99)^2``. tfssl, over about the
    same 401 passes in epochs of 1000 steps of 512 images, fires at the same
    fractions of the run (within 0.01%). The official run also fires the 100th,
    153 steps before its end, only because it counts its partial batch as full;
    tfssl does not (its last is at 97.6% of the run, as the official 99th).

    Mutant caught: ``OVERSHOOT["quadratic"]`` 1.01 (the CIFAR offset, as if the
    run were E epochs): every time moves by 0.25% of the run and the 99th
    falls past the end."""
    n, bs, e = 1281167, 256, 400
    l = -(-n // bs)
    total = (e + 1) * l
    t = (e + 1.01) * n * np.linspace(0, 1, 100) ** 2
    steps = np.ceil(t / bs)
    official = steps[steps < total] / total
    assert len(official) == 100
    m = SeLa.__new__(SeLa)
    m.num_train, m.nopts, m.schedule = n, 100, "quadratic"
    epochs, spe, batch = 401 * n // (1000 * 512), 1000, 512  # 1003 epochs, ~401 passes
    ours = np.array(SeLa.relabel_schedule(m, epochs, spe, batch)) / (epochs * spe * batch)
    ours = ours[ours <= 1]
    assert len(ours) == 99
    np.testing.assert_allclose(ours, official[:99], atol=1e-4 + 1.0 / (epochs * spe))


def _data(n=32, batch=8):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, [n, 8, 8, 1]).astype("float32")
    idx = np.arange(n)
    train = tf.data.Dataset.from_tensor_slices(
        {"unlabeled": {"view": x, "index": idx}}).batch(batch)
    feats = tf.data.Dataset.from_tensor_slices({"image": x, "index": idx}).batch(16)
    return train, feats


def test_schedule_fires_at_the_image_counts_and_resumes_mid_schedule():
    keras.utils.set_random_seed(0)
    train, feats = _data()
    m = SeLa(_encoder(), num_train=32, num_clusters=4, num_heads=2, relabel_mode="eval")
    m.compile(optimizer=keras.optimizers.SGD(0.01))
    cb = Relabel(feats, [0, 20, 40, 56], global_batch=8, verbose=False)
    m.fit(train.repeat(), epochs=1, steps_per_epoch=6, verbose=0, callbacks=[cb])
    # batch begins at 0, 8, 16, 24, 32, 40 images: 0 fires at 0, 20 at 24, 40 at 40.
    assert [(h["call"], h["images_seen"]) for h in cb.history] == [(0, 0), (1, 24), (2, 40)]
    assert m.history.history["relabel_sinkhorn_iterations"][-1] >= 1  # in the epoch logs
    # Resume: the step counter says 6 steps (48 images) were done.
    cb2 = Relabel(feats, [0, 20, 40, 56], global_batch=8, verbose=False)
    m.fit(train.repeat(), epochs=1, steps_per_epoch=2, verbose=0, callbacks=[cb2])
    assert [(h["call"], h["images_seen"]) for h in cb2.history] == [(3, 56)]


def test_fit_relabels_at_the_official_steps_across_a_restart(tmp_path):
    """A fit of 6 epochs of 2 steps of 8 (3 passes over N = 32; a tfssl epoch
    is half a pass), nopts 4, linear, stopped after 4 epochs and resumed from a
    checkpoint in a fresh model: 3 relabellings, at the steps the official CIFAR
    loop (3 epochs at batch 8) gives, 0, 6 and 11, the last one after the
    restart only.

    Mutants caught: ``relabels_done`` not restored (a plain attribute): the
    resumed run redoes relabelling 1 at step 8; the old schedule (6 epochs
    taken as 6 passes): relabels at steps 0 and 10 only."""
    official = _official_cifar_fractions(32, 8, 3, 4) * 12
    assert official.tolist() == [0, 6, 11]
    train, feats = _data(n=32, batch=8)

    def build():
        keras.utils.set_random_seed(0)
        m = SeLa(_encoder(), num_train=32, num_clusters=4, num_heads=2, nopts=4,
                 schedule="linear", relabel_mode="eval")
        m.compile(optimizer=keras.optimizers.SGD(0.01))
        cb = Relabel(feats, m.relabel_schedule(6, 2, 8), global_batch=8, verbose=False)
        return m, cb

    m, cb = build()
    m.fit(train.repeat(), epochs=4, steps_per_epoch=2, verbose=0, callbacks=[cb])
    ckpt = tf.train.Checkpoint(model=m, optimizer=m.optimizer)
    path = ckpt.save(str(tmp_path / "ckpt"))
    m2, cb2 = build()
    m2.optimizer.build(m2.trainable_variables)
    tf.train.Checkpoint(model=m2, optimizer=m2.optimizer).restore(path).assert_consumed()
    assert int(m2.optimizer.iterations.numpy()) == 8
    m2.fit(train.repeat(), epochs=6, initial_epoch=4, steps_per_epoch=2, verbose=0,
           callbacks=[cb2])
    steps = [h["images_seen"] // 8 for h in cb.history + cb2.history]
    assert steps == [0, 6, 11]
    assert [h["call"] for h in cb2.history] == [2]


def test_one_head_per_call_rotates_heads():
    keras.utils.set_random_seed(0)
    train, feats = _data()
    m = SeLa(_encoder(), num_train=32, num_clusters=4, num_heads=2)
    m.compile(optimizer=keras.optimizers.SGD(0.01))
    seen = []
    orig = m.relabel
    m.relabel = lambda f, heads=None: (seen.append(heads), orig(f, heads))[1]
    cb = Relabel(feats, [0, 8, 16], global_batch=8, one_head_per_call=True, verbose=False)
    m.fit(train.repeat(), epochs=1, steps_per_epoch=3, verbose=0, callbacks=[cb])
    assert seen == [[0], [1], [0]]


def test_two_replicas_match_one_device():
    train, _ = _data(n=48, batch=8)

    def build():
        enc = models.encoder(models.small_cnn((8, 8, 1), width=4, norm="sync_batch"),
                             (0.5,), (0.25,))
        m = SeLa(enc, num_train=48, num_clusters=4, num_heads=2)
        m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        return m

    one, _ = testing.assert_replicas_match(build, train, steps=3)
    assert any(k.endswith("labels") for k in one)


def test_fit_loss_falls():
    keras.utils.set_random_seed(0)
    train, _ = _data(n=32, batch=16)
    m = SeLa(_encoder(), num_train=32, num_clusters=4, num_heads=2)
    m.compile(optimizer=keras.optimizers.Adam(0.01))
    h = m.fit(train.repeat(), epochs=10, steps_per_epoch=4, verbose=0)
    assert h.history["loss"][-1] < 0.85 * h.history["loss"][0]  # memorising random labels


def test_registered_and_config_round_trip():
    assert methods.get("sela") is SeLa
    m = SeLa(_encoder(), num_train=10, num_clusters=3, num_heads=2, schedule="linear")
    m2 = SeLa.from_config(m.get_config())
    assert (m2.num_train, m2.num_clusters, m2.num_heads, m2.schedule) == (10, 3, 2, "linear")


def test_views_default_to_the_official_crop_and_jitter():
    opts = dict(size=8, channels=1, flip=False)
    image = tf.constant(np.random.default_rng(0).integers(0, 255, (8, 8, 1)), tf.uint8)
    _, views = SeLa.views(opts)  # default: simclr, crops of 0.08-1
    a, b = views["view"](image), views["view"](image)
    assert a.shape == (8, 8, 1) and not np.allclose(a, b)
    assert 0.0 <= float(tf.reduce_min(a)) and float(tf.reduce_max(a)) <= 1.0
    # weak: pad-and-crop only, so its pixels are the image's own values
    _, weak = SeLa.views(opts, augmentation="weak")
    values = image.numpy().ravel() / 255.0
    pixels = weak["view"](image).numpy().ravel()
    assert np.abs(pixels[:, None] - values[None, :]).min(axis=1).max() < 1e-6
    with pytest.raises(ValueError, match="simclr"):
        SeLa.views(opts, augmentation="randaugment")
    with pytest.raises(ValueError, match="crop_min_scale"):
        SeLa(_encoder(), num_train=10, num_clusters=3, num_heads=1, crop_min_scale=0.0)
    m = SeLa(_encoder(), num_train=10, num_clusters=3, num_heads=1, crop_min_scale=0.3)
    assert SeLa.from_config(m.get_config()).crop_min_scale == 0.3


def test_relabel_pass_has_full_batches_padded_with_images_marked_minus_one():
    from tfssl import data

    source = data.digits()
    m = SeLa(_encoder(), num_train=source.num_train, num_clusters=3, num_heads=1)
    _, views = SeLa.views(dict(size=8, channels=1, flip=False))
    ctx = dict(source=source, unlabeled_views=views, epochs=1, steps_per_epoch=1,
               unlabeled_batch_size=64)
    relabel = m.training_callbacks(ctx)[0]
    for input_context in (None, tf.distribute.InputContext(2, 1, 2)):
        batches = list(relabel.data(input_context))
        size = 256 if input_context is None else 128
        assert all(b["index"].shape[0] == size for b in batches)
        idx = np.concatenate([b["index"].numpy() for b in batches])
        real = idx[idx >= 0]
        if input_context is None:
            np.testing.assert_array_equal(np.sort(real), np.arange(source.num_train))
            assert len(idx) % 256 == 0 and len(idx) - len(real) < 256
        else:  # worker 1's half of the padded pass
            assert len(idx) * 2 == len(list(relabel.data(None))) * 256


def test_relabel_pass_is_distributed_and_gathered_by_index():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, [40, 8, 8, 1]).astype("float32")
    perm = rng.permutation(40)  # the pass may see the images in any order
    feats_ds = tf.data.Dataset.from_tensor_slices(
        {"image": x[perm], "index": perm.astype("int64")}).batch(12)  # 12, 12, 12, 4
    strategy = testing.mirrored_cpu_strategy(2)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        m = SeLa(_encoder(), num_train=40, num_clusters=4, num_heads=1, relabel_mode="eval")
    cb = Relabel(feats_ds, [0], global_batch=8, verbose=False)
    cb.set_model(m)
    got = cb._features()
    np.testing.assert_allclose(got, m.encoder(x).numpy(), rtol=1e-5, atol=1e-6)
    # The pass is traced once and reused: a later pass sees the current weights.
    embed = cb._embed_function(m)
    for w in m.encoder.trainable_weights:
        w.assign(w * 0.5 + 0.1)
    np.testing.assert_allclose(cb._features(), m.encoder(x).numpy(), rtol=1e-5, atol=1e-6)
    assert cb._embed_function(m) is embed and not np.allclose(got, cb._features())


def test_relabel_mode_train_runs_the_network_in_training_mode():
    keras.utils.set_random_seed(0)
    enc = models.encoder(models.small_cnn((8, 8, 1), width=4, norm="batch"), (0.5,), (0.25,))
    m = SeLa(enc, num_train=16, num_clusters=4, num_heads=1, relabel_mode="train")
    _, feats = _data(n=16)
    cb = Relabel(feats, [0], global_batch=8, verbose=False)
    cb.set_model(m)
    bn = [v for v in m.encoder.weights if "moving_mean" in v.path][0]
    before = bn.numpy().copy()
    cb._features()
    assert not np.allclose(bn.numpy(), before)  # BN ran on batch statistics and updated
    with pytest.raises(ValueError, match="relabel_mode"):
        SeLa(_encoder(), num_train=4, num_clusters=2, num_heads=1, relabel_mode="test")


def test_relabelling_inside_fit_under_two_replicas():
    strategy = testing.mirrored_cpu_strategy(2)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        m = SeLa(_encoder(), num_train=32, num_clusters=4, num_heads=2, relabel_mode="eval")
        m.compile(optimizer=keras.optimizers.SGD(0.1))
    train, feats = _data(n=32, batch=8)
    cb = Relabel(feats, [0, 16], global_batch=8, verbose=False)
    before = m.labels.numpy().copy()
    m.fit(train.repeat(), epochs=1, steps_per_epoch=3, verbose=0, callbacks=[cb])
    assert [h["call"] for h in cb.history] == [0, 1]
    labels = strategy.experimental_local_results(m.labels.value)
    np.testing.assert_array_equal(labels[0].numpy(), labels[1].numpy())  # same on both replicas
    assert not np.array_equal(labels[0].numpy(), before)
    with strategy.scope(), pytest.raises(RuntimeError, match="outside"):
        sinkhorn(np.zeros([4, 2], np.float32), 10)
