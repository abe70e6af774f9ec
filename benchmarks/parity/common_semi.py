"""Shared glue of the semi-supervised parity scripts (simmatch, fixmatch, mixmatch).

Each script runs in two halves, in two interpreters:

* the OFFICIAL half runs in a PyTorch venv (``$PARITY_TORCH_PY``, default
  ``/work/anchor/venv/bin/python``; build it with
  ``/work/shared/anchor-bench/setup.sh``, or ``python -m venv V && V/bin/pip install
  torch torchvision 'ruamel.yaml<0.18' timm==0.6.13 'transformers<5' scikit-learn``).
  It imports USB (microsoft/Semi-supervised-learning) from ``$USB_SRC`` (default
  ``/work/anchor/src/usb``, an unpacked checkout of commit
  1ef4cbebcc0b368158315aeb425053858cf6c845), builds the official algorithm object from
  its own CIFAR-10 config, runs ONE step of ``AlgorithmBase.train``'s loop body
  (``train_step`` + the ``after_train_step`` hooks: backward, SGD, EMA) and dumps
  inputs, initial weights and state, the recorded targets, losses, gradients and the
  weights / BN statistics / bank / DA queue after the step to an ``.npz``;
* the OURS half runs in the main Python (tensorflow + tfssl, no torch): it loads the
  same inputs and weights into the tfssl method, runs ``train_step`` once, and
  prints the max absolute and relative difference of every quantity.

``python benchmarks/parity/<method>.py`` (main Python) runs both halves.

Networks: ``tiny`` is a small net both sides build identically (flatten -> Dense ->
ReLU -> features -> classifier; no BN), so that targets and losses are compared
given identical network outputs. ``wrn`` is USB's WRN-28-2 with its weights copied
into tfssl's ``wide_resnet``. tfssl's WRN follows the official TF
(google-research) WRN, which differs from USB's PyTorch port in four places (see
``USB_WRN_PATCHES``); the ``wrn`` step runs USB's model with those four patched to
the TF form (so the network computes the same function on both sides), and the
unpatched USB forward is measured against ours separately.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_PY = os.environ.get("PARITY_TORCH_PY", "/work/anchor/venv/bin/python")
USB_SRC = os.environ.get("USB_SRC", "/work/anchor/src/usb")
TFSSL_SRC = os.environ.get("TFSSL_SRC", os.path.dirname(os.path.dirname(HERE)))
USB_COMMIT = "1ef4cbebcc0b368158315aeb425053858cf6c845"
CONFIGS = {"simmatch": "config/classic_cv/simmatch/simmatch_cifar10_40_0.yaml",
           "fixmatch": "config/classic_cv/fixmatch/fixmatch_cifar10_40_0.yaml",
           "mixmatch": "config/classic_cv/mixmatch/mixmatch_cifar10_40_0.yaml"}
USB_WRN_PATCHES = (
    "conv1_on_activated: USB semilearn/nets/wrn/wrn.py:48-52 feeds the RAW block input to "
    "conv1 in the first block of stages 2-3 (bn1/relu1 output unused); TF (and tfssl) feed "
    "the activated input",
    "tf_same_padding: USB pads the stride-2 3x3 convs by 1 on each side (wrn.py:36); TF "
    "'same' pads 0 before, 1 after",
    "bn_eps_1e-3: USB's block BNs use eps 1e-5 (wrn.py:33,37; only the final BN has 1e-3, "
    "wrn.py:97); tfssl uses 1e-3 everywhere (the TF official value)",
    "stem_bias_zero: USB's stem conv has a bias (wrn.py:85, bias=True); tfssl's has none. "
    "The next layer is a train-mode BN on every path, which cancels it exactly; only that "
    "BN's running mean sees it",
)


# ---------------------------------------------------------------- checks
def check_setup():
    """Fail with a clear message when the venv or the official tree is missing."""
    if not os.path.exists(TORCH_PY):
        sys.exit(f"PyTorch venv missing: {TORCH_PY} does not exist. Build it (see the "
                 "docstring of benchmarks/parity/common_semi.py) or set $PARITY_TORCH_PY.")
    probe = os.path.join(USB_SRC, "semilearn", "algorithms", "simmatch", "simmatch.py")
    if not os.path.exists(probe):
        sys.exit(f"USB source tree missing: {probe} not found. Unpack microsoft/"
                 f"Semi-supervised-learning at {USB_COMMIT} there or set $USB_SRC.")


def usb_commit():
    try:
        return subprocess.run(["git", "-C", USB_SRC, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return f"{USB_COMMIT} (pinned; tree has no .git)"


def run_official(script, out, extra):
    cmd = [TORCH_PY, script, "--half", "official", "--out", out] + extra
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.stderr.write(r.stdout + r.stderr)
        sys.exit(f"official half failed: {' '.join(cmd)}")
    return r.stdout


def parser(doc):
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--half", choices=["both", "official", "ours"], default="both")
    p.add_argument("--out", default=None)
    p.add_argument("--net", choices=["tiny", "wrn"], default="tiny")
    p.add_argument("--wd", type=float, default=0.0, help="official SGD weight decay")
    p.add_argument("--case", default="filled", help="method-specific state case")
    p.add_argument("--json", default=None, help="append the result rows here")
    p.add_argument("--f64", action="store_true", help="(official half) run in float64")
    p.add_argument("--init", default=None,
                   help="(official half) start from the initial weights w0/ of this .npz")
    p.add_argument("--ref64", action="store_true",
                   help="also run the official step in float64, the reference for the "
                        "float32 error of both sides")
    return p


# ------------------------------------------------------- reporting (ours)
class Report:
    """Rows of (quantity, max abs diff, max rel diff, tolerance, ok)."""

    def __init__(self, title):
        self.title, self.rows = title, []

    def add(self, name, official, ours, tol, note=""):
        a = np.asarray(official, np.float64)
        b = np.asarray(ours, np.float64)
        if a.shape != b.shape:
            if a.size == b.size:
                b = b.reshape(a.shape)
            else:
                raise ValueError(f"{name}: shapes {a.shape} vs {b.shape}")
        d = np.abs(a - b)
        mad = float(d.max()) if d.size else 0.0
        scale = float(np.abs(a).max()) if a.size else 0.0
        rel = mad / scale if scale > 0 else mad
        ok = rel <= tol or mad <= tol * 1e-3
        self.rows.append(dict(name=name, max_abs=mad, max_rel=rel, tol=tol, ok=bool(ok),
                              official_max=scale, note=note))
        return ok

    def show(self):
        print(f"\n== {self.title}")
        print(f"{'quantity':46s} {'max|off|':>10s} {'max abs':>10s} {'max rel':>10s} "
              f"{'tol':>7s}  ok")
        for r in self.rows:
            print(f"{r['name'][:46]:46s} {r['official_max']:10.3e} {r['max_abs']:10.3e} "
                  f"{r['max_rel']:10.3e} {r['tol']:7.0e}  {'yes' if r['ok'] else 'NO'}"
                  + (f"  ({r['note']})" if r['note'] else ""))

    def dump(self, path):
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"title": self.title, "rows": self.rows}) + "\n")


# ------------------------------------------------------ official half (torch)
def setup_torch(seed=0, f64=False):
    import torch
    torch.set_num_threads(1)
    if f64:  # a float64 reference run of the same official step
        torch.set_default_dtype(torch.float64)
    torch.manual_seed(seed)
    np.random.seed(seed)
    if not torch.cuda.is_available():  # official code calls .cuda() on new tensors
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.use_deterministic_algorithms(False)
    return torch


def _stub(names):
    import importlib.machinery
    import types
    for name in names:
        try:
            __import__(name)
        except Exception:
            m = types.ModuleType(name)
            m.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = m


def tiny_net_builder(image, feat_dim):
    """A USB-style net (``only_feat`` / ``only_fc`` / dict output) that both sides build
    identically: features = relu(W1 vec(x) + b1), logits = W2 features + b2, where
    vec flattens the image in HWC order (as Keras's Flatten does on NHWC)."""
    import torch
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self, num_classes, **unused):
            super().__init__()
            self.fc1 = nn.Linear(image * image * 3, feat_dim)
            self.classifier = nn.Linear(feat_dim, num_classes)
            self.num_features = feat_dim

        def forward(self, x, only_fc=False, only_feat=False, **unused):
            if only_fc:
                return self.classifier(x)
            feat = torch.relu(self.fc1(x.permute(0, 2, 3, 1).flatten(1)))
            if only_feat:
                return feat
            return {"logits": self.classifier(feat), "feat": feat}

        def no_weight_decay(self):
            return [n for n, _ in self.named_parameters() if "bias" in n]

    return lambda num_classes, **kw: Tiny(num_classes)


def patch_usb_wrn_tf_form():
    """USB's BasicBlock computing the TF-official (and tfssl) block: conv1 on the
    activated input, TF 'same' padding on stride 2 (0 before, 1 after)."""
    import torch.nn.functional as F
    from semilearn.nets.wrn import wrn

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        shortcut_in = o if (not self.equalInOut and self.activate_before_residual) else x
        s = self.conv1.stride[0]
        if s == 1:
            y = self.conv1(o)
        else:
            y = F.conv2d(F.pad(o, (0, 1, 0, 1)), self.conv1.weight, None, s, 0)
        y = self.relu2(self.bn2(y))
        y = self.conv2(y)
        return (shortcut_in if self.equalInOut else self.convShortcut(shortcut_in)) + y

    if not hasattr(wrn.BasicBlock, "_usb_forward"):
        wrn.BasicBlock._usb_forward = wrn.BasicBlock.forward
    wrn.BasicBlock.forward = forward


def build_usb(alg_name, net, overrides, image=32, feat_dim=16):
    """The official algorithm object from USB's own config, on one CPU process."""
    sys.path.insert(0, USB_SRC)
    _stub(["wandb", "aim", "torchaudio"])
    import train as usb_train
    from semilearn.algorithms import get_algorithm
    from semilearn.core import AlgorithmBase
    from semilearn.core.utils import get_net_builder
    argv = sys.argv
    sys.argv = ["train.py", "--c", os.path.join(USB_SRC, CONFIGS[alg_name])]
    try:
        args = usb_train.get_config()
    finally:
        sys.argv = argv
    args.gpu = None
    args.multiprocessing_distributed = False
    args.world_size = 1
    args.distributed = False
    for k, v in overrides.items():
        setattr(args, k, v)
    AlgorithmBase.set_dataset = lambda self: None
    builder = (tiny_net_builder(image, feat_dim) if net == "tiny"
               else get_net_builder(args.net, args.net_from_name))
    alg = get_algorithm(args, builder, None, None)
    alg.hooks_dict.pop("TimerHook", None)
    alg.scheduler = None  # the step uses lr0 either way; keeps the post-step lr fixed
    alg.model.train()
    return alg, args


def finish_usb_init(alg, net, init=None):
    """Weight tweaks before the EMA shadow is registered; with ``init`` (an .npz of a
    float32 run), that run's initial weights instead (the float64 reference)."""
    import torch
    m = alg.model
    with torch.no_grad():
        if init is not None:
            w0 = np.load(init)
            sd = {k: torch.from_numpy(w0["w0/" + k]) for k in m.state_dict()}
            m.load_state_dict({k: v.to(torch.get_default_dtype()) if v.is_floating_point() else v
                               for k, v in sd.items()})
        if init is not None and net == "wrn":
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.eps = 1e-3
        elif init is not None:
            pass
        elif net == "tiny":
            m_cls = [mod for n, mod in m.named_modules() if n.endswith("classifier")][0]
            m_cls.weight.mul_(8.0)  # peaky predictions: some rows pass the threshold
        else:
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.eps = 1e-3
            stem = [mod for n, mod in m.named_modules() if n.endswith("conv1") and "block" not in n][0]
            stem.bias.zero_()
            cls = [mod for n, mod in m.named_modules() if n.endswith("classifier")][0]
            cls.weight.mul_(4.0)
    alg.ema_model.load_state_dict(alg.model.state_dict())
    for mod in alg.ema_model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eps = 1e-3 if net == "wrn" else mod.eps
    alg.call_hook("before_run")  # EMAHook registers the shadow


def state_numpy(module):
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def grad_recorder(module):
    grads = {}
    for name, p in module.named_parameters():
        p.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach().cpu().numpy().copy()))
    return grads


def official_step(alg, batch):
    """One iteration of AlgorithmBase.train's loop body (USB core/algorithmbase.py)."""
    alg.call_hook("before_train_step")
    alg.out_dict, alg.log_dict = alg.train_step(**alg.process_batch(**batch))
    alg.call_hook("after_train_step")
    alg.it += 1


def usb_wrn_forward_variants(weights, x_nchw, num_classes):
    """Train-mode logits of USB's WRN-28-2 with the given weights, unpatched and with
    each TF-form patch added in turn (cumulative). Fresh modules; nothing is kept."""
    import torch
    import torch.nn.functional as F
    from semilearn.nets.wrn import wrn
    current = wrn.BasicBlock.forward
    orig = getattr(wrn.BasicBlock, "_usb_forward", current)
    out = {}
    x = torch.from_numpy(x_nchw).to(torch.get_default_dtype())
    steps = ["usb", "conv1_on_activated", "tf_same_padding", "bn_eps_1e-3", "stem_bias_zero"]
    for i, name in enumerate(steps):
        def forward(self, x, padding=i >= 2, activated=i >= 1):
            if not activated:
                return orig(self, x)
            o = self.relu1(self.bn1(x))
            shortcut_in = o if (not self.equalInOut and self.activate_before_residual) else x
            s = self.conv1.stride[0]
            if s == 1 or not padding:
                y = self.conv1(o)
            else:
                y = F.conv2d(F.pad(o, (0, 1, 0, 1)), self.conv1.weight, None, s, 0)
            y = self.relu2(self.bn2(y))
            y = self.conv2(y)
            return (shortcut_in if self.equalInOut else self.convShortcut(shortcut_in)) + y
        wrn.BasicBlock.forward = forward
        net = wrn.wrn_28_2(num_classes=num_classes)
        sd = {k: torch.from_numpy(v).to(torch.get_default_dtype()) if v.dtype.kind == "f"
              else torch.from_numpy(v) for k, v in weights.items()}
        if i < 4:  # USB's own random stem bias, cancelled by the following BN
            sd["conv1.bias"] = torch.from_numpy(np.random.default_rng(1).uniform(
                -0.2, 0.2, size=weights["conv1.bias"].shape).astype(np.float32))
        net.load_state_dict(sd)
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eps = 1e-3 if i >= 3 else (mod.eps if mod.eps != 1e-3 else 1e-3)
        if i < 3:  # USB's eps: 1e-5 in blocks, 1e-3 final
            for n_, mod in net.named_modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.eps = 1e-3 if n_ == "bn1" else 1e-5
        net.train()
        with torch.no_grad():
            out[name] = net(x)["logits"].numpy()
    wrn.BasicBlock.forward = current
    return out


# --------------------------------------------------------- our half (TF)
def use_tfssl():
    """Our half imports tfssl from this checkout ($TFSSL_SRC to test another one)."""
    sys.path.insert(0, TFSSL_SRC)
    import tfssl
    try:
        rev = subprocess.run(["git", "-C", TFSSL_SRC, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
    except Exception:
        rev = "?"
    print(f"ours: tfssl from {os.path.dirname(tfssl.__file__)} at {rev}")
    return rev


def keras_tiny_encoder(image, feat_dim):
    import keras
    inp = keras.Input((image, image, 3))
    h = keras.layers.Flatten()(inp)
    h = keras.layers.Dense(feat_dim, activation="relu", name="fc1")(h)
    return keras.Model(inp, h, name="tiny")


def keras_wrn():
    """tfssl's WRN-28-2; $PARITY_NORM picks its norm (default batch: the fused BN)."""
    from tfssl.models import backbones
    return backbones.wide_resnet(28, 2, (32, 32, 3), norm=os.environ.get("PARITY_NORM", "batch"))


def torch_to_keras_map(model, prefix, net, projector=None, proj_prefix=None):
    """{torch state_dict name: (keras variable, kind)} for the encoder + head
    (+ projector). kind in conv | dense_w | vec."""
    m = {}
    enc, head = model.encoder, model.head
    if net == "tiny":
        fc1 = enc.get_layer("fc1")
        m[prefix + "fc1.weight"] = (fc1.kernel, "dense_w")
        m[prefix + "fc1.bias"] = (fc1.bias, "vec")
    else:
        m[prefix + "conv1.weight"] = (enc.get_layer("stem_conv").kernel, "conv")
        for s in range(3):
            for b in range(4):
                t = f"{prefix}block{s + 1}.layer.{b}."
                k = f"stage{s + 1}_block{b}_"
                for bn in ("bn1", "bn2"):
                    L = enc.get_layer(k + bn)
                    m[t + bn + ".weight"] = (L.gamma, "vec")
                    m[t + bn + ".bias"] = (L.beta, "vec")
                    m[t + bn + ".running_mean"] = (L.moving_mean, "vec")
                    m[t + bn + ".running_var"] = (L.moving_variance, "vec")
                m[t + "conv1.weight"] = (enc.get_layer(k + "conv1").kernel, "conv")
                m[t + "conv2.weight"] = (enc.get_layer(k + "conv2").kernel, "conv")
                try:
                    m[t + "convShortcut.weight"] = (enc.get_layer(k + "down").kernel, "conv")
                except ValueError:
                    pass
        L = enc.get_layer("final_bn")
        m[prefix + "bn1.weight"] = (L.gamma, "vec")
        m[prefix + "bn1.bias"] = (L.beta, "vec")
        m[prefix + "bn1.running_mean"] = (L.moving_mean, "vec")
        m[prefix + "bn1.running_var"] = (L.moving_variance, "vec")
    m[prefix + "classifier.weight"] = (head.kernel, "dense_w")
    m[prefix + "classifier.bias"] = (head.bias, "vec")
    if projector is not None:
        for i, ti in enumerate((0, 2)):
            L = projector.get_layer(f"dense{i}")
            m[f"{proj_prefix}{ti}.weight"] = (L.kernel, "dense_w")
            m[f"{proj_prefix}{ti}.bias"] = (L.bias, "vec")
    return m


def to_keras(value, kind):
    if kind == "conv":
        return np.transpose(value, (2, 3, 1, 0))
    if kind == "dense_w":
        return value.T
    return value


def load_weights(mapping, state, prefix="w0/"):
    for name, (var, kind) in mapping.items():
        var.assign(to_keras(state[prefix + name], kind))


def capture_grads(model):
    """Wraps model.optimizer.apply to keep {id(var): grad} of the step."""
    grads = {}
    orig = model.optimizer.apply

    def apply(g, variables=None):
        for gi, v in zip(g, variables if variables is not None else model.trainable_variables):
            if gi is not None:
                grads[id(v)] = np.asarray(gi)
        return orig(g, variables)

    model.optimizer.apply = apply
    return grads


def compare_weights(rep, mapping, state, grads_ours, net, wtol=1e-4, gtol=1e-4, st64=None):
    """Gradient norms per layer, weights and BN statistics after the step; with
    ``st64`` (the official step in float64), also the float32 error of each side."""
    if st64 is not None:
        names = [n for n in mapping if "g/" + n in state]
        off32 = [np.linalg.norm(state["g/" + n]) for n in names]
        off64 = [np.linalg.norm(st64["g/" + n]) for n in names]
        ours32 = [np.linalg.norm(grads_ours.get(id(mapping[n][0]), np.zeros(1))) for n in names]
        rel = lambda a, b: max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))
        rep.add("grad norms: official fp32 vs official fp64", off64, off32, gtol,
                note=f"worst layer rel {rel(off32, off64):.1e}")
        rep.add("grad norms: ours fp32 vs official fp64", off64, ours32, gtol,
                note=f"worst layer rel {rel(ours32, off64):.1e}")
        w = [n for n in mapping if "running" not in n]
        cat = lambda st, conv: np.concatenate([to_keras(st["w1/" + n], mapping[n][1]).ravel()
                                               for n in w])
        ours_w = np.concatenate([mapping[n][0].numpy().ravel() for n in w])
        rep.add("weights after: official fp32 vs fp64", cat(st64, 0), cat(state, 0), wtol)
        rep.add("weights after: ours fp32 vs official fp64", cat(st64, 0), ours_w, wtol)
    g_rows, w_rows, bn_rows = [], [], []
    for name, (var, kind) in mapping.items():
        after = to_keras(state["w1/" + name], kind)
        if "running" in name:
            bn_rows.append((name, after, var.numpy()))
            continue
        w_rows.append((name, after, var.numpy()))
        if "g/" + name in state:
            g_off = float(np.linalg.norm(state["g/" + name]))
            g_our = float(np.linalg.norm(grads_ours.get(id(var), np.zeros(1))))
            g_rows.append((name, g_off, g_our))
    if g_rows:
        rep.add(f"grad norms per layer ({len(g_rows)} tensors)", [r[1] for r in g_rows],
                [r[2] for r in g_rows], gtol)
        worst = max(g_rows, key=lambda r: abs(r[1] - r[2]) / max(abs(r[1]), 1e-30))
        rel = abs(worst[1] - worst[2]) / max(abs(worst[1]), 1e-30)
        rep.add(f"  worst layer rel: {worst[0][-34:]}", worst[1], worst[2], gtol,
                note=f"rel {rel:.1e}")
        top = sorted(g_rows, key=lambda r: -abs(r[1] - r[2]) / max(abs(r[1]), 1e-30))[:3]
        print("worst gradient norms (name, official, ours, rel):", "; ".join(
            f"{n} {a:.4e} {b:.4e} {abs(a - b) / max(abs(a), 1e-30):.1e}" for n, a, b in top))
    rep.add(f"weights after step ({len(w_rows)} tensors)",
            np.concatenate([r[1].ravel() for r in w_rows]),
            np.concatenate([r[2].ravel() for r in w_rows]), wtol)
    if bn_rows:
        mean = [r for r in bn_rows if "mean" in r[0]]
        var = [r for r in bn_rows if "var" in r[0]]
        rep.add(f"BN running_mean after step ({len(mean)})",
                np.concatenate([r[1].ravel() for r in mean]),
                np.concatenate([r[2].ravel() for r in mean]), wtol)
        rep.add(f"BN running_var after step ({len(var)})",
                np.concatenate([r[1].ravel() for r in var]),
                np.concatenate([r[2].ravel() for r in var]), wtol,
                note="torch keeps the unbiased batch variance, Keras the biased")


def compare_ema(rep, model, mapping, state, wtol=1e-4):
    """tfssl's eval EMA (encoder + head parameters) against USB's EMA shadow."""
    if not model._ema_pairs:
        return
    by_id = {id(v): e for e, v in model._ema_pairs}
    a, b = [], []
    for name, (var, kind) in mapping.items():
        if "ema/" + name in state and id(var) in by_id:
            a.append(to_keras(state["ema/" + name], kind).ravel())
            b.append(by_id[id(var)].numpy().ravel())
    rep.add(f"EMA weights after step ({len(a)} tensors)", np.concatenate(a), np.concatenate(b),
            wtol)


def main_both(script, args, extra):
    """Runs the official half (and its float64 twin with --ref64); returns the paths."""
    check_setup()
    out = args.out or f"/tmp/parity_{os.path.basename(script)[:-3]}_{args.net}_{args.case}_{args.wd}.npz"
    print(run_official(script, out, extra).strip())
    out64 = None
    if args.ref64:
        out64 = out[:-4] + "_f64.npz"
        print(run_official(script, out64, extra + ["--f64", "--init", out]).strip())
    return out, out64


def make_sgd(lr, wd):
    """The optimizer of our half: USB's SGD is torch SGD, nesterov, momentum 0.9, coupled
    decay wd on every tensor but biases and 1-d (BN) ones. With wd > 0, tfssl's coupled
    ``tfssl.optimizers.SGD`` when this tfssl has it, else Keras's decoupled decay (what
    tfssl's --optimizer=sgd used before the coupled form). Returns (optimizer, label)."""
    import keras
    from tfssl import optimizers
    if wd and hasattr(optimizers, "SGD"):
        return (optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=wd),
                f"tfssl.optimizers.SGD coupled wd={wd}")
    opt = keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=wd or None)
    if wd:
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        return opt, f"keras SGD decoupled wd={wd}"
    return opt, "keras SGD, no decay"
