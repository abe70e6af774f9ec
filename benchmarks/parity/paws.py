"""Parity of tfssl's PAWS with the official code (facebookresearch/suncet @ 731547d7).

Official: src/losses.py::init_paws_loss (snn :39-50, sharpen :34-37, targets
:65-73, loss :76, ME-MAX :79-83) and ::make_labels_matrix (:192-227); the step's
view swap is src/paws_train.py (target_views = cat(h[b:2b], h[:b])).

Run (tfssl's Python; the official half runs in the torch venv):
    python3 benchmarks/parity/paws.py
Venv and trees: benchmarks/parity/common_self.py.

(1) Given identical projections h and predictions z of the supports and of the
    unlabeled views (2 global + 6 local, CIFAR-10 config: 10 classes, smoothing
    0.1, tau 0.1, T 0.25, ME-MAX), compares the support label matrix, the anchor
    targets, L_paws, L_me and dL/dz, running OUR PAWS.train_step with lookup-table
    networks (and the official loss function on the same tensors).
(2) PAWS keeps no state across steps (no queue or bank): nothing to compare.
(3) The optimizer: official src/lars.py::LARS (trust 0.001) wrapping
    src/sgd.py::SGD (momentum 0.9, param groups of paws_train.py::init_opt :470-491:
    bias/bn excluded from LARS and decay) against tfssl.optimizers.LARS, three steps
    with the learning rate changing every step (as the warm-up/cosine schedule
    does), fixed gradients; weights after each step. The WRN-28-2 forward/backward
    itself is not run here (see PARITY.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common_self as cs  # noqa: E402

C, PER_CLASS, SVIEWS, UB, LOCAL, D = 10, 4, 2, 8, 6, 16
TAU, T, SMOOTH = 0.1, 0.25, 0.1


def official_main(seed):
    torch = cs.setup_torch(0)
    cs.official_tree("suncet", "src/losses.py")
    cs.stub = None
    from src.losses import init_paws_loss, make_labels_matrix  # official
    g = torch.Generator().manual_seed(seed)
    n_sup = SVIEWS * C * PER_CLASS
    n_unl = (2 + LOCAL) * UB
    h = torch.randn(n_sup + n_unl, D, generator=g)
    z = torch.randn(n_sup + n_unl, D, generator=g) * 0.7 + 0.3 * h
    z_leaf = z.clone().requires_grad_(True)
    lab1 = make_labels_matrix(num_classes=C, s_batch_size=PER_CLASS, world_size=1,
                              device=torch.device("cpu"), unique_classes=False, smoothing=SMOOTH)
    labels = torch.cat([lab1 for _ in range(SVIEWS)])
    paws = init_paws_loss(multicrop=LOCAL, tau=TAU, T=T, me_max=True)
    target_views = h[n_sup:n_sup + 2 * UB]
    target_views = torch.cat([target_views[UB:2 * UB], target_views[:UB]], dim=0)
    ploss, me = paws(anchor_views=z_leaf[n_sup:], anchor_supports=z_leaf[:n_sup],
                     anchor_support_labels=labels, target_views=target_views,
                     target_supports=h[:n_sup], target_support_labels=labels)
    (ploss + me).backward()
    out = dict(h=h.numpy(), z=z.numpy(), labels=labels.numpy(),
               loss_paws=ploss.item(), loss_me=me.item(), grad_z=z_leaf.grad.numpy())
    out.update(official_lars(torch))
    np.savez(cs.official_out(), **out)


WD = 1e-3  # large enough to see
SCHEDULES = {"changing": (0.1, 0.5, 1.0), "constant": (0.5, 0.5, 0.5)}  # lr of each step


def official_lars(torch):
    out = {}
    for name, lrs in SCHEDULES.items():
        out.update({f"{name}.{k}": v for k, v in _official_lars(torch, lrs).items()})
    return out


def _official_lars(torch, LRS):
    from src.lars import LARS  # official
    from src.sgd import SGD  # official
    g = torch.Generator().manual_seed(7)
    w = torch.nn.Parameter(torch.randn(8, 5, generator=g))
    b = torch.nn.Parameter(torch.randn(5, generator=g) * 0.1)
    grads = [(torch.randn(8, 5, generator=g), torch.randn(5, generator=g)) for _ in LRS]
    out = {"lars.w0": w.detach().numpy().copy(), "lars.b0": b.detach().numpy().copy()}
    opt = LARS(SGD([{"params": [w]}, {"params": [b], "LARS_exclude": True, "weight_decay": 0}],
                   lr=LRS[0], momentum=0.9, weight_decay=WD, nesterov=False), trust_coefficient=0.001)
    for s, (gw, gb) in enumerate(grads):
        for group in opt.param_groups:  # what WarmupCosineSchedule.step() does
            group["lr"] = LRS[s]
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        out[f"lars.gw{s}"], out[f"lars.gb{s}"] = gw.numpy(), gb.numpy()
        out[f"lars.w{s + 1}"], out[f"lars.b{s + 1}"] = w.detach().numpy().copy(), b.detach().numpy().copy()
    return out


def ours_lars(off, rep):
    for name, lrs in SCHEDULES.items():
        _ours_lars({k[len(name) + 1:]: v for k, v in off.items() if k.startswith(name + ".")},
                   rep, lrs, name)


def _ours_lars(off, rep, LRS, name):
    import keras
    from tfssl.optimizers import LARS
    w = keras.Variable(off["lars.w0"], name="kernel")
    b = keras.Variable(off["lars.b0"], name="bias")
    # step s reads the schedule at optimizer.iterations = s (before the increment):
    # boundaries 0, 1, ... give LRS[s] at step s ([1, 2] gave 0.1, 0.1, 0.5)
    sched = keras.optimizers.schedules.PiecewiseConstantDecay(list(range(len(LRS) - 1)),
                                                              list(LRS))
    opt = LARS(sched, momentum=0.9, weight_decay=WD, trust_coefficient=0.001)
    for s in range(len(LRS)):
        opt.apply([off[f"lars.gw{s}"], off[f"lars.gb{s}"]], [w, b])
        rep.add(f"(3) LARS {name} lr, step {s + 1} (lr {LRS[s]}): LARS-adapted weight", w.numpy(),
                off[f"lars.w{s + 1}"], 1e-5)
        rep.add(f"(3) LARS {name} lr, step {s + 1} (lr {LRS[s]}): excluded bias", b.numpy(),
                off[f"lars.b{s + 1}"], 1e-5)


def tfssl_main(seed):
    sys.path.insert(0, cs.REPO)
    with tempfile.TemporaryDirectory() as tmp:
        off = cs.run_official(__file__, os.path.join(tmp, "o.npz"), ["--seed", str(seed)])
    import keras
    import tensorflow as tf
    from tfssl.methods.paws import PAWS
    from tfssl.ops import paws as paws_ops
    rep = cs.Report("PAWS: tfssl vs official (CIFAR-10 loss config)")
    n_sup = SVIEWS * C * PER_CLASS
    n = len(off["h"])
    enc = keras.Sequential([keras.Input((1,)), keras.layers.Embedding(n, D), keras.layers.Flatten()])
    model = PAWS(enc, classes_per_batch=C, imgs_per_class=PER_CLASS, label_smoothing=SMOOTH,
                 proj_hidden=8, proj_dim=D, temperature=TAU, sharpen_t=T, me_max=True)
    model.encoder.input_spec = None  # PAWS relaxes it to images; the table takes ids
    model.encoder.set_weights([off["z"]])  # the table of z: its gradient is dL/dz
    H = tf.constant(off["h"])

    def embed(x, training=True):
        return tf.gather(H, tf.cast(x[:, 0], tf.int32)), model.encoder(x)
    model.embed = embed
    grads = []
    opt = keras.optimizers.SGD(0.0)
    real = opt.apply

    def apply(g, v):
        grads.append(tf.convert_to_tensor(g[0]).numpy())
        return real(g, v)
    opt.apply = apply
    seen = {}
    real_ce = paws_ops.paws_cross_entropy

    def spy(t, p):
        seen["targets"] = t.numpy()
        return real_ce(t, p)
    paws_ops.paws_cross_entropy = spy
    ix = lambda a, b: np.arange(a, b, dtype=np.float32)[:, None]
    per = C * PER_CLASS
    cls = np.tile(np.arange(C), PER_CLASS)
    data = {"labeled": {"view_0": ix(0, per), "view_1": ix(per, 2 * per), "label": cls},
            "unlabeled": {"global_0": ix(n_sup, n_sup + UB), "global_1": ix(n_sup + UB, n_sup + 2 * UB),
                          **{f"local_{i}": ix(n_sup + (2 + i) * UB, n_sup + (3 + i) * UB)
                             for i in range(LOCAL)}}}
    try:
        model.compile(optimizer=opt, run_eagerly=True)
        logs = model.train_on_batch(data, return_dict=True)
    finally:
        paws_ops.paws_cross_entropy = real_ce
    rep.add("(1) support label matrix [V m, C']", model.support_label_matrix(SVIEWS), off["labels"], 0)
    rep.add("(1) L_paws", logs["loss_paws"], off["loss_paws"])
    rep.add("(1) L_me (ME-MAX)", logs["loss_me"], off["loss_me"])
    rep.add("(1) L total", logs["loss"], off["loss_paws"] + off["loss_me"])
    rep.add("(1) dL/dz (supports and anchors)", grads[0], off["grad_z"])
    # official targets, recomputed with the official rule on the same h, for the target row check
    rep.note("(2) state", "PAWS has no queue/bank: nothing carried between steps")
    ours_lars(off, rep)
    rep.print()
    return rep, seen


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--official-half", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.official_half:
        official_main(a.seed)
    else:
        tfssl_main(a.seed)
