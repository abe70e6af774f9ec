"""2 logical CPU replicas == 1 device, and the loss-scaling rule behind it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import distribute, methods, models, testing


def _batches(n=3, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, [n * batch, 8, 8, 1]).astype("float32")
    y = rng.integers(0, 10, [n * batch]).astype("int64")
    return tf.data.Dataset.from_tensor_slices(
        {"labeled": {"weak": x, "label": y, "index": np.arange(n * batch)}}).batch(batch)


def _build(ema=None, optimizer="sgd", steps_per_execution=1, norm="sync_batch"):
    def build():
        enc = models.encoder(models.small_cnn((8, 8, 1), width=8, norm=norm),
                             (0.5,), (0.25,))
        m = methods.Supervised(enc, 10, ema_decay=ema)
        opt = (keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-3) if optimizer == "sgd"
               else keras.optimizers.Adam(1e-2))
        m.compile(optimizer=opt, steps_per_execution=steps_per_execution)
        return m
    return build


def test_two_replicas_match_one_device_sgd_with_ema():
    one, many = testing.assert_replicas_match(_build(ema=0.9), _batches(), steps=3)
    assert any(k.endswith("ema_0") for k in one)
    assert [v for k, v in one.items() if k.endswith("iteration")] == [3]


def test_two_replicas_match_one_device_with_steps_per_execution():
    # 2 steps per call (one call of 2, one of 1): the replicas' steps run in a
    # tf.while_loop around strategy.run.
    one, _ = testing.assert_replicas_match(_build(ema=0.9, steps_per_execution=2), _batches(),
                                           steps=3)
    assert [v for k, v in one.items() if k.endswith("iteration")] == [3]


def test_two_replicas_match_one_device_adam():
    testing.assert_replicas_match(_build(optimizer="adam"), _batches(), steps=3)


def test_two_replicas_match_one_device_with_loss_scaling():
    # mixed_float16 wraps the optimizer in a LossScaleOptimizer, which under a
    # merge-call strategy applies the inner update through
    # call_for_each_replica in threads of its own: apply_loss's pre-summed
    # gradients must not be summed again there (2x the update on 2 replicas).
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        # float16 activations: 1 in 1152 conv weights differs by 3e-4 from
        # the order of the sums; a second sum of the gradients differs by far more.
        one, _ = testing.assert_replicas_match(_build(), _batches(), steps=3, rtol=1e-2,
                                               atol=1e-3)
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    assert any("dynamic_scale" in k for k in one)


def test_sum_and_gather_is_one_all_reduce_per_dtype(monkeypatch):
    # distribute.sum_and_gather on 2 replicas: the sums and the (static-shape)
    # gathers of each dtype share one all-reduce; the gathered rows come back
    # exactly, in replica order; a dynamic-shape tensor falls back to one
    # all-gather.
    strategy = testing.mirrored_cpu_strategy(2)
    rng = np.random.default_rng(0)
    a = tf.constant(rng.normal(size=[2, 3, 4]).astype("float32"))
    b = tf.constant(rng.integers(-5, 5, [2, 2]))
    c = tf.constant(rng.normal(size=[2, 3, 2]).astype("float32") * 1e6)
    ids = tf.constant([[0, 7, -1], [99, 3, 2 ** 24]], tf.int64)
    d = tf.constant(rng.normal(size=[2, 5]).astype("float32"))
    calls = _counting_collectives(monkeypatch)

    @tf.function
    def run():
        def fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            pick = lambda t: tf.gather(t, r)  # noqa: E731
            dyn = tf.boolean_mask(pick(d), pick(d) > -100.0)  # shape [None]
            return distribute.sum_and_gather(
                [pick(a), pick(b)],
                [pick(c), distribute.id_carrier(pick(ids), 2 ** 24 + 1), pick(ids), dyn])
        return strategy.run(fn)

    summed, gathered = run()
    # per replica: one all-reduce of float32 (a, c, the carrier), one of int64
    # (b, ids), one all-gather for the dynamic tensor
    assert sorted(calls) == sorted(2 * [("all_reduce", ("float32",)),
                                        ("all_reduce", ("int64",)),
                                        ("all_gather", ("float32",))]), calls
    local = strategy.experimental_local_results
    for r in range(2):
        np.testing.assert_allclose(local(summed[0])[r], a[0] + a[1], rtol=1e-6)
        np.testing.assert_array_equal(local(summed[1])[r], b[0] + b[1])
        np.testing.assert_array_equal(local(gathered[0])[r], tf.reshape(c, [6, 2]))
        np.testing.assert_array_equal(
            tf.cast(local(gathered[1])[r], tf.int64), tf.reshape(ids, [6]))
        np.testing.assert_array_equal(local(gathered[2])[r], tf.reshape(ids, [6]))
        np.testing.assert_array_equal(local(gathered[3])[r], tf.reshape(d, [10]))
    # One device: identity.
    (s,), (g,) = distribute.sum_and_gather([tf.ones([2])], [tf.zeros([3], tf.int64)])
    np.testing.assert_array_equal(s, np.ones(2))
    np.testing.assert_array_equal(g, np.zeros(3))


def test_a_train_step_on_two_replicas_makes_one_collective(monkeypatch):
    # apply_loss sums the gradients and the trackers' totals and counts in one
    # all-reduce; the optimizer's own gradient sum is skipped and the packed
    # (multi-worker) logs need none of their own. Per-replica BN: the model
    # makes no other collective. Keras's path makes 2 (gradients, logs).
    monkeypatch.setattr(distribute, "is_multi_worker", lambda strategy=None: True)
    strategy = testing.mirrored_cpu_strategy(2)
    with strategy.scope():
        model = _build(norm="batch")()
    calls = _counting_collectives(monkeypatch)
    seen = []  # (logs, collectives traced so far) after each step
    model.fit(_batches(), epochs=1, steps_per_epoch=3, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(
                  on_train_batch_end=lambda b, logs: seen.append((dict(logs), list(calls))))])
    # One all-reduce in each replica's trace of the step (the epoch's end
    # adds get_metrics_result's own, after the steps).
    assert [c for _, c in seen] == 3 * [2 * [("all_reduce", ("float32",))]], seen
    assert len(seen) == 3 and set(seen[0][0]) == {"loss_x", "train_top1"}


def test_a_tracker_updated_after_apply_loss_is_an_error():
    class Late(methods.Supervised):
        def train_step(self, data):
            data = self.unpack(data)["labeled"]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                    data["label"], self(data["weak"], training=True), from_logits=True))
            self.apply_loss(tape, loss)
            self.loss_x.update_state(loss)  # too late: its step value is already summed
            return self.train_results()

    enc = models.encoder(models.small_cnn((8, 8, 1), width=8), (0.5,), (0.25,))
    model = Late(enc, 10)
    model.compile(optimizer="sgd")
    with pytest.raises(RuntimeError, match="'loss_x' updated after apply_loss"):
        model.fit(_batches(), epochs=1, steps_per_epoch=1, verbose=0)


def test_unscaled_loss_would_double_the_update():
    """The harness can fail: without 1/num_replicas the 2-replica step differs."""
    strategy = testing.mirrored_cpu_strategy(2)
    with strategy.scope():
        v = tf.Variable(1.0)
        opt = keras.optimizers.SGD(1.0)
        opt.build([v])

    def step(scale):
        with tf.GradientTape() as tape:
            loss = v * 1.0
            if scale:
                loss = distribute.scale_loss(loss)
        opt.apply(tape.gradient(loss, [v]), [v])

    strategy.run(step, args=(False,))
    assert v.numpy() == pytest.approx(-1.0)  # summed: 1 - 2 * 1
    v.assign(1.0)
    strategy.run(step, args=(True,))
    assert v.numpy() == pytest.approx(0.0)  # scaled: 1 - 1


def test_all_gather_and_mean_across_replicas():
    strategy = testing.mirrored_cpu_strategy(2)

    def fn():
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        x = tf.fill([2], tf.cast(rid, tf.float32))
        return distribute.all_gather(x), distribute.all_reduce_mean(x)

    gathered, mean = strategy.run(fn)
    np.testing.assert_array_equal(strategy.experimental_local_results(gathered)[1], [0, 0, 1, 1])
    np.testing.assert_allclose(strategy.experimental_local_results(mean)[0], [0.5, 0.5])
    # One device: identity.
    np.testing.assert_array_equal(distribute.all_gather(tf.ones([3])), np.ones(3))


def _counting_collectives(monkeypatch):
    """Patches ReplicaContext.all_reduce / all_gather to record (kind, dtype)
    per call (made at trace time)."""
    calls = []
    reduce, gather = tf.distribute.ReplicaContext.all_reduce, tf.distribute.ReplicaContext.all_gather

    def counting_reduce(self, op, value, options=None):
        dtypes = {t.dtype for t in tf.nest.flatten(value)}
        calls.append(("all_reduce", tuple(sorted(d.name for d in dtypes))))
        return reduce(self, op, value, options)

    def counting_gather(self, value, axis, options=None):
        calls.append(("all_gather", (value.dtype.name,)))
        return gather(self, value, axis, options)

    monkeypatch.setattr(tf.distribute.ReplicaContext, "all_reduce", counting_reduce)
    monkeypatch.setattr(tf.distribute.ReplicaContext, "all_gather", counting_gather)
    return calls


def test_all_gather_many_equals_one_gather_per_tensor_with_one_collective_per_dtype(
        monkeypatch):
    # distribute.all_gather_many: per tensor the same values, shapes and
    # dtypes as ReplicaContext.all_gather, on 2 replicas (shapes [3, 2, 2],
    # [5] int64 and [4]); one ReplicaContext.all_gather call per dtype.
    strategy = testing.mirrored_cpu_strategy(2)
    rng = np.random.default_rng(0)
    a = tf.constant(rng.uniform(size=[2, 3, 2, 2]).astype("float32"))
    b = tf.constant(rng.integers(-1, 1000, [2, 5]))
    c = tf.constant(rng.uniform(size=[2, 4]).astype("float32"))
    gather = tf.distribute.ReplicaContext.all_gather

    @tf.function
    def run(fused):
        def fn():
            ctx = tf.distribute.get_replica_context()
            parts = [tf.gather(t, ctx.replica_id_in_sync_group) for t in (a, b, c)]
            if fused:
                return distribute.all_gather_many(parts)
            return [gather(ctx, t, 0) for t in parts]
        return strategy.run(fn)

    calls = _counting_collectives(monkeypatch)
    got = run(True)
    # one call per dtype on each replica
    assert sorted(calls) == sorted(2 * [("all_gather", ("float32",)), ("all_gather", ("int64",))])
    want = run(False)
    for g, w, t in zip(got, want, (a, b, c)):
        for gl, wl in zip(strategy.experimental_local_results(g),
                          strategy.experimental_local_results(w)):
            assert gl.dtype == wl.dtype and gl.shape == wl.shape == [2 * t.shape[1]] + t.shape[2:]
            np.testing.assert_array_equal(gl.numpy(), wl.numpy())
        np.testing.assert_array_equal(strategy.experimental_local_results(g)[0],
                                      tf.reshape(t, [-1] + t.shape[2:].as_list()))
    # One device: identity.
    one = distribute.all_gather_many([tf.ones([3]), tf.zeros([2], tf.int64)])
    np.testing.assert_array_equal(one[0], np.ones(3))
    np.testing.assert_array_equal(one[1], np.zeros(2))


@pytest.mark.parametrize("num_ids", [100, 2 ** 25])
def test_all_gather_with_ids_is_exact_with_one_collective_where_float32_is(monkeypatch, num_ids):
    # Ids below 2^24 share the rows' float32 gather (one call per replica);
    # above, they are gathered as int64 (two calls), so that 2^24 + 1, which
    # float32 would round to 2^24, comes back exactly.
    strategy = testing.mirrored_cpu_strategy(2)
    x = tf.constant(np.arange(12, dtype="float32").reshape(2, 3, 2))
    ids = tf.constant([[0, 7, -1], [99, 3, 5]], tf.int64)
    if num_ids > 2 ** 24:
        ids = ids + 2 ** 24 + 1
    calls = _counting_collectives(monkeypatch)

    @tf.function
    def run():
        def fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            return distribute.all_gather_with_ids(tf.gather(x, r), tf.gather(ids, r), num_ids)
        return strategy.run(fn)

    gx, gids = run()
    want = [("all_gather", ("float32",))] if num_ids <= 2 ** 24 else [
        ("all_gather", ("float32",)), ("all_gather", ("int64",))]
    assert sorted(calls) == sorted(2 * want), calls
    for r in range(2):
        np.testing.assert_array_equal(strategy.experimental_local_results(gx)[r],
                                      tf.reshape(x, [6, 2]))
        got = strategy.experimental_local_results(gids)[r]
        assert got.dtype == tf.int64
        np.testing.assert_array_equal(got, tf.reshape(ids, [6]))


def test_strategy_choices(monkeypatch):
    assert distribute.make_strategy("default").num_replicas_in_sync == 1
    assert distribute.make_strategy("mirrored").num_replicas_in_sync == 2
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.make_strategy("multi_worker")
    with pytest.raises(ValueError, match="is not one of"):
        distribute.make_strategy("horovod")


def test_harness_catches_a_method_that_forgets_loss_scaling(monkeypatch):
    monkeypatch.setattr(distribute, "scale_loss", lambda loss: loss)
    with pytest.raises(AssertionError, match="replicas != 1 device"):
        testing.assert_replicas_match(_build(), _batches(), steps=2)
