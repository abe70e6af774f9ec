"""The method registry, the base model's EMA, and the supervised baseline."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import augment, data, methods, models


def _encoder(norm="batch"):
    return models.encoder(models.small_cnn((8, 8, 1), width=8, norm=norm), (0.5,), (0.25,))


def test_registry():
    assert "supervised" in methods.available()
    assert methods.get("supervised") is methods.Supervised
    with pytest.raises(ValueError, match="--method='nope' is unknown; available"):
        methods.get("nope")


def _np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_supervised_loss_is_the_label_smoothed_cross_entropy():
    keras.utils.set_random_seed(0)
    m = methods.Supervised(_encoder(norm="none"), 10, label_smoothing=0.1)
    m.compile(optimizer=keras.optimizers.SGD(0.0))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, [6, 8, 8, 1]).astype("float32")
    y = rng.integers(0, 10, [6])
    logits = m(x).numpy()
    targets = np.full([6, 10], 0.1 / 10)
    targets[np.arange(6), y] += 0.9
    expected = np.mean(-(targets * _np_log_softmax(logits)).sum(1))
    logs = m.train_on_batch({"labeled": {"weak": x, "label": y}}, return_dict=True)
    assert logs["loss_x"] == pytest.approx(expected, rel=1e-5)
    assert logs["train_top1"] == pytest.approx(np.mean(logits.argmax(1) == y))


def test_supervised_fit_loss_falls_on_digits():
    keras.utils.set_random_seed(0)
    src = data.digits()
    ids = data.labeled_split(src.train_labels, 10, labels_per_class=10, seed=0)
    ds = data.semi_supervised(src, ids, {"weak": augment.weak(8, 1, flip=False, pad=1)}, 32,
                              deterministic=True)
    m = methods.Supervised(_encoder(), 10)
    m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    h = m.fit(ds, epochs=5, steps_per_epoch=10, verbose=0,
              validation_data=data.evaluation(src.test(), 8))
    assert h.history["loss_x"][-1] < 0.5 * h.history["loss_x"][0]
    assert h.history["val_top1"][-1] > 0.35  # chance is 0.1


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_train_step_is_traced_once(optimizer):
    """The optimizer's slots exist before the first step, so ``fit`` traces the
    train step once (a slot created inside the trace makes tf.function trace
    it again: twice the start-up of every run). Mutant: ``fit`` without
    ``_build_optimizer`` (2 traces)."""
    traces = []

    class Counted(methods.Supervised):
        def train_step(self, data):
            traces.append(1)
            return super().train_step(data)

    keras.utils.set_random_seed(0)
    x = {"labeled": {"weak": tf.random.uniform([4, 8, 8, 1]),
                     "label": tf.constant([0, 1, 2, 3])}}
    m = Counted(_encoder(), 10)
    m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9) if optimizer == "sgd"
              else keras.optimizers.Adam(1e-3))
    m.fit(tf.data.Dataset.from_tensors(x).repeat(), epochs=2, steps_per_epoch=2, verbose=0)
    assert len(traces) == 1
    assert m.optimizer.iterations.numpy() == 4


def test_ema_follows_the_equation_and_swaps_for_evaluation():
    keras.utils.set_random_seed(0)
    m = methods.Supervised(_encoder(norm="none"), 10, ema_decay=0.5)
    m.compile(optimizer=keras.optimizers.SGD(0.1))
    assert m.evaluate_with_ema
    w = m.head.kernel
    w0 = w.numpy().copy()
    rng = np.random.default_rng(1)
    batch = {"labeled": {"weak": rng.uniform(0, 1, [4, 8, 8, 1]).astype("float32"),
                         "label": np.arange(4)}}
    m.train_on_batch(batch)
    w1 = w.numpy().copy()
    m.train_on_batch(batch)
    w2 = w.numpy().copy()
    ema = dict((id(v), e) for e, v in m._ema_pairs)[id(w)]
    expected = 0.5 * (0.5 * w0 + 0.5 * w1) + 0.5 * w2
    np.testing.assert_allclose(ema.numpy(), expected, rtol=1e-5, atol=1e-7)
    with m.ema_applied():
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w.numpy(), w2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="label_smoothing"):
        methods.Supervised(_encoder(), 10, label_smoothing=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        methods.Supervised(_encoder(), 10, ema_decay=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        methods.Supervised(_encoder(), 1)


def test_get_config_round_trip():
    m = methods.Supervised(_encoder(), 10, label_smoothing=0.2)
    m2 = methods.Supervised.from_config(m.get_config())
    assert m2.label_smoothing == 0.2 and m2.num_classes == 10
    assert m2.encoder.output_shape == m.encoder.output_shape


def test_state_variables_are_saved_and_restored(tmp_path):
    keras.utils.set_random_seed(0)
    m = methods.Supervised(_encoder(norm="none"), 10, ema_decay=0.9)
    queue = m.state_variable("queue", (4, 3))
    queue.assign(np.arange(12, dtype="float32").reshape(4, 3))
    m._ema_pairs[0][0].assign(np.full(m._ema_pairs[0][0].shape, 7.0, "float32"))
    path = str(tmp_path / "w.weights.h5")
    m.save_weights(path)
    keras.utils.set_random_seed(1)
    m2 = methods.Supervised(_encoder(norm="none"), 10, ema_decay=0.9)
    q2 = m2.state_variable("queue", (4, 3))
    m2.load_weights(path)
    np.testing.assert_array_equal(q2.numpy(), queue.numpy())
    np.testing.assert_array_equal(m2._ema_pairs[0][0].numpy(), 7.0)
    assert not q2.trainable


def _case(name, steps_per_execution):
    """A multi-worker test case's model, recompiled with ``steps_per_execution``,
    and its 3 global batches repeated."""
    import os

    from tfssl import testing

    build, dataset, *_ = testing._load_case(
        os.path.join(os.path.dirname(__file__), f"multi_worker_cases.py:{name}"))()
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(optimizer=model.optimizer, steps_per_execution=steps_per_execution)
    return model, dataset.repeat()


@pytest.mark.parametrize("name,n", [("mixmatch", 2), ("ascl", 2), ("ascl", 4)])
def test_steps_per_execution_runs_the_same_steps(name, n):
    # N steps per call in one graph: the same weights, state (queue, EMA),
    # optimizer slots and epoch logs as one step per call, and each epoch
    # keeps its 3 steps (calls of 2 + 1 steps, or one call of 3 for N = 4).
    from tfssl import testing

    runs = []
    for spe in (1, n):
        model, dataset = _case(name, spe)
        calls = []
        record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: calls.append(b))
        history = model.fit(dataset, epochs=2, steps_per_epoch=3, verbose=0, callbacks=[record])
        assert int(model.optimizer.iterations.numpy()) == 6
        runs.append((testing.snapshot(model), history.history, calls))
    (one, one_logs, one_calls), (many, many_logs, many_calls) = runs
    assert one_calls == [0, 1, 2] * 2
    assert len(many_calls) == 2 * (2 if n == 2 else 1)
    assert set(one) == set(many)
    for k in one:
        np.testing.assert_allclose(many[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert list(many_logs) == list(one_logs)
    for k in one_logs:
        np.testing.assert_allclose(many_logs[k], one_logs[k], rtol=1e-5, err_msg=k)


def test_steps_per_execution_evaluates_every_batch():
    # evaluate (and fit's validation) makes up to N one-step calls per call:
    # all 5 batches of 7 images are seen, as with one step per call.
    keras.utils.set_random_seed(0)
    m = methods.Supervised(_encoder(norm="none"), 10)
    rng = np.random.default_rng(0)
    test = tf.data.Dataset.from_tensor_slices(
        {"image": rng.uniform(0, 1, [35, 8, 8, 1]).astype("float32"),
         "label": rng.integers(0, 10, [35])}).batch(7)
    results = []
    for spe in (1, 2):
        m.compile(optimizer=keras.optimizers.SGD(0.0), steps_per_execution=spe)
        results.append(m.evaluate(test, verbose=0, return_dict=True))
        assert int(m.eval_top1.count.numpy()) == 35
    assert results[0] == pytest.approx(results[1], rel=1e-6)
    # fit with a CallbackList of the caller's still runs 3 steps an epoch.
    train = tf.data.Dataset.from_tensors(
        {"labeled": {"weak": rng.uniform(0, 1, [4, 8, 8, 1]).astype("float32"),
                     "label": rng.integers(0, 10, [4])}}).repeat()
    m.fit(train, epochs=2, steps_per_epoch=3, verbose=0,
          callbacks=keras.callbacks.CallbackList([], add_history=True, model=m))
    assert int(m.optimizer.iterations.numpy()) == 6
    # train_on_batch (a generator, not an iterator) runs its one batch.
    x, y = rng.uniform(0, 1, [6, 8, 8, 1]).astype("float32"), rng.integers(0, 10, [6])
    logs = m.train_on_batch({"labeled": {"weak": x, "label": y}}, return_dict=True)
    assert "loss_x" in logs and int(m.optimizer.iterations.numpy()) == 7
