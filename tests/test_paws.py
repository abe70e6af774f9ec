"""PAWS: ops against NumPy, the support sampler's layout, the gradient of the
support gather, LARS, replicas == 1 device, fit, evaluation and export."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import data, distribute, methods, models, optimizers, testing
from tfssl.data.sources import _array_source
from tfssl.evaluation import finetune as finetune_lib
from tfssl.evaluation import snn as snn_lib
from tfssl.methods.paws import PAWS
from tfssl.ops import paws as paws_ops


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_snn(q, s, y, tau=0.1):
    return _softmax(_unit(q) @ _unit(s).T / tau) @ y


def _np_sharpen(p, t):
    p = p ** (1 / t)
    return p / p.sum(-1, keepdims=True)


# ------------------------------------------------------------------ ops
def test_snn_matches_numpy():
    rng = np.random.default_rng(0)
    q, s = rng.normal(size=(5, 6)), rng.normal(size=(9, 6))
    y = paws_ops.support_labels(3, 3)
    got = paws_ops.snn(q.astype("float32"), s.astype("float32"), y, 0.1).numpy()
    np.testing.assert_allclose(got, _np_snn(q, s, y), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


def test_support_label_matrix_is_smoothed_and_interleaved():
    y = paws_ops.support_labels(3, 2, num_views=2, smoothing=0.1)
    assert y.shape == (12, 3)
    off, on = 0.1 / 3, 1 - 0.1 + 0.1 / 3
    np.testing.assert_allclose(np.sort(np.unique(y)), [off, on], rtol=1e-6)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(y.argmax(-1), [0, 1, 2, 0, 1, 2] * 2)  # [a,b,c,a,b,c] per view
    # Different classes per replica: 2 chunks of 2 classes, 3 images each.
    y2 = paws_ops.support_labels(4, 3, num_views=1, smoothing=0.0, num_chunks=2)
    np.testing.assert_array_equal(y2.argmax(-1), [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3])
    np.testing.assert_array_equal(np.unique(y2), [0.0, 1.0])
    with pytest.raises(ValueError, match="does not divide"):
        paws_ops.support_labels(5, 2, num_chunks=2)


def test_targets_are_swapped_sharpened_and_averaged_for_local_crops():
    rng = np.random.default_rng(1)
    b, c, n_local = 3, 4, 2
    p = rng.dirichlet(np.ones(c) * 0.3, size=2 * b).astype("float32")
    p[0] = [1.0 - 3e-9, 1e-9, 1e-9, 1e-9]  # sharpened tails fall under 1e-4
    t = paws_ops.paws_targets(p, n_local, 0.25).numpy()
    s = _np_sharpen(p.astype("float64"), 0.25)
    want_global = np.concatenate([s[b:], s[:b]])  # view 1 learns view 2's and back
    want_local = 0.5 * (want_global[:b] + want_global[b:])
    want = np.concatenate([want_global] + [want_local] * n_local)
    want[want < 1e-4] = 0.0
    assert t.shape == (4 * b, c)
    np.testing.assert_allclose(t, want, rtol=1e-4, atol=1e-7)
    assert (t[b] == [1.0, 0, 0, 0]).all()  # row 0's target lands on view 2's anchor, floored
    assert paws_ops.paws_targets(p, 0, 0.25).shape == (2 * b, c)


def test_cross_entropy_and_me_max_match_numpy():
    rng = np.random.default_rng(2)
    t = rng.dirichlet(np.ones(5), size=6).astype("float32")
    t[0, 1] = 0.0
    p = rng.dirichlet(np.ones(5), size=6).astype("float32")
    p[0, 1] = 0.0  # t = 0 where p = 0: contributes 0, not nan
    got = float(paws_ops.paws_cross_entropy(t, p))
    mask = t > 0
    want = -(np.where(mask, t * np.log(np.where(mask, p, 1.0)), 0.0)).sum(-1).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    q = rng.dirichlet(np.ones(5), size=6).astype("float32")
    p_bar = _np_sharpen(q.astype("float64"), 0.25).mean(0)
    np.testing.assert_allclose(float(paws_ops.me_max(q, 0.25)), (p_bar * np.log(p_bar)).sum(),
                               rtol=1e-4)
    assert float(paws_ops.me_max(np.full([4, 5], 0.2, "float32"))) == pytest.approx(-np.log(5),
                                                                                    rel=1e-5)


# -------------------------------------------------------------- sampler
def _labeled_source(per_class=(5, 5, 4, 6, 5), seed=0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)]).astype(np.int64)
    n = len(y)
    x = rng.integers(0, 256, [n, 8, 8, 1]).astype(np.uint8)
    x[:, 0, 0, 0] = np.arange(n)  # pixel (0, 0) names the image
    return _array_source("toy", len(per_class), x, y, x[:4], y[:4])


@pytest.mark.parametrize("chunks", [1, 2])
def test_sampler_layout_matches_the_label_matrix(chunks):
    src = _labeled_source()
    ids = np.arange(src.num_train)[::-1].copy()  # labeled ids in some order
    ident = {"a": lambda im: tf.cast(im, tf.float32), "b": lambda im: tf.cast(im, tf.float32) + 1}
    ds = data.support_stream(src, ids, ident, classes_per_batch=4, imgs_per_class=3,
                             num_chunks=chunks, seed=3)
    y = paws_ops.support_labels(4, 3, num_views=1, num_chunks=chunks)
    cols = y.argmax(-1)
    seen_class_sets = set()
    for batch in ds.take(6):
        img_id = batch["a"].numpy()[:, 0, 0, 0].astype(int)
        np.testing.assert_array_equal(batch["b"].numpy(), batch["a"].numpy() + 1)  # same images
        cls = batch["label"].numpy()
        np.testing.assert_array_equal(cls, src.train_labels[img_id])
        np.testing.assert_array_equal(batch["index"].numpy(), img_id)
        for c in range(4):  # one class per column, a different one per column
            assert len(set(cls[cols == c])) == 1
        assert len(set(cls)) == 4
        for k in set(cls):  # distinct images within a class
            assert len(set(img_id[cls == k])) == 3
        if chunks == 2:  # replica r's half holds its own two classes only
            assert not set(cls[:6]) & set(cls[6:])
        seen_class_sets.add(tuple(sorted(set(cls))))
    assert len(seen_class_sets) > 1  # 4 of the 5 classes, drawn anew per batch


def test_sampler_refuses_what_it_cannot_draw():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match="has 2 labeled image"):
        data.support_indices(labels, 3, 3)
    with pytest.raises(ValueError, match="only 3"):
        data.support_indices(labels, 4, 1)
    with pytest.raises(ValueError, match="does not divide over 2"):
        data.support_indices(labels, 3, 1, num_chunks=2)
    ds = data.support_indices(labels, 3, 3, replacement=True, seed=1)
    for pos in ds.take(3):
        got = labels[pos.numpy()]
        assert sorted(got) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


# ------------------------------------------------- cross-replica gradients
def _gather_loss(x_local, a_local, w, gather):
    y = x_local * w
    ys = gather(y)
    return tf.reduce_mean(tf.reduce_logsumexp(tf.matmul(a_local * w, ys, transpose_b=True), -1))


def _replica_grads(gather, x, a):
    strategy = testing.mirrored_cpu_strategy(2)
    with strategy.scope():
        w = tf.Variable(tf.linspace(0.5, 1.5, x.shape[1]))

    @tf.function
    def step():
        def fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            n = x.shape[0] // 2
            xl, al = tf.gather(x, tf.range(r * n, r * n + n)), tf.gather(a, tf.range(r * n, r * n + n))
            with tf.GradientTape() as tape:
                loss = _gather_loss(xl, al, w, gather)
            return tape.gradient(loss, w, output_gradients=distribute.scale_loss(tf.ones([])))
        return strategy.reduce("SUM", strategy.run(fn), axis=None)

    return step().numpy()


def test_gather_with_gradient_equals_one_device_on_the_concatenated_batch():
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(6, 3)).astype("float32"))
    a = tf.constant(rng.normal(size=(6, 3)).astype("float32"))
    w = tf.Variable(tf.linspace(0.5, 1.5, 3))
    with tf.GradientTape() as tape:
        loss = _gather_loss(x, a, w, lambda t: t)
    want = tape.gradient(loss, w).numpy()
    got = _replica_grads(distribute.all_gather_with_grad, x, a)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Without the custom gradient (the gathered rows as constants) the result differs.
    naive = _replica_grads(distribute.all_gather, x, a)
    assert not np.allclose(naive, want, rtol=1e-3)


def test_me_max_mean_with_identity_backward_equals_one_device():
    rng = np.random.default_rng(5)
    logits = tf.constant(rng.normal(size=(8, 4)).astype("float32"))
    w = tf.Variable([1.0, 0.5, 2.0, 1.5])
    with tf.GradientTape() as tape:
        want_loss = paws_ops.me_max(tf.nn.softmax(logits * w), 0.25)
    want = tape.gradient(want_loss, w).numpy()
    strategy = testing.mirrored_cpu_strategy(2)
    with strategy.scope():
        wv = tf.Variable([1.0, 0.5, 2.0, 1.5])

    @tf.function
    def step():
        def fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            part = tf.gather(logits, tf.range(r * 4, r * 4 + 4))
            with tf.GradientTape() as tape:
                loss = paws_ops.me_max(tf.nn.softmax(part * wv), 0.25,
                                       distribute.all_reduce_mean_identity_grad)
            g = tape.gradient(loss, wv, output_gradients=distribute.scale_loss(tf.ones([])))
            return g, loss
        g, loss = strategy.run(fn)
        return strategy.reduce("SUM", g, axis=None), strategy.experimental_local_results(loss)

    got, losses = step()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    for v in losses:  # every replica sees the global-batch value
        np.testing.assert_allclose(v.numpy(), want_loss.numpy(), rtol=1e-6)


# ---------------------------------------------------------------- LARS
def _np_lars(w, g, v, lr, mu, wd, eta, excluded):
    if not excluded:
        wn, gn = np.linalg.norm(w), np.linalg.norm(g)
        ratio = eta * wn / (gn + wd * wn + 1e-8) if wn > 0 and gn > 0 else 1.0
        g = (g + wd * w) * ratio
    v = mu * v + g
    return w - lr * v, v


def test_lars_matches_a_numpy_step_and_excludes_bias_and_bn():
    rng = np.random.default_rng(6)
    kernel = keras.Variable(rng.normal(size=(3, 2)).astype("float32"), name="kernel")
    bias = keras.Variable(rng.normal(size=(2,)).astype("float32"), name="bias")
    gamma = keras.Variable(np.ones(2, "float32"), name="gamma")
    zero = keras.Variable(np.zeros(2, "float32"), name="kernel")  # ||w|| = 0: no trust ratio
    vars_ = [kernel, bias, gamma, zero]
    opt = optimizers.LARS(0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02)
    opt.build(vars_)
    assert [opt.is_excluded(v) for v in vars_] == [False, True, True, False]
    state = [(v.numpy().astype("float64"), np.zeros(v.shape)) for v in vars_]
    for _ in range(3):
        grads = [rng.normal(size=v.shape).astype("float32") for v in vars_]
        opt.apply(grads, vars_)
        state = [_np_lars(w, g.astype("float64"), m, 0.5, 0.9, 1e-2, 0.02, ex)
                 for (w, m), g, ex in zip(state, grads, [False, True, True, False])]
        for v, (w, _) in zip(vars_, state):
            np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-6)


def test_warmup_cosine_schedule():
    s = optimizers.warmup_cosine(3.2, total_steps=110, warmup_steps=10, start_lr=0.8,
                                 final_lr=0.032)
    np.testing.assert_allclose([float(s(0)), float(s(5)), float(s(10)), float(s(110))],
                               [0.8, 2.0, 3.2, 0.032], rtol=1e-4)
    np.testing.assert_allclose(float(s(60)), 0.032 + (3.2 - 0.032) * 0.5, rtol=1e-4)


# ---------------------------------------------------------------- model
C, S, V = 4, 2, 2  # classes per batch, images per class, support views
B, L = 4, 2        # unlabeled images, local crops


def _encoder(norm="sync_batch"):
    return models.encoder(models.small_cnn((8, 8, 1), width=8, norm=norm), (0.5,), (0.25,))


def _paws(norm="sync_batch", **kw):
    kw = {"classes_per_batch": C, "imgs_per_class": S, "proj_hidden": 16, "proj_dim": 8,
          "finetune_epochs": 0, **kw}
    return PAWS(_encoder(norm), num_classes=5, **kw)


def _paws_batches(steps=3, seed=0, chunks=1):
    rng = np.random.default_rng(seed)
    n = 30
    x = rng.uniform(0, 1, [n, 8, 8, 1]).astype("float32")
    y = np.arange(n) % 5
    pos = np.concatenate([p.numpy() for p in
                          data.support_indices(y, C, S, chunks, seed=seed).take(steps)])
    u = rng.integers(0, n, steps * B)
    sup = tf.data.Dataset.from_tensor_slices(
        {"view_0": x[pos], "view_1": np.clip(x[pos] * 0.9, 0, 1), "label": y[pos],
         "index": pos}).batch(C * S)
    unl = tf.data.Dataset.from_tensor_slices(
        {"global_0": x[u], "global_1": np.clip(x[u] * 1.1, 0, 1), "local_0": x[u][:, :6, :6],
         "local_1": x[u][:, 2:, 2:], "label": y[u], "index": u}).batch(B)
    return tf.data.Dataset.zip({"labeled": sup, "unlabeled": unl})


def _step_case(lr):
    """A PAWS model without BN in the backbone, compiled with SGD(lr), and one batch."""
    keras.utils.set_random_seed(0)
    m = _paws(norm="none")
    m.compile(optimizer=keras.optimizers.SGD(lr))
    return m, next(iter(_paws_batches(1)))


def _step_embeddings(m, batch):
    """h of the supports + global views and h of the local crops: the step's two
    forwards (BN in the heads sees the same two batches as in the step)."""
    sup, unl = batch["labeled"], batch["unlabeled"]

    def emb(x):
        return m.projector(m.encoder(x, training=True), training=True)

    return (emb(tf.concat([sup["view_0"], sup["view_1"], unl["global_0"], unl["global_1"]], 0)),
            emb(tf.concat([unl["local_0"], unl["local_1"]], 0)))


def test_step_loss_matches_numpy():
    m, batch = _step_case(0.0)
    h, h_loc = (x.numpy() for x in _step_embeddings(m, batch))
    h_s, h_g = h[:2 * C * S], h[2 * C * S:]
    y = paws_ops.support_labels(C, S, V)
    p_g = _np_snn(h_g, h_s, y)
    t = _np_sharpen(np.concatenate([p_g[B:], p_g[:B]]), 0.25)
    t = np.concatenate([t, 0.5 * (t[:B] + t[B:]), 0.5 * (t[:B] + t[B:])])
    t[t < 1e-4] = 0
    probs = _np_snn(np.concatenate([h_g, h_loc]), h_s, y)
    ce = -(t * np.log(probs)).sum(-1).mean()
    p_bar = _np_sharpen(probs, 0.25).mean(0)
    logs = m.train_on_batch(batch, return_dict=True)
    np.testing.assert_allclose(logs["loss_paws"], ce, rtol=1e-4)
    np.testing.assert_allclose(logs["loss_me"], (p_bar * np.log(p_bar)).sum(), rtol=1e-4)
    np.testing.assert_allclose(logs["loss"], ce + (p_bar * np.log(p_bar)).sum(), rtol=1e-4)


def test_step_gradient_flows_through_the_supports():
    # One SGD(lr=1) step equals minus the gradient of the NumPy test's loss,
    # written with TF ops here: targets without gradient, the anchors' soft
    # nearest neighbours WITH gradient through the support embeddings (a
    # support gather that stopped it would leave the loss value unchanged).
    m, batch = _step_case(1.0)
    y = tf.constant(paws_ops.support_labels(C, S, V), tf.float32)

    def snn(q, s):
        q, s = tf.math.l2_normalize(q, -1), tf.math.l2_normalize(s, -1)
        return tf.nn.softmax(q @ tf.transpose(s) / 0.1) @ y

    def sharpen(p, t=0.25):
        p = p ** (1 / t)
        return p / tf.reduce_sum(p, -1, keepdims=True)

    weights = m.trainable_variables
    with tf.GradientTape() as tape:
        h, h_loc = _step_embeddings(m, batch)
        h_s, h_g = h[:2 * C * S], h[2 * C * S:]
        p_g = tf.stop_gradient(snn(h_g, h_s))
        t = sharpen(tf.concat([p_g[B:], p_g[:B]], 0))
        t = tf.concat([t, 0.5 * (t[:B] + t[B:]), 0.5 * (t[:B] + t[B:])], 0)
        t = tf.where(t < 1e-4, 0.0, t)
        probs = snn(tf.concat([h_g, h_loc], 0), h_s)
        p_bar = tf.reduce_mean(sharpen(probs), 0)
        loss = (-tf.reduce_mean(tf.reduce_sum(t * tf.math.log(probs), -1))
                + tf.reduce_sum(p_bar * tf.math.log(p_bar)))
    grads = tape.gradient(loss, weights)
    before = [w.numpy() for w in weights]
    m.train_on_batch(batch)
    moved = 0.0
    for w, b, g in zip(weights, before, grads):
        g = np.zeros_like(b) if g is None else g.numpy()
        np.testing.assert_allclose(b - w.numpy(), g, rtol=2e-3, atol=1e-6, err_msg=w.path)
        moved = max(moved, float(np.abs(g).max()))
    assert moved > 1e-3  # the step did something


def test_two_replicas_match_one_device():
    def build():
        m = _paws(temperature=0.5, sharpen_t=0.5)
        m.compile(optimizer=optimizers.LARS(0.1, weight_decay=1e-4, trust_coefficient=0.02))
        return m

    # tau and T softer than the defaults: 0.1 and 0.25 amplify float
    # differences (the sync-BN statistics, the reduction order) by host: up to
    # 6e-4 after three steps on an AMD host, 3e-4 absolute on an Intel one.
    # Distribution bugs (a gather without gradient, an unscaled replica loss)
    # move the weights by 1e-2 or more at any tau and T.
    testing.assert_replicas_match(build, _paws_batches(3), steps=3, rtol=1e-3, atol=1e-4)


def test_unique_classes_per_replica_and_a_wrong_layout_is_refused():
    strategy = testing.mirrored_cpu_strategy(2)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        m = _paws(unique_classes=True)
        m.compile(optimizer=keras.optimizers.SGD(0.1))
    h = m.fit(_paws_batches(2, chunks=2), epochs=1, steps_per_epoch=2, verbose=0)
    assert np.isfinite(h.history["loss"][-1])
    with strategy.scope():
        m2 = _paws()  # expects one chunk: replica 1's columns now mix classes
        m2.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="class-interleaved"):
        m2.fit(_paws_batches(2, chunks=2), epochs=1, steps_per_epoch=2, verbose=0)


def test_fit_loss_falls_and_snn_learns():
    keras.utils.set_random_seed(0)
    m = _paws(norm="batch")
    m.compile(optimizer=keras.optimizers.Adam(0.01))
    hist = m.fit(_paws_batches(4).repeat(), epochs=8, steps_per_epoch=4, verbose=0)
    assert hist.history["loss_paws"][-1] < 0.8 * hist.history["loss_paws"][0]
    assert methods.get("paws") is PAWS


def test_snn_prediction_streams_over_the_labeled_set():
    rng = np.random.default_rng(7)
    q = _unit(rng.normal(size=(5, 4))).astype("float32")
    s = _unit(rng.normal(size=(11, 4))).astype("float32")
    y = rng.integers(0, 3, 11)
    batches = [(s[:4], y[:4]), (s[4:9], y[4:9]), (s[9:], y[9:])]
    got = snn_lib.snn_predict(q, batches, 3, 0.1)
    np.testing.assert_allclose(got, _softmax(q @ s.T / 0.1) @ np.eye(3)[y], rtol=1e-5, atol=1e-7)


def test_export_serves_the_snn_classifier_with_its_supports(tmp_path):
    from tfssl import export

    keras.utils.set_random_seed(0)
    m = _paws(norm="batch")
    m.compile(optimizer=keras.optimizers.Adam(0.01))
    m.fit(_paws_batches(2), epochs=1, steps_per_epoch=2, verbose=0)
    rng = np.random.default_rng(8)
    lab_x = rng.integers(0, 256, [12, 8, 8, 1]).astype("uint8")
    lab_y = np.arange(12) % 5
    labeled = tf.data.Dataset.from_tensor_slices(
        {"image": lab_x.astype("float32") / 255.0, "label": lab_y}).batch(5)
    paths = export.export_model(m, str(tmp_path / "run"), labeled=labeled)
    assert set(paths) == {"encoder", "classifier"}
    images = rng.integers(0, 256, [3, 8, 8, 1]).astype("uint8")
    served = tf.saved_model.load(paths["classifier"]).signatures["serving_default"](
        images=tf.constant(images))["probabilities"].numpy()
    emb = snn_lib.embedding_fn(m)
    want = snn_lib.snn_predict(emb(images.astype("float32") / 255.0).numpy(),
                               [(emb(lab_x.astype("float32") / 255.0).numpy(), lab_y)], 5, 0.1)
    np.testing.assert_allclose(served, want, rtol=1e-4, atol=1e-5)


def test_finetune_copies_the_first_projection_layer_and_leaves_the_model_alone():
    keras.utils.set_random_seed(0)
    m = _paws(norm="batch")
    before = [w.numpy().copy() for w in m.encoder.weights + m.projector.weights]
    enc, head = finetune_lib.finetune_model(m.encoder, m.projector, 5)
    np.testing.assert_array_equal(head.get_layer("dense0").kernel.numpy(),
                                  m.projector.get_layer("dense0").kernel.numpy())
    assert not np.any(head.get_layer("output").kernel.numpy())
    rng = np.random.default_rng(9)
    x = rng.uniform(0, 1, [20, 8, 8, 1]).astype("float32")
    y = np.arange(20) % 5
    stream = tf.data.Dataset.from_tensor_slices(
        {"labeled": {"weak": x, "label": y}}).repeat().batch(10)
    test = tf.data.Dataset.from_tensor_slices({"image": x, "label": y}).batch(10)
    res = finetune_lib.fine_tune(m.encoder, m.projector, stream, 20, test, 5, epochs=40,
                                batch_size=10, learning_rate=0.1)
    assert res["top1"] > 0.6  # fits its own 20 images; chance is 0.2
    after = [w.numpy() for w in m.encoder.weights + m.projector.weights]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_config_round_trip_and_flags():
    m = _paws(label_smoothing=0.2, use_pred_head=True, me_max=False)
    m2 = PAWS.from_config(m.get_config())
    assert (m2.label_smoothing, m2.use_pred_head, m2.use_me_max) == (0.2, True, False)
    assert m2.predictor is not None
    sup, unl = PAWS.views(dict(size=32, channels=3, flip=True), num_local=6)
    assert sorted(sup) == ["view_0", "view_1"]
    assert sorted(unl) == ["global_0", "global_1"] + [f"local_{i}" for i in range(6)]
    img = tf.zeros([32, 32, 3], tf.uint8)
    assert unl["local_0"](img).shape == (18, 18, 3) and unl["global_0"](img).shape == (32, 32, 3)
    assert PAWS.support_sampling(4, classes_per_batch=8, imgs_per_class=3,
                                 unique_classes=True)["num_chunks"] == 4


# -------------------------------------------------------------- program
def _paws_cfg(tmp_path, **kw):
    from tfssl.train import TrainConfig

    args = dict(classes_per_batch=10, imgs_per_class=2, num_local=2, proj_hidden=16,
                proj_dim=16, finetune_epochs=2)
    args.update(kw.pop("method_args", {}))
    base = dict(method="paws", workdir=str(tmp_path / "run"), export_dir=str(tmp_path / "sm"),
                epochs=1, steps_per_epoch=2, labels_per_class=2, unlabeled_batch_size=16,
                optimizer="lars", learning_rate=1.0, strategy="default", verbose=0, knn_k=10,
                method_args=args)
    base.update(kw)
    return TrainConfig(**base)


def test_training_program_reports_snn_and_finetuned_accuracy_and_exports(tmp_path):
    from tfssl.train import export_run, run

    summary = run(_paws_cfg(tmp_path))
    assert set(summary["metrics"]) == {"knn_top1", "linear_probe_top1", "snn_top1",
                                       "finetune_top1"}
    assert summary["flags"]["batch_size"] == 20  # the support batch, 10 classes x 2
    assert set(summary["export"]) == {"encoder", "classifier", "finetuned"}
    assert "snn_top1" in summary["history"] and "loss_me" in summary["history"]
    images = np.zeros([2, 8, 8, 1], np.uint8)
    probs = tf.saved_model.load(summary["export"]["classifier"]).signatures["serving_default"](
        images=tf.constant(images))["probabilities"].numpy()
    assert probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    again = export_run(str(tmp_path / "run"), str(tmp_path / "again"))  # supports rebuilt
    served = tf.saved_model.load(again["classifier"]).signatures["serving_default"](
        images=tf.constant(images))["probabilities"].numpy()
    np.testing.assert_allclose(served, probs, rtol=1e-4, atol=1e-6)


def test_training_program_refuses_a_support_batch_the_labels_cannot_fill(tmp_path):
    from tfssl.train import ConfigError, run

    with pytest.raises(ConfigError, match="fewer than imgs_per_class=3"):
        run(_paws_cfg(tmp_path, method_args=dict(imgs_per_class=3)))
    with pytest.raises(ConfigError, match="only 10"):
        run(_paws_cfg(tmp_path, method_args=dict(classes_per_batch=12)))
