"""Parity of tfssl's ASCL (kinds ascl, ahcl, hard) with the official code.

Official: MrChenFeng/Adaptive-Soft-Contrastive-Learning_ICPR2022 @ 6de9b3d7,
model.py::ASCL._forward_moco (soft labels model.py:183-218, loss :222-229,
enqueue :132-144, momentum update :124-129, split BN :10-30).

Run (tfssl's Python; it launches the official half in the torch venv itself):
    python3 benchmarks/parity/ascl.py [--kinds ascl,ahcl,hard] [--no-step]
Venv and trees: see benchmarks/parity/common_self.py (PARITY_TORCH_PY, PARITY_SRC).

Compares, kind by kind:
 (1) targets y and loss from identical embeddings q, k and queue (networks
     replaced by lookup tables on both sides; the official soft labels are read
     back from the gradient of its loss wrt its logits: y = softmax(z) - N dL/dz);
 (2) queue rows, queue labels and pointer after the step;
 (3) (kind ascl) two SGD steps of ResNet-18 with the CIFAR stem (official
     ModelBase: torchvision resnet18, SplitBatchNorm 8 splits; ours
     backbones.resnet(18, cifar_stem) with norm=ghost_batch), weights copied from
     torch: loss, per-layer grad norms, weights, BN statistics of the online and
     key encoders, key-encoder parameters, queue. Variants: torch's symmetric
     stride-2 padding (official, as is; ours with padding="torch", tfssl's default
     for ResNets) and torch patched to TF "same" padding (ours padding="tf");
     tfpad_wd / tfpad64_wd: weight decay 5e-4 (official coupled, every parameter)
     against ours with tfssl.optimizers.SGD coupled, nothing excluded (the recipe's
     --weight_decay_form=coupled --weight_decay_exclude=), and tfpad_wd against
     Keras's decoupled weight_decay too (row label "keras-decoupled").
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common_self as cs  # noqa: E402

B, DIM, QSIZE, T1, T2, M = 16, 32, 64, 0.1, 0.05, 0.99
# (tag, TF padding patched into torch, weight decay, official run in float64)
STEP_VARIANTS = (("torchpad", False, 0.0, False), ("tfpad", True, 0.0, False),
                 ("tfpad64", True, 0.0, True), ("tfpad_wd", True, 5e-4, False),
                 ("tfpad64_wd", True, 5e-4, True))
if os.environ.get("PARITY_STEP_VARIANTS"):  # e.g. "tfpad,tfpad64": run only these
    STEP_VARIANTS = tuple(v for v in STEP_VARIANTS
                          if v[0] in os.environ["PARITY_STEP_VARIANTS"].split(","))
OFFICIAL_KIND = {"ascl": "ascl", "ahcl": "ahcl", "hard": "hard", "moco": "normal"}


# =============================================================== official half
def _table_module(torch, table):
    class Table(torch.nn.Module):
        """Stands in for an encoder: row x[:, 0] of a fixed embedding table."""

        def forward(self, x, feat=False):
            return table[x[:, 0].long()]
    return Table()


def _capture_F(model_mod, torch):
    """Wraps model.py's `F` so the calls to softmax / log_softmax are recorded."""
    real = torch.nn.functional
    rec = {"softmax": [], "log_softmax": []}

    class Proxy:
        def __getattr__(self, name):
            return getattr(real, name)

        def softmax(self, x, *a, **k):
            out = real.softmax(x, *a, **k)
            rec["softmax"].append(out.detach().clone())
            return out

        def log_softmax(self, x, *a, **k):
            if x.requires_grad:
                x.retain_grad()
            rec["log_softmax"].append(x)
            return real.log_softmax(x, *a, **k)
    model_mod.F = Proxy()
    return rec


def official_targets(torch, model_mod, kind, nn_num, seed, byol=False):
    """Part (1)/(2): the official forward on lookup-table encoders."""
    g = torch.Generator().manual_seed(seed)
    q_raw = torch.randn(B, DIM if not byol else 128, generator=g)
    k_raw = torch.randn(B, q_raw.shape[1], generator=g)
    if not byol:  # keys near some queue rows, so that d is peaked for some samples
        pass
    targets = torch.randint(0, 10, (B,), generator=g)
    net = model_mod.ASCL(dataset="cifar10", model="byol" if byol else "moco", dim=q_raw.shape[1],
                         mem_size=QSIZE, m=M, T1=T1, T2=T2, arch="resnet18",
                         type=OFFICIAL_KIND.get(kind, kind), nn_num=nn_num)
    q_leaf = q_raw.clone().requires_grad_(True)
    net.encoder_q = _table_module(torch, q_leaf)
    net.encoder_k = _table_module(torch, k_raw)
    if byol:
        net.predictor = torch.nn.Identity()  # part (1) compares the loss math only
    queue0 = net.queue.clone()
    rec = _capture_F(model_mod, torch)
    idx = torch.arange(B, dtype=torch.float32)[:, None]
    loss = net(idx, idx, targets)
    out = {"q_raw": q_raw.numpy(), "k_raw": k_raw.numpy(), "targets": targets.numpy(),
           "queue0": queue0.t().numpy()}
    if byol:
        loss_vec = loss.detach().numpy()
        loss = loss.mean()  # the official returns [N]; main_simple.py:79-82 backward()s it as is
        out["loss_vec"] = loss_vec
    loss.backward()
    out.update(loss=loss.item(), grad_q=q_leaf.grad.numpy(), queue1=net.queue.t().numpy(),
               labels1=net.labels.numpy(), ptr1=int(net.queue_ptr[0]))
    if not byol:
        z = rec["log_softmax"][-1]
        out["logits"] = z.detach().numpy()
        out["y"] = (torch.softmax(z, 1) - B * z.grad).detach().numpy()
        if rec["softmax"]:
            out["d"] = rec["softmax"][0].numpy()
    else:
        if rec["softmax"]:
            out["d"] = rec["softmax"][0].numpy()
    model_mod.F = torch.nn.functional
    return out


def tf_same_padding(torch, net):
    """Replaces every stride-2 3x3 conv (padding 1) by pad (0,1,0,1) + conv(padding 0):
    TensorFlow's 'same' padding for even inputs."""
    nn = torch.nn

    class PadConv(nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv
            conv.padding = (0, 0)

        def forward(self, x):
            return self.conv(nn.functional.pad(x, (0, 1, 0, 1)))

    for name, mod in list(net.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Conv2d) and child.stride == (2, 2) and child.kernel_size == (3, 3):
                setattr(mod, cname, PadConv(child))


def _param_state(torch, module):
    """state_dict with the PadConv wrapper's '.conv' removed from names."""
    return {k.replace(".conv.", "."): v for k, v in cs.torch_state(module).items()}


def official_step(torch, model_mod, kind, tf_pad, wd, steps=2, byol=False, seed=1, f64=False):
    """Part (3): `steps` official training steps (main_simple.py:71-83) on ResNet-18
    (``f64``: the same in float64, the float32 noise floor's reference)."""
    torch.manual_seed(seed)
    net = model_mod.ASCL(dataset="cifar10", model="byol" if byol else "moco", dim=128,
                         mem_size=QSIZE, m=M, T1=T1, T2=T2, arch="resnet18",
                         type=OFFICIAL_KIND.get(kind, kind), nn_num=1)
    if tf_pad:
        tf_same_padding(torch, net.encoder_q)
        tf_same_padding(torch, net.encoder_k)
    net.train()
    if f64:  # same float32 initial values, then everything in float64
        net.double()
        torch.set_default_dtype(torch.float64)
    opt = torch.optim.SGD(net.parameters(), lr=0.03, weight_decay=wd, momentum=0.9)
    out = {"queue0": net.queue.t().numpy().copy()}
    for k, v in _param_state(torch, net).items():
        out["init." + k] = v.copy()
    shuffles = []
    real_shuffle = net._batch_shuffle_single_gpu

    def shuffle(x):
        xs, unshuf = real_shuffle(x)
        shuffles.append(torch.argsort(unshuf).numpy())
        return xs, unshuf
    net._batch_shuffle_single_gpu = shuffle
    g = torch.Generator().manual_seed(seed + 100)
    for s in range(steps):
        im_q = torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float32)
        im_k = torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float32) * 0.5 + 0.2
        if f64:
            im_q, im_k = im_q.double(), im_k.double()
        tg = torch.randint(0, 10, (B,), generator=g)
        out[f"s{s}.im_q"], out[f"s{s}.im_k"], out[f"s{s}.targets"] = im_q.numpy(), im_k.numpy(), tg.numpy()
        loss = net(im_q, im_k, tg)
        if byol:
            loss = loss.mean()
        opt.zero_grad()
        loss.backward()
        out[f"s{s}.loss"] = loss.item()
        for k, p in net.named_parameters():
            if p.grad is not None:
                out[f"s{s}.grad." + k.replace(".conv.", ".")] = p.grad.numpy().copy()
        opt.step()
        for k, v in _param_state(torch, net).items():
            out[f"s{s}.after." + k] = v.copy()
        out[f"s{s}.queue"] = net.queue.t().numpy().copy()
        out[f"s{s}.ptr"] = int(net.queue_ptr[0])
        if not byol:
            out[f"s{s}.shuffle"] = shuffles[-1]
    # What the next step does first (model.py:169): the key encoder our step already holds.
    with torch.no_grad():
        net._momentum_update_key_encoder()
    for k, v in _param_state(torch, net.encoder_k).items():
        out["next_key." + k] = v.copy()
    torch.set_default_dtype(torch.float32)
    return out


def official_backbone(torch, model_mod):
    """(3b) The official ModelBase backbone alone (TF padding patched, split BN, train
    mode) in float64: output and parameter gradients of sum(out * G)."""
    torch.manual_seed(3)
    net = model_mod.ModelBase(dataset="cifar10", projection_dim=128, arch="resnet18")
    tf_same_padding(torch, net)
    net.double().train()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64)
    y = net.net(x)
    G = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y * G).sum().backward()
    out = {"bb.x": x.numpy(), "bb.y": y.detach().numpy(), "bb.G": G.numpy()}
    for k, v in _param_state(torch, net).items():
        out["bb.init." + k] = v
    for k, p in net.named_parameters():
        if p.grad is not None:
            out["bb.grad." + k.replace(".conv.", ".")] = p.grad.numpy()
    return out


def ours_backbone(off, rep):
    import keras
    import tensorflow as tf
    from tfssl.models import backbones
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        # the official half of (3b) is patched to TF padding
        bb = backbones.resnet(18, (32, 32, 3), cifar_stem=True, norm="ghost_batch",
                              padding="tf")
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")
    init = {k[len("bb.init."):]: v for k, v in off.items() if k.startswith("bb.init.")}
    maps = {}
    for t, o in cs.resnet_name_map(seq_prefix="net.").items():
        try:
            maps[t] = bb.get_layer(o)
        except ValueError:
            pass
    for t, layer in maps.items():
        cs.set_keras_layer(layer, init, t)
    P = _strided_groups(B)
    x = tf.constant(off["bb.x"].transpose(0, 2, 3, 1)[P])
    with tf.GradientTape() as tape:
        y = bb(x, training=True)
        loss = tf.reduce_sum(y * off["bb.G"][P])
    grads = tape.gradient(loss, bb.trainable_variables)
    g = cs.keras_grads_by_layer(maps, bb.trainable_variables, grads)
    worst = max((_rel_l2(v, off["bb.grad." + k]), k) for k, v in g.items())
    rep.add("(3b) backbone alone, float64: features", y.numpy(), off["bb.y"][P], 1e-12)
    rep.add(f"(3b) backbone alone, float64: {len(g)} param grads, worst rel L2 ({worst[1]})",
            worst[0], 0.0, 1e-12, atol_floor=1.0)


def official_main(kinds, do_step, byol=False):
    torch = cs.setup_torch(0)
    cs.official_tree("ascl", "model.py")
    import model as model_mod  # official ASCL model.py
    out = {}
    if do_step and not byol:
        out.update(official_backbone(torch, model_mod))
    for kind in kinds:
        for nn_num in (1, 3):
            for k, v in official_targets(torch, model_mod, kind, nn_num, seed=nn_num,
                                         byol=byol).items():
                out[f"t.{kind}.{nn_num}.{k}"] = v
    if do_step:
        kind = kinds[0]
        for tag, tf_pad, wd, f64 in STEP_VARIANTS:
            for k, v in official_step(torch, model_mod, kind, tf_pad, wd, byol=byol,
                                      f64=f64).items():
                out[f"{tag}.{k}"] = v
    np.savez(cs.official_out(), **out)


# ================================================================= tfssl half
def _strided_groups(n, groups=8):
    """P with x[P] contiguous groups == SplitBatchNorm's strided groups (n % groups)."""
    return np.concatenate([np.arange(j, n, groups) for j in range(groups)])


class _FixedShuffle:
    """Makes tf.random.stateless_uniform (as used by ASCL._keys, eager) yield values
    whose argsort is a given permutation: the official shuffle, regrouped."""

    def __init__(self, tf):
        self.tf, self.real, self.perms = tf, tf.random.stateless_uniform, []

    def __enter__(self):
        tf = self.tf

        def fake(shape, seed, *a, **k):
            perm = self.perms.pop(0)
            u = np.empty(len(perm), np.float32)
            u[perm] = np.arange(len(perm), dtype=np.float32) / len(perm)
            return tf.constant(u)
        tf.random.stateless_uniform = fake
        return self

    def __exit__(self, *exc):
        self.tf.random.stateless_uniform = self.real


def ours_targets(off, kind, nn_num, rep, byol=False):
    import keras
    import tensorflow as tf
    from tfssl.methods import ascl as ascl_mod
    p = f"t.{kind}.{nn_num}."
    q_raw, k_raw = off[p + "q_raw"], off[p + "k_raw"]
    d = q_raw.shape[1]
    # The online encoder is an embedding table holding q (so dL/dq is its gradient),
    # the key encoder one holding k; projectors are the identity.
    enc = keras.Sequential([keras.Input((1,)), keras.layers.Embedding(B, d), keras.layers.Flatten()])
    kw = dict(queue_size=QSIZE, kind=kind, num_neighbours=nn_num, proj_dims=(d,),
              t1=T1, t2=T2, momentum=M)
    model = (ascl_mod.ASCLBYOL if byol else ascl_mod.ASCL)(enc, **kw)
    model.queue.assign(off[p + "queue0"])
    model.encoder.set_weights([q_raw])
    model.key_encoder.set_weights([k_raw])
    ident = lambda x, training=False: x
    model.projector = model.key_projector = ident
    if byol:
        model.predictor = ident  # as the official half (Identity)
    grads = []
    opt = keras.optimizers.SGD(0.0)
    real_apply = opt.apply

    def apply(g, v):
        grads.append(tf.convert_to_tensor(g[0]).numpy())
        return real_apply(g, v)
    opt.apply = apply
    seen = {}
    real = ascl_mod.targets.ascl_soft_labels

    def spy(d, kind_, k):
        y = real(d, kind_, k)
        seen["d"], seen["y"] = d.numpy(), y.numpy()
        return y
    ascl_mod.targets.ascl_soft_labels = spy
    try:
        model.compile(optimizer=opt, run_eagerly=True)
        idx = np.arange(B, dtype=np.float32)[:, None]
        logs = model.train_on_batch({"unlabeled": {"query": idx, "key": idx,
                                                   "label": off[p + "targets"]}}, return_dict=True)
    finally:
        ascl_mod.targets.ascl_soft_labels = real
    tag = f"{'byol ' if byol else ''}{kind} K={nn_num}"
    if (p + "y") in off:
        rep.add(f"(1) {tag}: targets y [B,1+Q]", seen["y"], off[p + "y"], 1e-5)
    if (p + "d") in off and "d" in seen:
        rep.add(f"(1) {tag}: teacher d", seen["d"], off[p + "d"], 1e-5)
    rep.add(f"(1) {tag}: loss", logs["loss"], off[p + "loss"], 1e-5)
    rep.add(f"(1) {tag}: dL/dq (raw embedding)", grads[0], off[p + "grad_q"], 1e-5)
    rep.add(f"(2) {tag}: queue rows after", model.queue.numpy(), off[p + "queue1"], 1e-6)
    rep.add(f"(2) {tag}: queue labels after", model.queue_labels.numpy(), off[p + "labels1"], 0)
    rep.add(f"(2) {tag}: pointer after", int(model.queue_pointer.numpy()), off[p + "ptr1"], 0)
    return seen


def _build_ours(kind, byol=False, wd=0.0, wd_form="coupled", padding="torch"):
    """``wd`` > 0: ``wd_form`` "coupled" is tfssl.optimizers.SGD with no variable
    excluded (what flags/ascl_cifar10.cfg builds: --weight_decay_form=coupled
    --weight_decay_exclude=, as the official SGD(model.parameters(), wd)); "decoupled"
    is Keras's own SGD weight_decay (the f8a35f9 comparison, D3)."""
    import keras
    from tfssl import optimizers as tfssl_opt
    from tfssl.methods import ascl as ascl_mod
    from tfssl.models import backbones
    bb = backbones.resnet(18, (32, 32, 3), cifar_stem=True, norm="ghost_batch",
                          padding=padding)
    cls = ascl_mod.ASCLBYOL if byol else ascl_mod.ASCL
    model = cls(bb, queue_size=QSIZE, kind=kind, num_neighbours=1, proj_dims=(2048, 128),
                t1=T1, t2=T2, momentum=M)
    if wd and wd_form == "coupled":
        opt = tfssl_opt.SGD(0.03, momentum=0.9, weight_decay=wd, exclude=())
    else:
        opt = keras.optimizers.SGD(0.03, momentum=0.9, weight_decay=wd or None)
    model.compile(optimizer=opt, run_eagerly=True)
    return model


def _layer_maps(model, byol=False):
    """{torch prefix: keras layer} for online and key networks."""
    nm = cs.resnet_name_map(seq_prefix="")
    maps = {}
    for tnet, enc, proj in (("encoder_q.", model.encoder, model.projector),
                            ("encoder_k.", model.key_encoder, model.key_projector)):
        for t, o in nm.items():
            try:
                maps[tnet + "net." + t] = enc.get_layer(o)
            except ValueError:
                pass
        maps[tnet + "projector.0"] = proj.get_layer("dense0")
        maps[tnet + "projector.2"] = proj.get_layer("dense1")
    if byol:
        maps["predictor.0"] = model.predictor.get_layer("dense0")
        maps["predictor.1"] = model.predictor.get_layer("bn0")
        maps["predictor.3"] = model.predictor.get_layer("dense1")
    return maps


def ours_step(off, tag, kind, rep, byol=False, wd=0.0, steps=2, f64=False, label=None,
              wd_form="coupled"):
    """``f64``: our networks in float64 (keras floatx; the method's heads and loss
    stay float32, as _project casts), to separate float32 noise from differences."""
    import keras
    import tensorflow as tf
    p = tag + "."
    # floatx alone is not enough once Keras has a global dtype policy: set both
    keras.config.set_floatx("float64" if f64 else "float32")
    keras.config.set_dtype_policy("float64" if f64 else "float32")
    try:
        # ours pads as the official half of this variant: "torchpad" is the official
        # network as is (tfssl's default for ResNets since D1 was fixed), the rest
        # are patched to TF "same" padding
        model = _build_ours(kind, byol, wd, wd_form,
                            padding="torch" if tag.startswith("torchpad") else "tf")
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")
    dt = np.float64 if f64 else np.float32
    tag = label or tag
    maps = _layer_maps(model, byol)
    init = {k[len(p) + 5:]: v for k, v in off.items() if k.startswith(p + "init.")}
    for tp, layer in maps.items():
        cs.set_keras_layer(layer, init, tp)
    model.queue.assign(off[p + "queue0"])
    P = _strided_groups(B)
    Pinv = np.argsort(P)
    grads_seen = []
    real_apply = model.optimizer.apply

    def apply(grads, variables):
        grads_seen.append([None if g is None else np.asarray(g) for g in grads])
        return real_apply(grads, variables)
    model.optimizer.apply = apply
    for s in range(steps):
        q = off[f"{p}s{s}.im_q"].transpose(0, 2, 3, 1)[P].astype(dt)
        k = off[f"{p}s{s}.im_k"].transpose(0, 2, 3, 1)[P].astype(dt)
        lab = off[f"{p}s{s}.targets"][P]
        with _FixedShuffle(tf) as fs:
            if not byol:
                idx = off[f"{p}s{s}.shuffle"]  # official x_k[idx], groups n % 8
                fs.perms.append(Pinv[idx[P]])  # ours: (x_k[P])[perm] contiguous groups, same members
            else:  # official BYOL does not shuffle keys: strided groups of x_k itself
                fs.perms.append(np.arange(B))
            logs = model.train_on_batch({"unlabeled": {"query": q, "key": k, "label": lab}},
                                        return_dict=True)
        rep.add(f"(3) {tag} step {s + 1}: loss", logs["loss"], off[f"{p}s{s}.loss"], 1e-5)
        g_ours = cs.keras_grads_by_layer(maps, model.trainable_variables, grads_seen[-1])
        worst, worst_el, n = (0.0, ""), (0.0, ""), 0
        for name, g in g_ours.items():
            theirs = off.get(f"{p}s{s}.grad.{name}")
            if theirs is None:
                continue
            n += 1
            a, b = np.linalg.norm(g), np.linalg.norm(theirs)
            worst = max(worst, (abs(a - b) / max(b, 1e-12), name))
            worst_el = max(worst_el, (_rel_l2(g, theirs), name))
        rep.add(f"(3) {tag} step {s + 1}: per-layer grad norms ({n} tensors), worst rel ({worst[1]})",
                worst[0], 0.0, 1e-4, atol_floor=1.0)
        rep.add(f"(3) {tag} step {s + 1}: grads, worst per-tensor ||d||/||g|| ({worst_el[1]})",
                worst_el[0], 0.0, 1e-4, atol_floor=1.0)
        prev = f"{p}init." if s == 0 else f"{p}s{s - 1}.after."
        _compare_weights(rep, f"(3) {tag} step {s + 1}", maps, off, f"{p}s{s}.after.", byol, prev)
        qrows = model.queue.numpy()
        # our queue holds the step's keys in our batch order x[P]
        want = off[f"{p}s{s}.queue"].copy()
        for w in range(min(s + 1, QSIZE // B)):
            want[w * B:(w + 1) * B] = want[w * B:(w + 1) * B][P]
        rep.add(f"(3) {tag} step {s + 1}: queue (rows reordered by P)", qrows, want, 1e-4)
        rep.add(f"(3) {tag} step {s + 1}: pointer", int(model.queue_pointer.numpy()),
                off[f"{p}s{s}.ptr"], 0)
    # key encoder parameters: ours updates after the step, the official before the next
    key_only = {k: v for k, v in maps.items() if k.startswith("encoder_k.")}
    worst = (0.0, "")
    for tp, layer in key_only.items():
        ours = cs.keras_layer_values(layer)
        for attr in ("weight", "bias"):
            t = off.get(f"{p}next_key.{tp[len('encoder_k.'):]}.{attr}")
            if t is None or attr not in ours:
                continue
            worst = max(worst, (_rel_l2(ours[attr], t), tp + "." + attr))
    rep.add(f"(3) {tag}: key-encoder params after {steps} steps vs official after its next "
            f"momentum update, worst per-tensor ||d||/||w|| ({worst[1]})", worst[0], 0.0, 1e-4,
            atol_floor=1.0)
    return model


def float_floor(off, rep, a="tfpad", b="tfpad64", steps=2):
    """The official float32 step against the same step in float64: the noise floor."""
    for s in range(steps):
        rep.add(f"(3) floor: official f32 vs f64, step {s + 1} loss", off[f"{a}.s{s}.loss"],
                off[f"{b}.s{s}.loss"], 1e-5)
        prev = "init." if s == 0 else f"s{s - 1}.after."
        for what, pre in (("grads", "grad."), ("weights", "after."), ("updates", "after."),
                          ("BN running stats", "after.")):
            worst = (0.0, "")
            for k in off:
                if not k.startswith(f"{a}.s{s}.{pre}") or "num_batches" in k:
                    continue
                if ("running" in k) != (what == "BN running stats"):
                    continue
                name = k.split(pre, 1)[1]
                t = off[k.replace(a + ".", b + ".", 1)]
                x = off[k]
                if what == "updates":
                    if name.startswith("encoder_k."):
                        continue  # the key encoder moves by momentum only
                    x, t = x - off[f"{a}.{prev}{name}"], t - off[f"{b}.{prev}{name}"]
                worst = max(worst, (_rel_l2(x, t), name))
            rep.add(f"(3) floor: official f32 vs f64, step {s + 1} {what}, worst per-tensor "
                    f"rel L2 ({worst[1]})", worst[0], 0.0, 1e-4, atol_floor=1.0)


def _rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _compare_weights(rep, what, maps, off, prefix, byol, prev):
    """Per-tensor relative L2 errors (worst tensor named) of the online weights, of
    their updates (w_after - w_before, each side its own before), and of the BN
    moving statistics of the online and key networks."""
    worst = {k: (0.0, "") for k in ("param", "update", "running_mean", "running_var")}
    for tp, layer in maps.items():
        ours = cs.keras_layer_values(layer)
        for attr, v in ours.items():
            t = off.get(f"{prefix}{tp}.{attr}")
            if t is None:
                continue
            key = attr if attr.startswith("running") else "param"
            if key == "param" and tp.startswith("encoder_k."):
                continue  # compared separately (update order)
            worst[key] = max(worst[key], (_rel_l2(v, t), f"{tp}.{attr}"))
            if key == "param":
                before = off[f"{prev}{tp}.{attr}"]
                worst["update"] = max(worst["update"], (_rel_l2(v - before, t - before),
                                                        f"{tp}.{attr}"))
    rep.add(f"{what}: online weights after SGD, worst ||d||/||w|| ({worst['param'][1]})",
            worst["param"][0], 0.0, 1e-4, atol_floor=1.0)
    rep.add(f"{what}: online updates dw, worst ||d||/||dw|| ({worst['update'][1]})",
            worst["update"][0], 0.0, 1e-3, atol_floor=1.0)
    for key in ("running_mean", "running_var"):
        rep.add(f"{what}: BN {key} (online + key), worst rel L2 ({worst[key][1]})",
                worst[key][0], 0.0, 1e-4, atol_floor=1.0)


def tfssl_main(kinds, do_step, script, byol=False, title="ASCL"):
    sys.path.insert(0, cs.REPO)
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--kinds", ",".join(kinds)] + ([] if do_step else ["--no-step"])
        off = cs.run_official(script, os.path.join(tmp, "official.npz"), extra)
    rep = cs.Report(f"{title}: tfssl vs official ({', '.join(kinds)})")
    for kind in kinds:
        for nn_num in (1, 3):
            ours_targets(off, kind, nn_num, rep, byol=byol)
    if do_step:
        for tag, _, wd, _ in STEP_VARIANTS:
            ours_step(off, tag, kinds[0], rep, byol=byol, wd=wd)
        names = [v[0] for v in STEP_VARIANTS]
        if "tfpad_wd" in names:  # the same official run against Keras's decoupled decay (D3)
            wd = dict((v[0], v[2]) for v in STEP_VARIANTS)["tfpad_wd"]
            ours_step(off, "tfpad_wd", kinds[0], rep, byol=byol, wd=wd,
                      wd_form="decoupled", label="tfpad_wd keras-decoupled")
        if "tfpad64" in names:
            ours_step(off, "tfpad64", kinds[0], rep, byol=byol, f64=True,
                      label="ours-f64 vs tfpad64")
        if "tfpad64_wd" in names:  # coupled decay without the float32 noise of D2
            ours_step(off, "tfpad64_wd", kinds[0], rep, byol=byol, f64=True,
                      wd=dict((v[0], v[2]) for v in STEP_VARIANTS)["tfpad64_wd"],
                      label="ours-f64 vs tfpad64_wd")
        if "tfpad" in names and "tfpad64" in names:
            float_floor(off, rep)
        if not byol:
            ours_backbone(off, rep)
    rep.print()
    return rep


def main(default_kinds=("ascl", "ahcl", "hard"), byol=False, title="ASCL", script=__file__):
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default=",".join(default_kinds))
    ap.add_argument("--no-step", action="store_true")
    ap.add_argument("--official-half", default=None)
    a = ap.parse_args()
    kinds = a.kinds.split(",")
    if a.official_half:
        official_main(kinds, not a.no_step, byol=byol)
    else:
        tfssl_main(kinds, not a.no_step, script, byol=byol, title=title)


if __name__ == "__main__":
    main()
