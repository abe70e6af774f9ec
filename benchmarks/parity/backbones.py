"""Parity of tfssl's backbones with the official PyTorch networks (PARITY.md D1, S3).

Each case builds one official network with its own random initialisation, copies
its parameters and BN statistics into the tfssl backbone of the same name, and
compares, in float64 and train mode (batch statistics, as every method trains):
the pooled features, the gradient of sum(features * G) for every parameter, and
the BN running means after the forward.

| case | official network | tfssl backbone |
|---|---|---|
| usb_wrn28_2 | USB ``semilearn/nets/wrn/wrn.py`` ``wrn_28_2`` (SimMatch / FixMatch CIFAR) | ``wrn28_2_usb`` |
| suncet_wrn28_2 | suncet ``src/wide_resnet.py`` ``wide_resnet28w2(dropout_rate=0)`` (PAWS CIFAR) | ``wrn28_2_suncet`` |
| resnet18_cifar | torchvision ``resnet18`` with the CIFAR stem (3x3 stride-1 conv, no max-pool: ASCL ``model.py``, self-label CIFAR) | ``resnet18`` at 32 px |
| resnet50 | torchvision ``resnet50`` (SimMatch / MoCo / PAWS / SeLa ImageNet), at 64 px | ``resnet50`` at 64 px |
| usb_wrn28_2 as tf | USB's network against tfssl's google-research ``wrn28_2`` | ``wrn28_2`` (expected to differ) |

Run (tfssl's Python; it starts the official half in the torch venv):
    python3 benchmarks/parity/backbones.py [--cases usb_wrn28_2,resnet50]
Venv and trees: ``benchmarks/parity/common_self.py`` (PARITY_TORCH_PY, PARITY_SRC with
usb/ and suncet/ unpacked at the commits of ../shared/anchor-bench/README.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common_self as cs  # noqa: E402

B = 8
CASES = ("usb_wrn28_2", "suncet_wrn28_2", "resnet18_cifar", "resnet50")
SIDE = {"usb_wrn28_2": 32, "suncet_wrn28_2": 32, "resnet18_cifar": 32, "resnet50": 64}
OURS = {"usb_wrn28_2": "wrn28_2_usb", "suncet_wrn28_2": "wrn28_2_suncet",
        "resnet18_cifar": "resnet18", "resnet50": "resnet50"}


# =============================================================== official half
def _usb_wrn_module():
    """USB's wrn.py loaded from its file (the semilearn package imports far more)."""
    path = os.path.join(cs.SRC, "usb", "semilearn", "nets", "wrn", "wrn.py")
    if not os.path.exists(path):
        sys.exit(f"official tree missing: {path} (see common_self.py)")
    for name in ("semilearn", "semilearn.nets", "semilearn.nets.utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["semilearn.nets.utils"].load_checkpoint = None
    spec = importlib.util.spec_from_file_location("usb_wrn", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def official_net(torch, case):
    """(module, features function) of the official network of ``case``."""
    if case == "usb_wrn28_2":
        net = _usb_wrn_module().wrn_28_2(num_classes=10)
        return net, lambda x: net(x, only_feat=True)
    if case == "suncet_wrn28_2":
        cs.official_tree("suncet", "src/wide_resnet.py")
        from src import wide_resnet
        net = wide_resnet.wide_resnet28w2(dropout_rate=0.0)
        return net, net._forward_backbone
    import torchvision
    if case == "resnet18_cifar":
        net = torchvision.models.resnet18()
        net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = torch.nn.Identity()
    else:
        net = torchvision.models.resnet50()
    net.fc = torch.nn.Identity()
    return net, net


def official_main(cases):
    torch = cs.setup_torch(0)
    torch.use_deterministic_algorithms(False)
    torch.set_default_dtype(torch.float64)
    out = {}
    for i, case in enumerate(cases):
        torch.manual_seed(10 + i)
        net, features = official_net(torch, case)
        net.double().train()
        # non-trivial BN parameters and statistics, so that a wrong mapping shows
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        for k, v in cs.torch_state(net).items():  # .numpy() shares memory: copy
            out[f"{case}.init.{k}"] = v.copy()
        g = torch.Generator().manual_seed(20 + i)
        side = SIDE[case]
        x = torch.randn(B, 3, side, side, generator=g)
        y = features(x)
        G = torch.randn(y.shape, generator=g)
        (y * G).sum().backward()
        out[f"{case}.x"], out[f"{case}.y"], out[f"{case}.G"] = (
            x.numpy(), y.detach().numpy(), G.numpy())
        for k, p in net.named_parameters():
            if p.grad is not None:
                out[f"{case}.grad.{k}"] = p.grad.numpy()
        for k, v in net.state_dict().items():
            if k.endswith("running_mean"):
                out[f"{case}.after.{k}"] = v.numpy()
    np.savez(cs.official_out(), **out)


# =================================================================== our half
def name_map(case, ours) -> dict:
    """{torch module prefix: our layer} for every official module with weights."""
    names = {layer.name for layer in ours.layers}
    m = {}
    if case in ("usb_wrn28_2", "suncet_wrn28_2"):
        m["conv1"] = "stem_conv"
        m["bn1"] = "final_bn"
        for s in range(3):
            for b in range(4):
                t = f"block{s + 1}.layer.{b}." if case == "usb_wrn28_2" else f"layer{s + 1}.{b}."
                o = f"stage{s + 1}_block{b}_"
                down = "convShortcut" if case == "usb_wrn28_2" else "shortcut.0"
                for tn, on in (("bn1", "bn1"), ("conv1", "conv1"), ("bn2", "bn2"),
                               ("conv2", "conv2"), (down, "down")):
                    m[t + tn] = o + on
    else:
        blocks = (2, 2, 2, 2) if case == "resnet18_cifar" else (3, 4, 6, 3)
        m["conv1"], m["bn1"] = "stem_conv", "stem_bn"
        for s, n in enumerate(blocks):
            for b in range(n):
                t, o = f"layer{s + 1}.{b}.", f"stage{s + 1}_block{b}_"
                for k in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
                    m[t + k] = o + k
                m[t + "downsample.0"], m[t + "downsample.1"] = o + "down", o + "down_bn"
    return {t: ours.get_layer(o) for t, o in m.items() if o in names}


def compare(off, case, rep, backbone=None, expect_diff=False):
    import keras
    import tensorflow as tf
    from tfssl.models import backbones
    backbone = backbone or OURS[case]
    side = SIDE[case]
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        ours = backbones.get_backbone(backbone, (side, side, 3), norm="batch",
                                      cifar_stem=case == "resnet18_cifar")
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")
    init = {k[len(case) + 6:]: v for k, v in off.items() if k.startswith(case + ".init.")}
    maps = name_map(case, ours)
    tprefixes = {k.rsplit(".", 1)[0] for k in init if k.endswith(".weight")}
    unmapped = sorted(tprefixes - set(maps))
    for t, layer in maps.items():
        cs.set_keras_layer(layer, init, t)
    x = tf.constant(off[case + ".x"].transpose(0, 2, 3, 1))
    with tf.GradientTape() as tape:
        y = ours(x, training=True)
        loss = tf.reduce_sum(y * off[case + ".G"])
    grads = tape.gradient(loss, ours.trainable_variables)
    g = cs.keras_grads_by_layer(maps, ours.trainable_variables, grads)
    what = f"{case} vs tfssl {backbone}"
    tol = 1e-1 if expect_diff else 1e-9
    rep.add(f"{what}: features (train mode)", y.numpy(), off[case + ".y"], tol)
    pairs = {k: (v, off[f"{case}.grad.{k}"]) for k, v in g.items() if f"{case}.grad.{k}" in off}
    # A conv bias followed by a train-mode BN on every path (the stems; suncet's
    # biases) has a zero gradient in exact arithmetic; its rounding noise is
    # measured against the largest gradient of the network instead of its own.
    scale = max(np.linalg.norm(b) for _, b in pairs.values())
    zero = sorted(k for k, (_, b) in pairs.items() if np.linalg.norm(b) < 1e-9 * scale)
    worst = max((float(np.linalg.norm(a - b) / np.linalg.norm(b)), k)
                for k, (a, b) in pairs.items() if k not in zero)
    rep.add(f"{what}: {len(pairs) - len(zero)} parameter grads, worst rel L2 ({worst[1]})",
            worst[0], 0.0, tol, atol_floor=1.0)
    if zero:
        worst0 = max(float(np.linalg.norm(pairs[k][0] - pairs[k][1])) for k in zero) / scale
        rep.add(f"{what}: {len(zero)} grads that BN cancels (official norm < 1e-9 of the "
                f"largest), worst ||d|| / largest ||g||", worst0, 0.0, tol, atol_floor=1.0)
    missing = sorted(k for k in off if k.startswith(case + ".grad.")
                     and k[len(case) + 6:] not in g
                     and np.abs(off[k]).max() > 0)
    rep.note(f"{what}: official parameters with a nonzero grad not in ours",
             ", ".join(m[len(case) + 6:] for m in missing) or "none")
    rep.note(f"{what}: official modules not mapped", ", ".join(unmapped) or "none")
    worst_mean = 0.0
    for t, layer in maps.items():
        if hasattr(layer, "moving_mean"):
            a = np.asarray(layer.moving_mean)
            b = off[f"{case}.after.{t}.running_mean"]
            worst_mean = max(worst_mean, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)))
    rep.add(f"{what}: BN running means after the step, worst rel", worst_mean, 0.0, tol,
            atol_floor=1.0)


def tfssl_main(cases):
    sys.path.insert(0, cs.REPO)
    with tempfile.TemporaryDirectory() as tmp:
        off = cs.run_official(os.path.abspath(__file__), os.path.join(tmp, "official.npz"),
                              ["--cases", ",".join(cases)])
    rep = cs.Report("Backbones: tfssl vs the official PyTorch networks (float64, train mode)")
    for case in cases:
        compare(off, case, rep)
    if "usb_wrn28_2" in cases:  # the google-research form, for scale (PARITY.md S3)
        compare(off, "usb_wrn28_2", rep, backbone="wrn28_2", expect_diff=True)
    rep.print()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--official-half", default=None)
    a = ap.parse_args()
    cases = a.cases.split(",")
    bad = sorted(set(cases) - set(CASES))
    if bad:
        sys.exit(f"unknown --cases {bad}; choose from {CASES}")
    if a.official_half:
        official_main(cases)
    else:
        tfssl_main(cases)


if __name__ == "__main__":
    main()
