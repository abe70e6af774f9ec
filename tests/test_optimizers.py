"""tfssl.optimizers: PyTorch's SGD (coupled L2), Adam with coupled L2, suncet's
LARS, each against a NumPy transcription of the official update rule, and the
coupled decay added once under a 2-replica strategy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl import optimizers, testing

LRS = (0.5, 0.2, 0.1)  # a changing rate: lr inside or outside the momentum buffer differ


def _lr_schedule():
    return keras.optimizers.schedules.PiecewiseConstantDecay([0, 1], list(LRS))  # step 0, 1, 2+


def _variables(rng):
    """A kernel, a bias and a BN gamma (the last two never decay)."""
    return [keras.Variable(rng.normal(size=(3, 2)).astype("float32"), name="kernel"),
            keras.Variable(rng.normal(size=(2,)).astype("float32"), name="bias"),
            keras.Variable(rng.normal(size=(2,)).astype("float32"), name="gamma")]


def _torch_sgd_step(p, grad, buf, lr, momentum, wd, nesterov, first):
    """One step of torch.optim.SGD (dampening 0) as its documentation states it:
    g <- g + wd p; b <- g on the first step, else mu b + g; g <- g + mu b
    (nesterov) or b; p <- p - lr g."""
    g = grad + wd * p
    if momentum:
        buf = g.copy() if first else momentum * buf + g
        g = g + momentum * buf if nesterov else buf
    return p - lr * g, buf


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_pytorch_sgd_with_coupled_weight_decay(nesterov):
    """Three steps of ``optimizers.SGD(momentum 0.9, wd 0.1)`` under a changing
    learning rate equal PyTorch's SGD, with biases and BN parameters undecayed.

    Mutants that fail it: the decay added after the momentum (``step = v + wd
    w``); decoupled decay (``w -= lr wd w``, Keras's); decay on the bias and
    gamma too (``exclude=()``); the learning rate inside the momentum buffer
    (Keras's ``m = mu m - lr g``)."""
    rng = np.random.default_rng(0)
    vars_ = _variables(rng)
    wd, mu = 0.1, 0.9
    opt = optimizers.SGD(_lr_schedule(), momentum=mu, nesterov=nesterov, weight_decay=wd)
    opt.build(vars_)
    assert [opt.uses_weight_decay(v) for v in vars_] == [True, False, False]
    state = [(v.numpy().astype("float64"), None) for v in vars_]
    for t, lr in enumerate(LRS):
        grads = [rng.normal(size=v.shape).astype("float32") for v in vars_]
        opt.apply(grads, vars_)
        state = [_torch_sgd_step(p, g.astype("float64"), b, lr, mu, wd if i == 0 else 0.0,
                                 nesterov, t == 0)
                 for i, ((p, b), g) in enumerate(zip(state, grads))]
        for v, (p, _) in zip(vars_, state):
            np.testing.assert_allclose(v.numpy(), p, rtol=1e-5, atol=1e-6)


def test_sgd_without_momentum_and_config_round_trip():
    """``momentum=0``: ``w <- w - lr (g + wd w)``; the config rebuilds the same
    optimizer (checkpointed runs, ``summary.json``). Mutant: ``get_config``
    without the coupled decay (from_config gives wd 0)."""
    rng = np.random.default_rng(1)
    vars_ = _variables(rng)
    opt = optimizers.SGD(0.3, weight_decay=0.2)
    w0 = [v.numpy() for v in vars_]
    grads = [rng.normal(size=v.shape).astype("float32") for v in vars_]
    opt.apply(grads, vars_)
    np.testing.assert_allclose(vars_[0].numpy(), w0[0] - 0.3 * (grads[0] + 0.2 * w0[0]),
                               rtol=1e-6)
    np.testing.assert_allclose(vars_[1].numpy(), w0[1] - 0.3 * grads[1], rtol=1e-6)
    again = optimizers.SGD.from_config(
        optimizers.SGD(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4).get_config())
    assert (again.l2_weight_decay, again.momentum, again.nesterov) == (5e-4, 0.9, True)
    assert again.exclude == optimizers.DEFAULT_EXCLUDE and again.weight_decay is None


def test_adam_with_coupled_weight_decay_matches_pytorch_adam():
    """``optimizers.Adam(weight_decay=wd)`` equals PyTorch's ``Adam(weight_decay)``
    (g <- g + wd p, then Adam) over 3 steps, the bias and gamma undecayed
    (epsilon tiny, so where it sits does not matter). Mutants: no decay
    (Keras's Adam with ``weight_decay=None``); decoupled decay (Keras's
    ``weight_decay``); decay on the bias and gamma."""
    rng = np.random.default_rng(2)
    vars_ = _variables(rng)
    wd, lr, b1, b2 = 0.5, 0.01, 0.9, 0.999
    opt = optimizers.Adam(lr, weight_decay=wd, epsilon=1e-12)
    state = [(v.numpy().astype("float64"), 0.0, 0.0) for v in vars_]
    for t in range(1, 4):
        grads = [rng.normal(size=v.shape).astype("float32") for v in vars_]
        opt.apply(grads, vars_)
        new = []
        for i, ((p, m, s), g) in enumerate(zip(state, grads)):
            g = g.astype("float64") + (wd * p if i == 0 else 0.0)
            m, s = b1 * m + (1 - b1) * g, b2 * s + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(s / (1 - b2 ** t)) + 1e-12)
            new.append((p, m, s))
        state = new
        for v, (p, _, _) in zip(vars_, state):
            np.testing.assert_allclose(v.numpy(), p, rtol=1e-5, atol=1e-6)


def _suncet_lars_step(p, grad, buf, lr, momentum, wd, eta, nesterov, excluded):
    """suncet src/lars.py + src/sgd.py: for a non-excluded parameter with
    nonzero norms, g <- (g + wd p) eta |p| / (|g| + wd |p| + eps); excluded or
    zero-norm: g unchanged (no decay). Then d = -lr g; b <- mu b + d (b = d on
    the first step, the same from zeros); d <- d + mu b (nesterov) or b; p <- p + d."""
    if not excluded:
        pn, gn = np.linalg.norm(p), np.linalg.norm(grad)
        if pn != 0 and gn != 0:
            grad = (grad + wd * p) * (eta * pn / (gn + pn * wd + 1e-8))
    d = -lr * grad
    buf = momentum * buf + d
    d = d + momentum * buf if nesterov else buf
    return p + d, buf


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_the_official_paws_lars_under_a_changing_rate(nesterov):
    """Three LARS steps under a changing rate equal suncet's LARS-wrapped SGD
    (learning rate inside the momentum buffer), with a kernel whose gradient is
    zero (no decay, as suncet). Mutants: ``v <- mu v + g; w -= lr v`` (the
    learning rate outside the buffer); decay added where a norm is zero;
    bias/BN adapted or decayed."""
    rng = np.random.default_rng(3)
    vars_ = _variables(rng) + [keras.Variable(rng.normal(size=(2, 2)).astype("float32"),
                                              name="kernel")]
    wd, mu, eta = 0.05, 0.9, 0.02
    opt = optimizers.LARS(_lr_schedule(), momentum=mu, weight_decay=wd, trust_coefficient=eta,
                          nesterov=nesterov)
    excluded = [False, True, True, False]
    state = [(v.numpy().astype("float64"), np.zeros(v.shape)) for v in vars_]
    for lr in LRS:
        grads = [rng.normal(size=v.shape).astype("float32") for v in vars_]
        grads[3] = np.zeros_like(grads[3])
        opt.apply(grads, vars_)
        state = [_suncet_lars_step(p, g.astype("float64"), b, lr, mu, wd, eta, nesterov, ex)
                 for (p, b), g, ex in zip(state, grads, excluded)]
        for v, (p, _) in zip(vars_, state):
            np.testing.assert_allclose(v.numpy(), p, rtol=1e-5, atol=1e-6)


def _plain_model():
    """A plain Keras model (Keras's own train_step, whose optimizer sums the
    replica gradients itself): Dense kernels and biases, LayerNorm gamma/beta."""
    inp = keras.Input((4,))
    h = keras.layers.Dense(6, activation="tanh", name="hidden")(inp)
    h = keras.layers.LayerNormalization(name="norm")(h)
    out = keras.layers.Dense(3, name="out")(h)
    model = keras.Model(inp, out)
    model.compile(optimizer=optimizers.SGD(0.1, momentum=0.9, nesterov=True, weight_decay=0.5),
                  loss="mse")
    return model


def test_coupled_decay_is_added_once_under_two_replicas():
    """Keras's own ``fit`` and an ``SSLModel`` (``apply_loss``) under 2 mirrored
    CPU replicas equal 1 device with a strong coupled decay (wd 0.5).

    Mutant: the decay added to each replica's gradient before the cross-replica
    sum (``apply()`` overridden to add ``wd w``): 2 wd w on 2 replicas, the
    plain model's weights differ."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    testing.assert_replicas_match(_plain_model, data, steps=3)

    from tfssl import methods, models

    images = rng.uniform(0, 1, size=(16, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 3, size=16)
    batches = tf.data.Dataset.from_tensor_slices(
        {"labeled": {"weak": images, "label": labels, "index": np.arange(16)}}).batch(8).repeat()

    def build():
        enc = models.encoder(models.small_cnn((8, 8, 1), width=4, norm="sync_batch"),
                             (0.5,), (0.25,))
        m = methods.get("supervised")(encoder=enc, num_classes=3)
        m.compile(optimizer=optimizers.SGD(0.1, momentum=0.9, weight_decay=0.5))
        return m

    testing.assert_replicas_match(build, batches, steps=3)
