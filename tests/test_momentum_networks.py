"""Momentum key encoders (ASCL, MoCo, ASCL-BYOL) and the EMA teacher (SimMatch,
FixMatch with ``teacher="ema"``) normalise with the batch's statistics, as the
official code's train-mode momentum networks do, under every batch norm.

Mutant caught: setting ``trainable = False`` on the copy (Keras then runs its
BatchNormalization in inference mode on moving statistics that stay 0 / 1),
and leaving the copy's parameters in the optimizer's variables.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import models
from tfssl.methods.ascl import ASCL, ASCLBYOL, MoCo
from tfssl.methods.simmatch import FixMatch, SimMatch

NORMS = ["batch", "sync_batch", "ghost_batch"]


def _encoder(norm):
    return models.encoder(models.small_cnn((8, 8, 1), width=8, norm=norm), (0.5,), (0.25,))


def _x(seed=0, b=16):
    # Far from mean 0 / variance 1, so moving statistics at their initial
    # values give features far from the batch-statistics ones.
    return (np.random.default_rng(seed).uniform(0, 1, [b, 8, 8, 1]) * 5 + 3).astype("float32")


def _pairs(m):
    if isinstance(m, ASCL):
        return [(m.key_encoder, m.encoder), (m.key_projector, m.projector)]
    return [(m.teacher_encoder, m.encoder)]


def _build(cls, norm):
    if cls in (SimMatch, FixMatch):
        ids = np.arange(8)
        kw = dict(labeled_ids=ids, labeled_labels=ids % 10, num_train=32,
                  proj_dims=(16, 8)) if cls is SimMatch else {}
        return cls(_encoder(norm), 10, teacher="ema", **kw)
    return cls(_encoder(norm), queue_size=16, proj_dims=(16, 8))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("cls", [ASCL, MoCo, ASCLBYOL, SimMatch, FixMatch])
def test_momentum_copy_uses_batch_statistics(cls, norm):
    keras.utils.set_random_seed(0)
    m = _build(cls, norm)
    x = _x()
    for copy, source in _pairs(m):
        inp = x if copy is _pairs(m)[0][0] else m.encoder(x, training=True)
        train = copy(inp, training=True).numpy()
        # Same weights at init: the copy's train-mode forward is the source's.
        np.testing.assert_allclose(train, source(inp, training=True).numpy(),
                                   rtol=1e-4, atol=1e-4)
        if copy is _pairs(m)[0][0]:  # the encoder has batch norm
            infer = copy(inp, training=False).numpy()
            assert np.abs(train - infer).max() > 1e-2
    copy_ids = {id(v) for c, _ in _pairs(m) for v in c.weights}
    assert not copy_ids & {id(v) for v in m.trainable_variables}
    assert copy_ids <= {id(v) for v in m.non_trainable_variables} | {
        id(v) for v in m.non_trainable_weights}
    # Every weight still listed exactly once (saving and restoring see them all).
    all_ids = [id(v) for v in m.trainable_variables + m.non_trainable_variables]
    assert len(all_ids) == len(set(all_ids)) == len({id(v) for v in m.variables})


def _ascl_data(b=8):
    x = _x(1, 4 * b)
    return tf.data.Dataset.from_tensor_slices({"unlabeled": {
        "query": x, "key": x[::-1].copy(), "label": np.arange(4 * b) % 10,
        "index": np.arange(4 * b)}}).batch(b)


@pytest.mark.parametrize("norm", ["batch", "ghost_batch"])
def test_key_encoder_after_a_step_is_the_momentum_average(norm):
    """One fit step: the optimizer moves only the online network; the key
    encoder's parameters become m k + (1 - m) q and its BN moving statistics
    move off their initial values (its forward ran in train mode)."""
    keras.utils.set_random_seed(0)
    m = ASCL(_encoder(norm), queue_size=16, proj_dims=(16, 8), momentum=0.9)
    m.compile(optimizer=keras.optimizers.SGD(0.5))
    before_k = [v.numpy() for v in m.key_encoder.trainable_weights]
    m.fit(_ascl_data().take(1), epochs=1, verbose=0)
    after_q = [v.numpy() for v in m.encoder.trainable_weights]
    for k0, k1, q1 in zip(before_k, m.key_encoder.trainable_weights, after_q):
        np.testing.assert_allclose(k1.numpy(), 0.9 * k0 + 0.1 * q1, rtol=1e-5, atol=1e-6)
    assert any(np.abs(q - k).max() > 1e-6 for q, k in zip(after_q, before_k))
    means = [v.numpy() for v in m.key_encoder.non_trainable_weights if "mean" in v.path]
    assert means and all(np.abs(mu).max() > 1e-3 for mu in means)
