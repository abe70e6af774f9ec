"""Every method behaves as a Keras model: save / load_model with no
custom_objects (and the next step equal to the original model's), export,
evaluate, fit(x, y), and a clear error for compile arguments a method ignores."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import multi_worker_cases as cases
from tfssl import methods, optimizers, testing


def _encoder():
    return cases._encoder()


def fixmatch():
    """FixMatch with the EMA teacher (its weights are method state)."""
    _, data = cases.simmatch()

    def build():
        m = methods.FixMatch(_encoder(), 10, threshold=0.5, teacher="ema", teacher_momentum=0.9)
        # PyTorch-form SGD, coupled decay, USB's partial cosine: the recipe optimizer.
        m.compile(optimizer=optimizers.SGD(optimizers.PartialCosine(0.05, 10), momentum=0.9,
                                           nesterov=True, weight_decay=5e-3))
        return m

    return build, data


def moco():
    _, data = cases.ascl()

    def build():
        m = methods.MoCo(_encoder(), queue_size=16, proj_dims=(16, 8), momentum=0.9)
        # Keras's decoupled decay (flags/digits.cfg's form), every parameter decayed
        # (not the default exclusions, so a load that lost them would differ).
        m.compile(optimizer=optimizers.DecoupledSGD(0.05, momentum=0.9, weight_decay=0.05,
                                                    exclude=()))
        return m

    return build, data


def ascl_byol():
    _, data = cases.ascl()

    def build():
        m = methods.ASCLBYOL(_encoder(), pred_hidden=16, queue_size=16, proj_dims=(16, 8),
                             momentum=0.9)
        m.compile(optimizer=optimizers.Adam(0.01, weight_decay=1e-3))
        return m

    return build, data


def supervised_decoupled_exclude():
    """Supervised with AdamW whose exclusions (biases only, not the default
    bias / gamma / beta) must survive the load."""
    _, data = cases.supervised()

    def build():
        m = methods.Supervised(_encoder(), 10)
        m.compile(optimizer=optimizers.AdamW(0.01, weight_decay=0.5, exclude=("bias",)))
        return m

    return build, data


CASES = {"supervised": cases.supervised, "supervised_adamw": supervised_decoupled_exclude,
         "sela": cases.sela, "mixmatch": cases.mixmatch, "simmatch": cases.simmatch,
         "fixmatch": fixmatch, "ascl": cases.ascl, "moco": moco, "ascl_byol": ascl_byol,
         "paws": cases.paws}


def _trained(name, steps=1):
    build, data, *_ = CASES[name]()
    keras.utils.set_random_seed(0)
    model = build()
    model.fit(data.take(steps), epochs=1, steps_per_epoch=steps, verbose=0)
    return model, data


def _labeled(n=20, seed=3):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, [n, 8, 8, 1]).astype("float32"),
            rng.integers(0, 10, [n]).astype("int64"))


def _knn_top1(model, ref, test, k, t):
    """NumPy weighted kNN (cosine similarity, exp(s / t) votes) on the encoder's features."""
    def feats(v):
        f = model.encoder(v, training=False).numpy().astype(np.float64)
        return f / np.linalg.norm(f, axis=1, keepdims=True)
    sims = feats(test[0]) @ feats(ref[0]).T
    top = np.argsort(-sims, 1)[:, :k]
    scores = np.zeros([len(test[0]), 10])
    for i in range(len(test[0])):
        for j in top[i]:
            scores[i, ref[1][j]] += np.exp(sims[i, j] / t)
    return float(np.mean(np.argmax(scores, 1) == test[1]))


def _check_export(model, exported, path):
    """``exported.export(path)`` serves ``model``'s call and features (inference
    mode, EMA weights where the method evaluates with them)."""
    x = _labeled(6, seed=9)[0]
    with model.ema_applied():
        want = model(x, training=False).numpy()
        want_f = model.encoder(x, training=False).numpy()
    exported.export(path, verbose=False)
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(served.serve(x).numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served.features(x).numpy(), want_f, rtol=1e-5, atol=1e-6)
    if model.evaluate_with_ema:  # the EMA weights differ from the raw ones
        assert not np.allclose(model(x, training=False).numpy(), want, atol=1e-6)


def _check_evaluate(model):
    """evaluate on a dataset of dicts and on (x, y) arrays. With a classifier:
    top-1 against argmax of the logits, and the loss; without: one clear error
    naming ``reference``, and with it kNN top-1 equal to a NumPy kNN."""
    test, ref = _labeled(12, seed=5), _labeled(40, seed=6)
    ds = tf.data.Dataset.from_tensor_slices({"image": test[0], "label": test[1]}).batch(5)
    if model.head is not None:
        with model.ema_applied():
            logits = model(test[0], training=False).numpy()
        top1 = float(np.mean(np.argmax(logits, 1) == test[1]))
        got = model.evaluate(ds, verbose=0, return_dict=True)
        assert set(got) == {"loss", "top1"}
        np.testing.assert_allclose(got["top1"], top1, atol=1e-6)
        arrays = model.evaluate(test[0], test[1], batch_size=5, verbose=0, return_dict=True)
        np.testing.assert_allclose(arrays["top1"], top1, atol=1e-6)
        np.testing.assert_allclose(arrays["loss"], got["loss"], rtol=1e-5)
        with_ref = model.evaluate(ds, reference=ref, knn_k=3, knn_t=0.5, return_dict=True)
        assert set(with_ref) == {"loss", "top1", "knn_top1"}
        with model.ema_applied():
            np.testing.assert_allclose(with_ref["knn_top1"], _knn_top1(model, ref, test, 3, 0.5))
        return
    with pytest.raises(ValueError, match="reference"):
        model.evaluate(ds, verbose=0)
    want = _knn_top1(model, ref, test, k=3, t=0.5)
    got = model.evaluate(ds, reference=ref, knn_k=3, knn_t=0.5, verbose=0)
    np.testing.assert_allclose(got, want)
    arrays = model.evaluate(test[0], test[1], reference=ref, knn_k=3, knn_t=0.5,
                            return_dict=True)
    assert arrays == {"knn_top1": got}
    assert {_knn_top1(model, test, ref, 3, 0.5), _knn_top1(model, ref, test, 200, 0.1)} != {want}


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_load_next_step_export_evaluate(name, tmp_path):
    """Per method, on one trained model:

    * load_model (no custom_objects) restores weights, optimizer slots and every
      state variable (queues, banks, pointers, label table, EMA / teacher / key
      weights), and the next fit step of the loaded model equals the original's.
      Mutants: a method class not registered (load fails); a get_config entry
      dropped (different model or load error); the optimizers' ``exclude`` left
      out of their config (the loaded AdamW / DecoupledSGD / coupled SGD decays
      biases: the next step differs); compile_from_config not overridden (no
      optimizer after the load).
    * ``model.export`` of the loaded-then-trained model serves ``call`` and
      ``features``. Mutant: export without ``ema_applied`` (the supervised and
      MixMatch cases keep an EMA: serve differs).
    * ``evaluate`` (see ``_check_evaluate``). Mutants: the (x, y) tuple not
      unpacked (error); test and reference swapped, or k / t not passed through
      (each changes the kNN value here).
    """
    model, data = _trained(name)
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    before, after = testing.snapshot(model), testing.snapshot(loaded)
    assert list(before) == list(after)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    nxt = data.skip(1).take(1)
    logs = model.fit(nxt, epochs=1, steps_per_epoch=1, verbose=0).history
    logs_loaded = loaded.fit(nxt, epochs=1, steps_per_epoch=1, verbose=0).history
    assert logs == logs_loaded
    a, b = testing.snapshot(model), testing.snapshot(loaded)
    moved = 0
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)
        moved += not np.array_equal(a[k], before[k])
    assert moved > 0  # the step changed the model (the comparison is not vacuous)
    _check_export(model, loaded, str(tmp_path / "export"))
    _check_evaluate(model)


def test_load_in_a_fresh_process_needs_only_import_tfssl(tmp_path):
    """A new Python process that imports tfssl (nothing else of ours) loads
    the methods with each tfssl optimizer. Mutant: ``optimizers`` not imported
    by ``tfssl/__init__`` (the tfssl optimizers are not registered: load fails)."""
    for name in ("fixmatch", "moco", "paws", "supervised_adamw"):
        build, _, *_ = CASES[name]()
        model = build()
        model.save(str(tmp_path / f"{name}.keras"))
        np.save(str(tmp_path / f"{name}.npy"), model.encoder.get_weights()[0])
    script = (
        "import sys, glob, numpy as np, keras, tfssl\n"
        "for p in sorted(glob.glob(sys.argv[1] + '/*.keras')):\n"
        "    m = keras.saving.load_model(p)\n"
        "    np.testing.assert_array_equal(m.encoder.get_weights()[0], np.load(p[:-6] + '.npy'))\n"
        "    print(type(m).__name__, type(m.optimizer).__name__)\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["FixMatch", "SGD", "MoCo", "DecoupledSGD", "PAWS", "LARS",
                                  "Supervised", "AdamW"]


def test_supervised_fit_on_arrays_equals_fit_on_batches():
    """fit(x=images, y=labels) trains the same steps as the dict batches.
    Mutant: images and labels mixed up in the (x, y) path (error)."""
    x, y = _labeled(16, seed=8)

    def build():
        keras.utils.set_random_seed(0)
        m = methods.Supervised(_encoder(), 10)
        m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        return m

    a = build()
    a.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    b = build()
    b.fit(tf.data.Dataset.from_tensor_slices(
        {"labeled": {"weak": x, "label": y}}).batch(8), epochs=1, verbose=0)
    sa, sb = testing.snapshot(a), testing.snapshot(b)
    for k in sa:
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-6, atol=1e-7, err_msg=k)
    with pytest.raises(ValueError, match="fit"):
        build().fit(x, batch_size=8, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="sample_weight"):
        build().fit(x, y, sample_weight=np.ones(16), batch_size=8, epochs=1, verbose=0)


@pytest.mark.parametrize("argument", [dict(loss="sparse_categorical_crossentropy"),
                                      dict(metrics=["accuracy"]),
                                      dict(loss_weights=[1.0]), dict(weighted_metrics=["mse"])])
def test_compile_refuses_arguments_the_method_ignores(argument):
    """Mutant: compile passing loss / metrics to Keras (silently ignored: no error)."""
    m = methods.Supervised(_encoder(), 10)
    with pytest.raises(ValueError, match=f"{next(iter(argument))} would be ignored"):
        m.compile(optimizer="sgd", **argument)


def test_compile_takes_a_keras_optimizer_by_name():
    """``compile(optimizer="adam")`` (keras.optimizers.get) trains a method."""
    _, data = cases.ascl()
    m = methods.ASCL(_encoder(), queue_size=16, proj_dims=(16, 8))
    m.compile(optimizer="adam")
    w = m.encoder.get_weights()[0].copy()
    m.fit(data.take(1), epochs=1, steps_per_epoch=1, verbose=0)
    assert isinstance(m.optimizer, keras.optimizers.Adam)
    assert not np.allclose(m.encoder.get_weights()[0], w)
