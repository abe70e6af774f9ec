"""SimMatch / FixMatch: ops against NumPy, the bank, replicas, resume, fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import methods, models, testing
from tfssl.methods.simmatch import FixMatch, SimMatch
from tfssl.ops import memory_bank, similarity, targets


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_unfold_aggregate_and_calibrated_targets_match_numpy():
    rng = np.random.default_rng(0)
    b, k, c = 4, 7, 3
    p = rng.dirichlet(np.ones(c), size=b).astype("float32")
    q = rng.dirichlet(np.ones(k), size=b).astype("float32")
    labels = np.array([0, 2, 1, 2, 0, 0, 1])
    unf = np.stack([[p[i, labels[j]] for j in range(k)] for i in range(b)])
    agg = np.stack([[sum(q[i, j] for j in range(k) if labels[j] == cc) for cc in range(c)]
                    for i in range(b)])
    np.testing.assert_allclose(similarity.unfold(p, labels).numpy(), unf, rtol=1e-6)
    np.testing.assert_allclose(similarity.aggregate(q, labels, c).numpy(), agg, rtol=1e-5)
    q_hat, p_hat = similarity.calibrated_targets(p, q, labels, 0.9)
    want_q = q * unf / (q * unf).sum(-1, keepdims=True)
    np.testing.assert_allclose(q_hat.numpy(), want_q, rtol=1e-5)
    np.testing.assert_allclose(p_hat.numpy(), 0.9 * p + 0.1 * agg, rtol=1e-5)
    np.testing.assert_allclose(p_hat.numpy().sum(-1), 1.0, rtol=1e-5)


def test_instance_similarity_matches_numpy():
    rng = np.random.default_rng(1)
    z = _unit(rng.normal(size=(3, 5))).astype("float32")
    bank = _unit(rng.normal(size=(6, 5))).astype("float32")
    np.testing.assert_allclose(similarity.instance_similarity(z, bank, 0.1).numpy(),
                               _softmax(z @ bank.T / 0.1), rtol=1e-5)


def test_distribution_alignment_matches_numpy():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(4), size=5).astype("float32")
    mean = rng.dirichlet(np.ones(4)).astype("float32")
    want = p * (0.25 + 1e-6) / (mean + 1e-6)
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(targets.distribution_alignment(p, mean).numpy(), want, rtol=1e-5)


def test_filled_rows_mean_matches_numpy():
    """The DA queue's mean over its written rows (zeros = not yet written).
    Mutant that fails: the mean over all rows (the zeros included)."""
    rng = np.random.default_rng(7)
    queue = np.zeros([5, 3], "float32")
    queue[[0, 3]] = rng.dirichlet(np.ones(3), size=2)
    np.testing.assert_allclose(targets.filled_rows_mean(queue).numpy(), queue[[0, 3]].mean(0),
                               rtol=1e-6)
    np.testing.assert_array_equal(targets.filled_rows_mean(np.zeros([4, 3], "float32")).numpy(),
                                  np.zeros(3))
    # Aligning by the mean over all rows would only rescale p before the row
    # normalisation: the official zero-initialised queue gives the same p.
    p = rng.dirichlet(np.ones(3), size=4).astype("float32")
    np.testing.assert_allclose(
        targets.distribution_alignment(p, targets.filled_rows_mean(queue)).numpy(),
        (lambda q: q / q.sum(-1, keepdims=True))(p / queue.mean(0)), rtol=1e-4)


@pytest.mark.parametrize("hard", [False, True])
def test_mask_rule_and_mean_over_all_rows(hard):
    p_hat = np.array([[0.96, 0.02, 0.02], [0.5, 0.3, 0.2], [0.05, 0.95, 0.0]], "float32")
    logits = np.random.default_rng(3).normal(size=(3, 3)).astype("float32")
    loss, mask = targets.thresholded_cross_entropy(p_hat, logits, 0.95, hard)
    np.testing.assert_array_equal(mask.numpy(), [1, 0, 1])  # >= tau counts
    t = np.eye(3)[p_hat.argmax(-1)] if hard else p_hat
    ce = -(t * np.log(_softmax(logits))).sum(-1)
    np.testing.assert_allclose(float(loss), (ce * [1, 0, 1]).sum() / 3, rtol=1e-5)


def test_bank_write_last_occurrence_momentum_and_queue():
    bank = np.zeros([4, 2], "float32")
    slots = np.array([1, 3, 1, 0])
    vals = np.array([[1, 0], [0, 1], [0.6, 0.8], [1, 0]], "float32")
    np.testing.assert_array_equal(memory_bank.last_occurrence(slots).numpy(),
                                  [False, True, True, True])
    out = memory_bank.bank_write(bank, slots, vals).numpy()
    np.testing.assert_allclose(out, [[1, 0], [0.6, 0.8], [0, 0], [0, 1]])  # last write of slot 1
    old = _unit(np.array([[1, 1], [1, -1], [0, 1], [1, 0]], "float32"))
    blended = memory_bank.bank_write(old, slots, vals, 0.7).numpy()
    np.testing.assert_allclose(blended[1], _unit(0.7 * old[1] + 0.3 * vals[2]), rtol=1e-5)
    np.testing.assert_allclose(blended[2], old[2])
    queue, ptr = memory_bank.queue_push(np.zeros([3, 2], "float32"), tf.constant(2, tf.int64),
                                        np.array([[1, 1], [2, 2]], "float32"))
    np.testing.assert_allclose(queue.numpy(), [[2, 2], [0, 0], [1, 1]])
    assert int(ptr) == 1


N_L, N = 16, 48


def _encoder(norm="none"):
    return models.encoder(models.small_cnn((8, 8, 1), width=8, norm=norm), (0.5,), (0.25,))


def _simmatch(norm="none", **kw):
    ids = np.arange(0, 2 * N_L, 2)  # labeled dataset indices 0, 2, ..., 30
    kw = {"threshold": 0.5, "warmup_steps": 0, "proj_dims": (16, 8), **kw}
    return SimMatch(_encoder(norm), 10, labeled_ids=ids, labeled_labels=ids % 10, num_train=N,
                    **kw)


def _batches(steps=3, b=8, seed=0, repeat_labeled=False):
    rng = np.random.default_rng(seed)
    ids = np.arange(0, 2 * N_L, 2)
    lab = np.tile(ids[:b // 2], 2 * steps) if repeat_labeled else np.resize(ids, steps * b)
    x = rng.uniform(0, 1, [N, 8, 8, 1]).astype("float32")
    u = rng.integers(0, N, steps * b)
    return tf.data.Dataset.from_tensor_slices({
        "labeled": {"weak": x[lab], "label": lab % 10, "index": lab},
        "unlabeled": {"weak": x[u], "strong": np.clip(x[u] * 1.2, 0, 1), "label": u % 10,
                      "index": u}}).batch(b)


def test_step_reads_the_bank_before_writing_it():
    keras.utils.set_random_seed(0)
    m = _simmatch(lambda_u=0.0)
    m.compile(optimizer=keras.optimizers.SGD(0.0))
    batch = next(iter(_batches(1)))
    old = m.bank.numpy().copy()
    # What the step will see: no BN, so the concatenated forward equals these.
    h_w = m.encoder(batch["unlabeled"]["weak"])
    h_s = m.encoder(batch["unlabeled"]["strong"])
    h_x = m.encoder(batch["labeled"]["weak"])
    z_w, z_s, k = (_unit(m.projector(h).numpy()) for h in (h_w, h_s, h_x))
    p = _softmax(m.head(h_w).numpy())
    p = p * (0.1 + 1e-6) / (p.mean(0) + 1e-6)  # DA: the queue's one filled row
    p /= p.sum(-1, keepdims=True)
    labels = m.bank_labels.numpy()

    def l_in(bank):
        q_w = _softmax(z_w @ bank.T / 0.1)
        q_hat = q_w * p[:, labels]
        q_hat /= q_hat.sum(-1, keepdims=True)
        return -(q_hat * np.log(_softmax(z_s @ bank.T / 0.1))).sum(-1).mean()

    logs = m.train_on_batch(batch, return_dict=True)
    new = m.bank.numpy()
    slots = batch["labeled"]["index"].numpy() // 2
    np.testing.assert_allclose(new[slots], k, rtol=1e-5, atol=1e-6)  # written ...
    untouched = np.setdiff1d(np.arange(N_L), slots)
    np.testing.assert_array_equal(new[untouched], old[untouched])
    np.testing.assert_allclose(logs["loss_in"], l_in(old), rtol=1e-4)  # ... after the read
    assert not np.isclose(l_in(old), l_in(new), rtol=1e-3)


def test_two_replicas_match_one_device_and_fill_the_bank():
    def build():
        m = _simmatch("sync_batch", da_len=4, ema_decay=0.9)
        m.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        return m

    one, many = testing.assert_replicas_match(build, _batches(3), steps=3)
    bank = [v for k, v in one.items() if k.endswith("/bank") or k.endswith(":bank")]
    keras.utils.set_random_seed(0)
    init = build().bank.numpy()
    assert bank and not np.allclose(bank[0], init)
    # All 16 labeled images were in the 3 global batches (both replicas' halves).
    assert (np.abs(bank[0] - init).sum(-1) > 0).all()


def test_fixmatch_two_replicas_match_one_device():
    def build():
        m = FixMatch(_encoder("sync_batch"), 10, threshold=0.2)
        m.compile(optimizer=keras.optimizers.SGD(0.05))
        return m

    testing.assert_replicas_match(build, _batches(3), steps=3)


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_resume_restores_bank_and_da_queue(tmp_path, norm):
    """State and the EMA teacher survive save/load; with ``norm="batch"`` that
    includes the teacher's own BN moving statistics (from its train-mode
    forwards). Mutant that fails: the teacher's forward in inference mode (its
    BN statistics never move)."""
    keras.utils.set_random_seed(0)
    m = _simmatch(norm, teacher="ema")
    m.compile(optimizer=keras.optimizers.Adam(0.01))
    m.fit(_batches(3), epochs=1, steps_per_epoch=3, verbose=0)
    moving = [(t, s) for t, s in zip(m.teacher_encoder.non_trainable_weights,
                                     m.encoder.non_trainable_weights) if "moving" in t.path]
    assert bool(moving) == (norm == "batch")
    for t, s in moving:  # the teacher's statistics moved from their initial 0 / 1 ...
        assert t.shape == s.shape
        assert np.abs(t.numpy() - (0.0 if "mean" in t.path else 1.0)).max() > 1e-4, t.path
    if moving:  # ... and are its own, not the student's
        assert any(not np.allclose(t.numpy(), s.numpy()) for t, s in moving)
    path = str(tmp_path / "w.weights.h5")
    m.save_weights(path)
    keras.utils.set_random_seed(1)
    m2 = _simmatch(norm, teacher="ema")
    m2.compile(optimizer=keras.optimizers.Adam(0.01))
    m2.optimizer.build(m2.trainable_variables)
    m2.load_weights(path)
    for name in ("bank", "bank_labels", "da_queue", "da_pointer"):
        np.testing.assert_array_equal(getattr(m2, name).numpy(), getattr(m, name).numpy())
    assert int(m2.da_pointer.numpy()) == 3
    assert len(m2.teacher_encoder.weights) == len(m.teacher_encoder.weights)
    for a, b in zip(m2.teacher_encoder.weights, m.teacher_encoder.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)


@pytest.mark.parametrize("name", ["simmatch", "fixmatch"])
def test_fit_loss_falls(name):
    keras.utils.set_random_seed(0)
    m = _simmatch() if name == "simmatch" else FixMatch(_encoder(), 10, threshold=0.5)
    m.compile(optimizer=keras.optimizers.Adam(0.01))
    h = m.fit(_batches(4).repeat(), epochs=6, steps_per_epoch=4, verbose=0).history
    assert h["loss_x"][-1] < 0.7 * h["loss_x"][0]
    assert methods.get(name) is type(m)
    # The unlabeled branch is in the loss and active: the epoch means add up
    # (every term is a mean over the same steps), pseudo-labels pass the
    # threshold and their loss is not zero. Mutants that fail: L_u (or L_in)
    # left out of the total; a mask that never passes (threshold compared with
    # the wrong side); L_u computed on zero targets. The exact step is in
    # tests/test_step_refs.py.
    lam_in = 0.0 if name == "fixmatch" else m.lambda_in
    np.testing.assert_allclose(
        h["loss"], np.add(h["loss_x"], np.add(np.multiply(m.lambda_u, h["loss_u"]),
                                              np.multiply(lam_in, h["loss_in"]))), rtol=1e-5)
    assert h["mask_rate"][-1] > 0.05 and h["loss_u"][-1] > 0.0
    if name == "simmatch":
        assert h["loss_in"][-1] > 0.0


def test_config_round_trip_and_from_args():
    m = _simmatch(alpha=0.8, teacher="ema", bank_momentum=0.7)
    m2 = SimMatch.from_config(m.get_config())
    assert (m2.alpha, m2.teacher, m2.bank_momentum) == (0.8, "ema", 0.7)
    np.testing.assert_array_equal(m2.slot_of.numpy(), m.slot_of.numpy())

    class Source:
        num_classes, num_train = 10, N
        train_labels = np.arange(N) % 10

    m3 = SimMatch.from_args(_encoder(), Source(), labeled_ids=np.array([5, 9, 2]))
    assert m3.bank_labels.numpy().tolist() == [5, 9, 2]
    assert m3.slot_of.numpy()[[5, 9, 2, 0]].tolist() == [0, 1, 2, -1]
    with pytest.raises(ValueError, match="needs labeled_ids"):
        SimMatch(_encoder(), 10)
    assert FixMatch.from_config(FixMatch(_encoder(), 10, threshold=0.7).get_config()).threshold == 0.7


def test_no_propagation_during_warm_up():
    keras.utils.set_random_seed(0)
    m = _simmatch(warmup_steps=2)
    m.compile(optimizer=keras.optimizers.SGD(0.01))
    seen = []
    for b in _batches(4):
        m.reset_metrics()
        seen.append(float(m.train_on_batch(b, return_dict=True)["loss_in"]))
    assert seen[0] == 0.0 and seen[1] == 0.0 and seen[2] > 0 and seen[3] > 0
