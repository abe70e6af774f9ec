"""One real ``train_step`` of every method against an independent NumPy step.

Each test builds the method on a tiny encoder whose forward NumPy reproduces
(a per-pixel ``Dense(5, tanh)`` then global average pooling; projectors and
heads are the method's own layers, read back as arrays), runs ONE
``train_on_batch`` with plain SGD (learning rate ``LR``, no momentum), and
checks against a float64 NumPy step written from the official code:

- the loss and its logged components;
- the state after the step (queues, banks, pointers, DA queue, momentum and
  EMA networks);
- the update of every trainable weight: ``w - LR * dL/dw`` with ``dL/dw``
  taken by central finite differences of the NumPy loss in which the targets
  (everything the official code computes under ``no_grad`` / ``detach``) are
  held fixed, so a moved or removed stop-gradient shows as a wrong update.

Each test's docstring names the mutants it was seen to fail on.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfssl.methods.ascl import ASCL, ASCLBYOL
from tfssl.methods.mixmatch import MixMatch
from tfssl.methods.paws import PAWS
from tfssl.methods.sela import SeLa
from tfssl.methods.simmatch import FixMatch, SimMatch
from tfssl.methods.supervised import Supervised
from tfssl.ops import targets as tops

S, CH, F = 2, 3, 5  # image side, channels, feature width
LR = 1.0


# ----------------------------------------------------------------- helpers
def _encoder(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((S, S, CH))
    x = keras.layers.Dense(F, activation="tanh", name="pix")(inp)
    out = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, out, name="encoder")


def _vars(model, prefix):
    """{prefix/layer/weight: variable} for every weight of a (nested) model."""
    out = {}
    for layer in model.layers:
        for w in layer.weights:
            out[f"{prefix}/{layer.name}/{w.name}"] = w
    return out


def _arrays(named):
    return {k: np.array(v.numpy(), np.float64) for k, v in named.items()}


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sharpen(p, t):
    q = p ** (1.0 / t)
    return q / q.sum(-1, keepdims=True)


def _enc(P, x, pre="enc"):
    return np.tanh(x @ P[f"{pre}/pix/kernel"] + P[f"{pre}/pix/bias"]).mean((1, 2))


def _dense(P, x, name):
    y = x @ P[f"{name}/kernel"]
    return y + P[f"{name}/bias"] if f"{name}/bias" in P else y


def _bn(P, x, name, eps=1e-5):
    """Train-mode batch norm (biased batch variance), as Keras and PyTorch."""
    return ((x - x.mean(0)) / np.sqrt(x.var(0) + eps) * P[f"{name}/gamma"]
            + P[f"{name}/beta"])


def _mlp(P, x, pre, n, bn=False):
    """tfssl.models.heads.mlp: dense{i} [-> bn{i}] -> relu ..., last dense plain."""
    for i in range(n):
        x = _dense(P, x, f"{pre}/dense{i}")
        if i < n - 1:
            if bn:
                x = _bn(P, x, f"{pre}/bn{i}")
            x = np.maximum(x, 0.0)
    return x


def _fd_grads(loss_fn, P, names, eps=1e-6):
    """Central finite differences of ``loss_fn(P)`` for the arrays ``names``."""
    grads = {}
    for n in names:
        a = P[n]
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + eps
            hi = loss_fn(P)
            a[idx] = old - eps
            lo = loss_fn(P)
            a[idx] = old
            g[idx] = (hi - lo) / (2 * eps)
        grads[n] = g
    return grads


def _trainable_names(m, named):
    """Names of ``named`` that the optimizer trains; all of them must be named."""
    ids = {id(v): k for k, v in named.items()}
    names = [ids.get(id(v)) for v in m.trainable_variables]
    assert None not in names, [v.path for v in m.trainable_variables if id(v) not in ids]
    return names


def _check_update(m, named, before, grads, decay=None, atol=2e-5):
    """Every trainable weight moved by ``-LR * grad`` (then ``* decay[name]``)."""
    assert max(np.abs(g).max() for g in grads.values()) > 1e-3  # a real gradient
    for n, g in grads.items():
        want = before[n] - LR * g
        if decay is not None:
            want = want * decay(n)
        np.testing.assert_allclose(named[n].numpy(), want, rtol=1e-4, atol=atol, err_msg=n)


def _perturb(model, scale=0.3, seed=1):
    """Moves a momentum copy's weights away from the online network's."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_weights:
        v.assign(v.numpy() + scale * rng.normal(size=v.shape).astype("float32"))


def _images(rng, n, side=S):
    return rng.uniform(0, 1, [n, side, side, CH]).astype("float32")


# -------------------------------------------------------------------- ASCL
def _ascl_soft_labels_np(d, kind, k, max_entropy):
    c = 1.0 + (d * np.log(d)).sum(-1, keepdims=True) / max_entropy
    rest = np.zeros_like(d)
    if kind == "ascl":
        rest = np.minimum(k * c * d, 1.0)
    elif kind in ("ahcl", "hard"):
        top = np.argsort(-d, axis=-1)[:, :k]
        hard = np.zeros_like(d)
        np.put_along_axis(hard, top, 1.0, axis=-1)
        rest = hard * c if kind == "ahcl" else hard
    y = np.concatenate([np.ones([len(d), 1]), rest], 1)
    return y / y.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", ["ascl", "ahcl", "hard", "moco"])
def test_ascl_step_matches_numpy(kind):
    """ASCL / AHCL / Hard / MoCo v2 (official ``_forward_moco``): keys from the
    momentum encoder, ``d = softmax(k . queue / T2)``, soft labels, CE over
    ``[q.k, q.queue] / T1``, enqueue after the loss at the ring pointer (here
    wrapping 4 -> 0), momentum update of encoder and projector.

    Mutants that fail: T1 and T2 swapped; the queue written before it is read
    (each key its own negative); the clip after the normalisation; ``d`` from q
    instead of k; keys from the online encoder; the confidence over log(B)
    instead of log(queue size) (``n = tf.shape(d)[0]``); enqueue at 0 instead of
    the pointer; keys momentum-updated towards the pre-step weights; labels
    not normalised.
    (A stop-gradient on k/y cannot matter: nothing trainable feeds them.)
    """
    qsize, b, kn, t1, t2, mom = 8, 4, 2, 0.1, 0.05, 0.9
    m = ASCL(_encoder(), queue_size=qsize, kind=kind, num_neighbours=kn, proj_dims=(6, 4),
             t1=t1, t2=t2, momentum=mom)
    m.compile(optimizer=keras.optimizers.SGD(LR))
    _perturb(m.key_encoder)
    _perturb(m.key_projector, seed=2)
    m.queue_pointer.assign(4)
    m.queue_labels.assign([0, 1, 2, 0, 1, 2, 0, 1])
    rng = np.random.default_rng(0)
    xq, xk = _images(rng, b), _images(rng, b)
    labels = np.array([0, 1, 2, -1], np.int64)
    batch = {"unlabeled": {"query": xq, "key": xk, "label": labels}}

    named = {**_vars(m.encoder, "enc"), **_vars(m.projector, "proj"),
             **_vars(m.key_encoder, "kenc"), **_vars(m.key_projector, "kproj")}
    P = _arrays(named)
    queue0, qlab0 = m.queue.numpy().astype(np.float64), m.queue_labels.numpy()
    k = _unit(_mlp(P, _enc(P, xk, "kenc"), "kproj", 2))
    d = _softmax(k @ queue0.T / t2)
    y = _ascl_soft_labels_np(d, kind, kn, np.log(qsize))

    def loss_fn(P):
        q = _unit(_mlp(P, _enc(P, xq), "proj", 2))
        logits = np.concatenate([(q * k).sum(-1, keepdims=True), q @ queue0.T], 1) / t1
        return -(y * _log_softmax(logits)).sum(-1).mean()

    names = _trainable_names(m, named)
    grads = _fd_grads(loss_fn, P, names)
    logs = m.train_on_batch(batch, return_dict=True)

    np.testing.assert_allclose(logs["loss"], loss_fn(P), rtol=1e-5)
    c = 1.0 + (d * np.log(d)).sum(-1) / np.log(qsize)
    np.testing.assert_allclose(logs["mean_c"], c.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(logs["mean_max_d"], d.max(-1).mean(), rtol=1e-5)
    top = qlab0[d.argmax(-1)]
    np.testing.assert_allclose(logs["purity"], (top == labels)[labels >= 0].mean(), rtol=1e-6)
    # Queue: the four keys at rows 4..7, rows 0..3 untouched, pointer wrapped.
    want_q = queue0.copy()
    want_q[4:] = k
    np.testing.assert_allclose(m.queue.numpy(), want_q, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(m.queue_labels.numpy(), np.r_[qlab0[:4], labels])
    assert int(m.queue_pointer.numpy()) == 0
    _check_update(m, named, P, grads)
    # Key networks: m * key + (1 - m) * (updated) query weights.
    for kpre, qpre in (("kenc", "enc"), ("kproj", "proj")):
        for n in [n for n in named if n.startswith(kpre + "/")]:
            qn = qpre + n[len(kpre):]
            np.testing.assert_allclose(named[n].numpy(), mom * P[n] + (1 - mom) * named[qn].numpy(),
                                       rtol=1e-5, atol=1e-6, err_msg=n)


@pytest.mark.parametrize("kind", ["ascl", "hard"])
def test_ascl_byol_step_matches_numpy(kind):
    """ASCL-BYOL (official ``_forward_byol``): the predictor takes the
    UNNORMALISED projector output, ``p = normalize(pred(g(f(x_q))))`` (its BN on
    batch statistics); ``kind="ascl"`` builds soft labels over the other keys of
    the batch (``c`` over log(B - 1)); every other kind is plain BYOL
    ``2 - 2 p . k``; keys enqueued.

    Mutants that fail: the predictor fed the normalised q (the old code);
    neighbours used by kind ``hard`` (the old code); a sample's own key left
    in the softmax normaliser of d; the confidence over log(B).
    """
    b, kn, t2, mom = 4, 2, 0.05, 0.9
    m = ASCLBYOL(_encoder(), kind=kind, num_neighbours=kn, proj_dims=(6, 4), pred_hidden=6,
                 queue_size=8, t2=t2, momentum=mom)
    m.compile(optimizer=keras.optimizers.SGD(LR))
    _perturb(m.key_encoder)
    _perturb(m.key_projector, seed=2)
    rng = np.random.default_rng(3)
    xq, xk = _images(rng, b), _images(rng, b)
    batch = {"unlabeled": {"query": xq, "key": xk, "label": np.array([0, 1, 0, 1])}}
    named = {**_vars(m.encoder, "enc"), **_vars(m.projector, "proj"),
             **_vars(m.predictor, "pred"), **_vars(m.key_encoder, "kenc"),
             **_vars(m.key_projector, "kproj")}
    P = _arrays(named)
    queue0 = m.queue.numpy()
    k = _unit(_mlp(P, _enc(P, xk, "kenc"), "kproj", 2))
    y = np.zeros([b, b])  # columns: own key, then the others in order
    others = [[j for j in range(b) if j != i] for i in range(b)]
    d = np.stack([_softmax(k[i] @ k[o].T / t2) for i, o in zip(range(b), others)])
    if kind == "ascl":
        y = _ascl_soft_labels_np(d, "ascl", kn, np.log(b - 1))
    else:
        y[:, 0] = 1.0
    cand = np.stack([np.concatenate([k[i:i + 1], k[o]]) for i, o in zip(range(b), others)])

    def loss_fn(P):
        g = _mlp(P, _enc(P, xq), "proj", 2)
        p = _unit(_mlp(P, g, "pred", 2, bn=True))
        return (y * ((p[:, None] - cand) ** 2).sum(-1)).sum(-1).mean()

    names = _trainable_names(m, named)
    grads = _fd_grads(loss_fn, P, names)
    logs = m.train_on_batch(batch, return_dict=True)
    np.testing.assert_allclose(logs["loss"], loss_fn(P), rtol=1e-5)
    np.testing.assert_allclose(m.queue.numpy(), np.r_[k, queue0[4:]], rtol=1e-5, atol=1e-6)
    assert int(m.queue_pointer.numpy()) == 4
    _check_update(m, named, P, grads)


# ---------------------------------------------------------------- SimMatch
N_L, N_TRAIN, C = 6, 12, 3


def _simmatch_batch(rng, b=4, b_u=4):
    idx = np.array([2, 6, 0, 10])
    return {"labeled": {"weak": _images(rng, b), "label": (idx // 2) % C, "index": idx},
            "unlabeled": {"weak": _images(rng, b_u), "strong": _images(rng, b_u),
                          "label": np.array([0, 1, 2, -1])}}


@pytest.mark.parametrize("teacher,da_rows,bank_m", [("online", 0, 0.0), ("ema", 2, 0.0),
                                                    ("online", 5, 0.7)])
def test_simmatch_step_matches_numpy(teacher, da_rows, bank_m):
    """SimMatch (official ``models/simmatch.py`` / USB): ``L_x + lambda_u L_u +
    lambda_in L_in`` with DA (the queue starts EMPTY: the mean over its filled
    rows, this step's batch mean included), ``q^w = softmax(z^w . bank / t)``,
    unfolding ``q_hat = normalize(q^w * p[:, bank_labels])`` for L_in,
    aggregation ``p_hat = alpha p + (1 - alpha) sum_j q^w_j onehot(label_j)``
    for L_u with the mask ``max p_hat >= tau`` (mean over all rows); the bank
    read before this step's write of the labeled keys; the DA queue row and
    pointer (here also a full queue whose ring wraps); the EMA teacher's update;
    USB's blended bank write ``normalize(0.7 bank + 0.3 k)``.

    Mutants that fail: the DA queue started uniform (the old code: fails the
    ``da_rows=0`` case, loss_u and loss_in); DA on the wrong side (p times the
    mean); DA skipped; unfolding and aggregation swapped (q_hat from aggregate,
    p_hat from unfold); the bank written before it is read; the mask from p
    instead of p_hat; hard pseudo-labels; the stop-gradient removed from the
    online teacher's weak logits and p_hat, or from its embeddings z^w and
    q_hat (the update differs); lambda_u / lambda_in swapped; the EMA teacher
    not updated (the ``ema`` case); the blended bank write ignored (the 0.7
    case); DA from the queue before this step's row.
    """
    lam_u, lam_in, alpha, temp, da_len, mom = 0.7, 1.3, 0.9, 0.1, 4, 0.9
    ids = np.arange(0, 2 * N_L, 2)
    keras.utils.set_random_seed(0)
    m = SimMatch(_encoder(), C, labeled_ids=ids, labeled_labels=(ids // 2) % C,
                 num_train=N_TRAIN, proj_dims=(6, 4), temperature=temp, alpha=alpha,
                 threshold=0.5, lambda_u=lam_u, lambda_in=lam_in, da_len=da_len,
                 teacher=teacher, teacher_momentum=mom, warmup_steps=0, bank_momentum=bank_m)
    m.compile(optimizer=keras.optimizers.SGD(LR))
    rng = np.random.default_rng(4)
    filled = min(da_rows, da_len)
    ptr = da_rows % da_len
    if da_rows:
        m.da_queue.assign(np.r_[rng.dirichlet(np.ones(C), filled),
                                np.zeros([da_len - filled, C])].astype("float32"))
        m.da_pointer.assign(ptr)
    batch = _simmatch_batch(rng)
    x, y = batch["labeled"]["weak"], batch["labeled"]["label"]
    u_w, u_s = batch["unlabeled"]["weak"], batch["unlabeled"]["strong"]
    named = {**_vars(m.encoder, "enc"), **_vars(m.projector, "proj")}
    named.update({f"head/{w.name}": w for w in m.head.weights})
    if teacher == "ema":
        _perturb(m.teacher_encoder)
        _perturb(m.teacher_head, seed=2)
        _perturb(m.teacher_projector, seed=3)
        named.update({**_vars(m.teacher_encoder, "tenc"), **_vars(m.teacher_projector, "tproj"),
                      **_vars(m.teacher_head, "thead")})
    P = _arrays(named)
    bank0, bank_labels = m.bank.numpy().astype(np.float64), m.bank_labels.numpy()
    da0 = m.da_queue.numpy().astype(np.float64)

    def student(P, imgs):
        h = _enc(P, imgs)
        return h @ P["head/kernel"] + P["head/bias"], _unit(_mlp(P, h, "proj", 2))

    if teacher == "online":
        logits_w, z_w = student(P, u_w)
        k = student(P, x)[1]
    else:
        th = _enc(P, np.concatenate([x, u_w]), "tenc")
        t_logits = _dense(P, th, "thead/classifier")
        t_z = _unit(_mlp(P, th, "tproj", 2))
        logits_w, z_w, k = t_logits[4:], t_z[4:], t_z[:4]
    p = _softmax(logits_w)
    da = da0.copy()
    da[ptr] = p.mean(0)
    p = p * (1.0 / C + 1e-6) / (da[:min(da_rows + 1, da_len)].mean(0) + 1e-6)
    p /= p.sum(-1, keepdims=True)
    q_w = _softmax(z_w @ bank0.T / temp)
    q_hat = q_w * p[:, bank_labels]
    q_hat /= q_hat.sum(-1, keepdims=True)
    p_hat = alpha * p + (1 - alpha) * q_w @ np.eye(C)[bank_labels]
    conf = np.sort(p_hat.max(-1))
    assert conf[2] - conf[1] > 1e-3
    m.threshold = float(conf[1] + conf[2]) / 2  # two rows above, two below
    mask = (p_hat.max(-1) >= m.threshold).astype(np.float64)

    def parts(P):
        logits_x, _ = student(P, x)
        logits_s, z_s = student(P, u_s)
        l_x = -_log_softmax(logits_x)[np.arange(4), y].mean()
        l_u = (mask * -(p_hat * _log_softmax(logits_s)).sum(-1)).mean()
        l_in = -(q_hat * _log_softmax(z_s @ bank0.T / temp)).sum(-1).mean()
        return l_x, l_u, l_in

    def loss_fn(P):
        l_x, l_u, l_in = parts(P)
        return l_x + lam_u * l_u + lam_in * l_in

    names = _trainable_names(m, named)
    grads = _fd_grads(loss_fn, P, names)
    logs = m.train_on_batch(batch, return_dict=True)

    for key, want in zip(("loss_x", "loss_u", "loss_in"), parts(P)):
        np.testing.assert_allclose(logs[key], want, rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(logs["loss"], loss_fn(P), rtol=1e-5)
    np.testing.assert_allclose(logs["mask_rate"], 0.5)
    np.testing.assert_allclose(m.da_queue.numpy(), da, rtol=1e-5, atol=1e-7)
    assert int(m.da_pointer.numpy()) == (ptr + 1) % da_len
    want_bank = bank0.copy()
    slots = batch["labeled"]["index"] // 2
    want_bank[slots] = _unit(bank_m * bank0[slots] + (1 - bank_m) * k) if bank_m else k
    np.testing.assert_allclose(m.bank.numpy(), want_bank, rtol=1e-5, atol=1e-6)
    _check_update(m, named, P, grads)
    if teacher == "ema":
        for tpre, spre in (("tenc", "enc"), ("tproj", "proj"), ("thead/classifier", "head")):
            for n in [n for n in named if n.startswith(tpre + "/")]:
                sn = spre + n[len(tpre):]
                np.testing.assert_allclose(named[n].numpy(),
                                           mom * P[n] + (1 - mom) * named[sn].numpy(),
                                           rtol=1e-5, atol=1e-6, err_msg=n)


def test_fixmatch_step_matches_numpy():
    """FixMatch: ``L_x + lambda_u 1/B_u sum_i 1[max p_i >= tau] H(onehot(argmax p_i),
    softmax(logits^s_i))``, p the detached online prediction of the weak views
    (no DA, no bank).

    Mutants that fail: soft pseudo-labels; the mask dropped; the mean over the
    masked rows only; lambda_u ignored. (Hard targets and the mask carry no
    gradient, so the teacher's stop-gradients are checked by the SimMatch test,
    with soft targets.)
    """
    lam_u = 0.7
    m = FixMatch(_encoder(), C, threshold=0.5, lambda_u=lam_u)
    m.compile(optimizer=keras.optimizers.SGD(LR))
    rng = np.random.default_rng(5)
    batch = _simmatch_batch(rng)
    x, y = batch["labeled"]["weak"], batch["labeled"]["label"]
    u_w, u_s = batch["unlabeled"]["weak"], batch["unlabeled"]["strong"]
    named = _vars(m.encoder, "enc")
    named.update({f"head/{w.name}": w for w in m.head.weights})
    P = _arrays(named)

    def logits(P, imgs):
        return _enc(P, imgs) @ P["head/kernel"] + P["head/bias"]

    p = _softmax(logits(P, u_w))
    conf = np.sort(p.max(-1))
    m.threshold = float(conf[1] + conf[2]) / 2
    mask = (p.max(-1) >= m.threshold).astype(np.float64)
    hard = p.argmax(-1)

    def loss_fn(P):
        l_x = -_log_softmax(logits(P, x))[np.arange(4), y].mean()
        l_u = (mask * -_log_softmax(logits(P, u_s))[np.arange(4), hard]).mean()
        return l_x + lam_u * l_u

    grads = _fd_grads(loss_fn, P, _trainable_names(m, named))
    logs = m.train_on_batch(batch, return_dict=True)
    np.testing.assert_allclose(logs["loss"], loss_fn(P), rtol=1e-5)
    np.testing.assert_allclose(logs["mask_rate"], 0.5)
    assert logs["loss_in"] == 0.0
    _check_update(m, named, P, grads)


# ---------------------------------------------------------------- MixMatch
def test_mixmatch_step_matches_numpy():
    """MixMatch (official ``mixmatch.py``): guess ``sharpen(mean_k softmax(f(u_k)), T)``
    (no gradient), MixUp of ``[X, U_1, U_2]`` with ``lambda' = max(lambda, 1 -
    lambda)`` (the draws are the model's own stateless draws for (seed, step)),
    interleaved forwards, ``L_x`` soft CE, ``L_u`` mean over rows and classes
    of squared errors, ``w = lambda_u * clip(step * B / rampup)``; SGD, then
    kernels decayed by ``1 - wd * lr`` (biases not); the EMA of the weights.

    Mutants that fail: sharpen's T ignored; lambda' = max(l, 1 - l) dropped;
    L_u summed over classes; the guess from one augmentation only; the ramp
    counted from step + 1; weight decay on the biases too; the EMA updated
    again after the decay. (The guess is computed outside the tape, so a
    missing stop-gradient on it is not a reachable mutant.)
    """
    b, t, alpha, lam_u, ramp, wd, ema, seed, step = 3, 0.5, 0.75, 10.0, 64, 0.02, 0.9, 3, 3
    m = MixMatch(_encoder(), C, temperature=t, alpha=alpha, lambda_u=lam_u, rampup_images=ramp,
                 weight_decay=wd, ema_decay=ema, seed=seed)
    m.compile(optimizer=keras.optimizers.SGD(LR))
    m.optimizer.build(m.trainable_variables)
    m.optimizer.iterations.assign(step)
    rng = np.random.default_rng(6)
    x, u0, u1 = _images(rng, b), _images(rng, b), _images(rng, b)
    y = np.array([0, 2, 1])
    batch = {"labeled": {"weak": x, "label": y}, "unlabeled": {"aug0": u0, "aug1": u1}}
    named = _vars(m.encoder, "enc")
    named.update({f"head/{w.name}": w for w in m.head.weights})
    P = _arrays(named)

    def logits(P, imgs):
        return _enc(P, imgs) @ P["head/kernel"] + P["head/bias"]

    q = _sharpen((_softmax(logits(P, u0)) + _softmax(logits(P, u1))) / 2, t)
    lam, perm = tops.mixup_draws(3 * b, alpha, tf.constant([seed, step], tf.int64))
    lam, perm = lam.numpy().astype(np.float64), perm.numpy()
    lp = np.maximum(lam, 1 - lam)
    w_all = np.concatenate([x, u0, u1]).astype(np.float64)
    t_all = np.concatenate([np.eye(C)[y], q, q])
    xm = lp[:, None, None, None] * w_all + (1 - lp[:, None, None, None]) * w_all[perm]
    pm = lp[:, None] * t_all + (1 - lp[:, None]) * t_all[perm]
    w = lam_u * min(step * b / ramp, 1.0)

    def parts(P):
        z = logits(P, xm)
        l_x = -(pm[:b] * _log_softmax(z[:b])).sum(-1).mean()
        l_u = ((pm[b:] - _softmax(z[b:])) ** 2).mean()
        return l_x, l_u

    def loss_fn(P):
        l_x, l_u = parts(P)
        return l_x + w * l_u

    grads = _fd_grads(loss_fn, P, _trainable_names(m, named))
    logs = m.train_on_batch(batch, return_dict=True)
    np.testing.assert_allclose(logs["loss_x"], parts(P)[0], rtol=1e-5)
    np.testing.assert_allclose(logs["loss_u"], parts(P)[1], rtol=1e-4)
    np.testing.assert_allclose(logs["w_u"], w, rtol=1e-6)
    np.testing.assert_allclose(logs["loss"], loss_fn(P), rtol=1e-5)
    decay = 1 - wd * LR
    _check_update(m, named, P, grads, lambda n: decay if n.endswith("kernel") else 1.0)
    ema_of = {id(v): e for e, v in m._ema_pairs}
    for n, v in named.items():  # EMA of the stepped weights, before their decay
        stepped = named[n].numpy() / (decay if n.endswith("kernel") else 1.0)
        np.testing.assert_allclose(ema_of[id(v)].numpy(), ema * P[n] + (1 - ema) * stepped,
                                   rtol=1e-5, atol=1e-6, err_msg=n)


# -------------------------------------------------------------------- PAWS
@pytest.mark.parametrize("me_max,pred", [(True, False), (False, False), (True, True)])
def test_paws_step_matches_numpy(me_max, pred):
    """PAWS (official ``suncet/src/losses.py`` and ``paws_train.py``): supports
    and global views in one forward (projection head with BN on that batch's
    statistics), local crops in a second; ``snn(q, S) = softmax(norm q .
    norm S / tau) @ Y`` with the smoothed class-interleaved labels; targets
    ``sharpen(snn(h_global SWAPPED, h_s), T)``, local crops the mean of the two,
    ``t < 1e-4 -> 0``; ``L = H(t, snn(z_anchor, z_s))`` with gradient through the
    supports, plus ME-MAX ``sum p_bar log p_bar`` of the sharpened predictions;
    with the prediction head (ImageNet), anchors use ``z = pred(h)`` and targets
    ``h``.

    Mutants that fail: the targets' sharpening removed; ME-MAX removed (the
    ``me_max=True`` case) or its sharpening removed; targets not swapped;
    local targets from one global view; the supports detached in the anchor
    path (the update differs); the label smoothing dropped; targets from z
    instead of h (the ``pred`` case).
    """
    tau, sharp, eps = 0.1, 0.25, 0.1
    m = PAWS(_encoder(), num_classes=10, classes_per_batch=2, imgs_per_class=2,
             proj_hidden=6, proj_dim=4, temperature=tau, sharpen_t=sharp, me_max=me_max,
             label_smoothing=eps, finetune_epochs=0, use_pred_head=pred)
    m.compile(optimizer=keras.optimizers.SGD(LR))
    _perturb(m.projector, scale=0.2)  # nonzero biases and BN offsets: no all-zero h
    rng = np.random.default_rng(7)
    sup = [_images(rng, 4), _images(rng, 4)]
    g0, g1 = _images(rng, 2), _images(rng, 2)
    locs = [_images(rng, 2, side=1), _images(rng, 2, side=1)]
    loc = np.concatenate(locs)
    batch = {"labeled": {"view_0": sup[0], "view_1": sup[1], "label": np.array([5, 7, 5, 7])},
             "unlabeled": {"global_0": g0, "global_1": g1, "local_0": locs[0],
                           "local_1": locs[1], "label": np.array([5, 7])}}
    named = {**_vars(m.encoder, "enc"), **_vars(m.projector, "proj")}
    if pred:
        _perturb(m.predictor, scale=0.2, seed=3)
        named.update(_vars(m.predictor, "pred"))
    P = _arrays(named)
    cols = np.tile([0, 1], 4)  # 2 views x [a, b, a, b]
    Y = np.full([8, 2], eps / 2)
    Y[np.arange(8), cols] = 1 - eps + eps / 2

    def snn(q, s):
        return _softmax(_unit(q) @ _unit(s).T / tau) @ Y

    def embed(P, imgs):
        return _mlp(P, _enc(P, imgs), "proj", 3, bn=True)

    def predict(P, h):  # BN -> Dense(d/4) -> BN -> ReLU -> Dense(d), or z = h
        if not pred:
            return h
        x = _dense(P, _bn(P, h, "pred/bn_in"), "pred/dense0")
        return _dense(P, np.maximum(_bn(P, x, "pred/bn0"), 0.0), "pred/dense1")

    first = np.concatenate(sup + [g0, g1])
    h0 = embed(P, first)
    pg = snn(h0[8:], h0[:8])
    tg = _sharpen(np.concatenate([pg[2:], pg[:2]]), sharp)
    tt = np.concatenate([tg] + [0.5 * (tg[:2] + tg[2:])] * 2)
    tt[tt < 1e-4] = 0.0

    def parts(P):
        z = predict(P, embed(P, first))
        probs = snn(np.concatenate([z[8:], predict(P, embed(P, loc))]), z[:8])
        l_paws = -(tt * np.log(probs)).sum(-1).mean()
        p_bar = _sharpen(probs, sharp).mean(0)
        return l_paws, (p_bar * np.log(p_bar)).sum() if me_max else 0.0

    def loss_fn(P):
        return sum(parts(P))

    grads = _fd_grads(loss_fn, P, _trainable_names(m, named))
    logs = m.train_on_batch(batch, return_dict=True)
    np.testing.assert_allclose(logs["loss_paws"], parts(P)[0], rtol=1e-5)
    np.testing.assert_allclose(logs["loss_me"], parts(P)[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(logs["loss"], loss_fn(P), rtol=1e-5, atol=1e-5)
    _check_update(m, named, P, grads)


# -------------------------------------------------------------------- SeLa
def test_sela_step_matches_numpy():
    """SeLa (official ``main.py``): ``mean_h CE(W_h f(x), labels[h, index])``,
    hard labels of EACH head looked up by dataset index.

    Mutants that fail: every head trained on head 0's labels; the labels looked
    up by batch position instead of the dataset index; the sum over heads
    instead of the mean.
    """
    hc, k, n = 2, 3, 10
    m = SeLa(_encoder(), num_train=n, num_clusters=k, num_heads=hc)
    m.compile(optimizer=keras.optimizers.SGD(LR))
    table = np.random.default_rng(8).integers(0, k, [hc, n]).astype(np.int32)
    table[1] = (table[0] + 1) % k  # head 1's labels differ from head 0's everywhere
    m.labels.assign(table)
    rng = np.random.default_rng(9)
    x, idx = _images(rng, 4), np.array([7, 1, 3, 8])
    named = _vars(m.encoder, "enc")
    for h, head in enumerate(m.cluster_heads):
        named.update({f"h{h}/{w.name}": w for w in head.weights})
    P = _arrays(named)

    def loss_fn(P):
        f = _enc(P, x)
        return np.mean([-_log_softmax(f @ P[f"h{h}/kernel"] + P[f"h{h}/bias"])[
            np.arange(4), table[h, idx]].mean() for h in range(hc)])

    grads = _fd_grads(loss_fn, P, _trainable_names(m, named))
    logs = m.train_on_batch({"unlabeled": {"view": x, "index": idx}}, return_dict=True)
    np.testing.assert_allclose(logs["loss"], loss_fn(P), rtol=1e-5)
    np.testing.assert_array_equal(m.labels.numpy(), table)
    _check_update(m, named, P, grads)


def test_supervised_step_matches_numpy():
    """Supervised: ``CE((1 - eps) onehot(y) + eps / C, softmax(f(x)))``.

    Mutant that fails: label smoothing ignored.
    """
    eps = 0.2
    m = Supervised(_encoder(), C, label_smoothing=eps)
    m.compile(optimizer=keras.optimizers.SGD(LR))
    rng = np.random.default_rng(10)
    x, y = _images(rng, 4), np.array([0, 2, 1, 2])
    named = _vars(m.encoder, "enc")
    named.update({f"head/{w.name}": w for w in m.head.weights})
    P = _arrays(named)
    t = (1 - eps) * np.eye(C)[y] + eps / C

    def loss_fn(P):
        return -(t * _log_softmax(_enc(P, x) @ P["head/kernel"] + P["head/bias"])).sum(-1).mean()

    grads = _fd_grads(loss_fn, P, _trainable_names(m, named))
    logs = m.train_on_batch({"labeled": {"weak": x, "label": y}}, return_dict=True)
    np.testing.assert_allclose(logs["loss_x"], loss_fn(P), rtol=1e-5)
    _check_update(m, named, P, grads)
