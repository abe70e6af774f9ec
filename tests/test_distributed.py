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


def _build(ema=None, optimizer="sgd", steps_per_execution=1):
    def build():
        enc = models.encoder(models.small_cnn((8, 8, 1), width=8, norm="sync_batch"),
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
    calls = []
    gather = tf.distribute.ReplicaContext.all_gather

    def counting(self, value, axis, options=None):
        calls.append(value.dtype)
        return gather(self, value, axis, options)

    @tf.function
    def run(fused):
        def fn():
            ctx = tf.distribute.get_replica_context()
            parts = [tf.gather(t, ctx.replica_id_in_sync_group) for t in (a, b, c)]
            if fused:
                return distribute.all_gather_many(parts)
            return [gather(ctx, t, 0) for t in parts]
        return strategy.run(fn)

    monkeypatch.setattr(tf.distribute.ReplicaContext, "all_gather", counting)
    got = run(True)
    # one call per dtype on each replica
    assert len(calls) == 4 and calls.count(tf.float32) == calls.count(tf.int64) == 2
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
    calls = []
    gather = tf.distribute.ReplicaContext.all_gather
    monkeypatch.setattr(tf.distribute.ReplicaContext, "all_gather",
                        lambda self, v, axis, options=None: calls.append(1) or gather(
                            self, v, axis, options))

    @tf.function
    def run():
        def fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            return distribute.all_gather_with_ids(tf.gather(x, r), tf.gather(ids, r), num_ids)
        return strategy.run(fn)

    gx, gids = run()
    assert len(calls) == (2 if num_ids <= 2 ** 24 else 4)
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
