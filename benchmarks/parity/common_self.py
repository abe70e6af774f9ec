"""Shared glue of the self-supervised parity scripts (ascl, moco, ascl_byol, paws, sela).

Each script has two halves in one file:
  * the OFFICIAL half runs in a PyTorch venv (never tfssl's Python): it imports the
    official code from its pinned tree, builds inputs, runs the official code, and
    writes everything (inputs, initial weights, outputs, grads, post-step weights
    and state) to an .npz;
  * the TFSSL half runs in tfssl's Python (TensorFlow, no torch): it launches the
    official half as a subprocess, loads the .npz, runs ours on the same tensors and
    prints max abs / max rel differences.

Setup (once):
  python3 -m venv /work/anchor/venv && /work/anchor/venv/bin/pip install torch torchvision numpy
  official trees at the commits in /work/shared/anchor-bench/README.md:
    ascl      MrChenFeng/Adaptive-Soft-Contrastive-Learning_ICPR2022 @ 6de9b3d7
    suncet    facebookresearch/suncet (PAWS)                        @ 731547d7
    selflabel yukimasano/self-label (SeLa)                          @ 3891e376
Environment overrides: PARITY_TORCH_PY (venv python), PARITY_SRC (folder holding
ascl/, suncet/, selflabel/; default /work/anchor/src).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

TORCH_PY = os.environ.get("PARITY_TORCH_PY", "/work/anchor/venv/bin/python")
SRC = os.environ.get("PARITY_SRC", "/work/anchor/src")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def official_tree(name: str, must_contain: str) -> str:
    """Path of an official tree, put first on sys.path; exits with a clear message if absent."""
    path = os.path.join(SRC, name)
    if not os.path.exists(os.path.join(path, must_contain)):
        sys.exit(f"official tree {path} missing (no {must_contain}): fetch it at the pinned "
                 f"commit (see /work/shared/anchor-bench/README.md) or set PARITY_SRC")
    sys.path.insert(0, path)
    return path


def setup_torch(seed: int = 0, threads: int = 1):
    """Float32 CPU torch, deterministic; `.cuda()` becomes a no-op on CPU."""
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self
    return torch


def run_official(script: str, out: str, extra=()) -> dict:
    """Runs ``script --official-half out`` in the torch venv and loads its .npz."""
    if not os.path.exists(TORCH_PY):
        sys.exit(f"PyTorch venv python {TORCH_PY} not found: create the venv (see the top of "
                 f"{__file__}) or set PARITY_TORCH_PY")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(script)))
    r = subprocess.run([TORCH_PY, script, "--official-half", out, *extra], env=env)
    if r.returncode:
        sys.exit(f"official half failed (exit {r.returncode})")
    return dict(np.load(out, allow_pickle=False))


def is_official_half() -> bool:
    return "--official-half" in sys.argv


def official_out() -> str:
    return sys.argv[sys.argv.index("--official-half") + 1]


class Report:
    """Rows of (what, max abs diff, max rel diff, tolerance, status)."""

    def __init__(self, title: str):
        self.title, self.rows = title, []

    def add(self, what, ours, theirs, rtol=1e-5, atol_floor=1e-12, note=""):
        a = np.asarray(ours, np.float64)
        b = np.asarray(theirs, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"{what}: shape {a.shape} vs official {b.shape}")
        d = np.abs(a - b)
        mabs = float(d.max()) if d.size else 0.0
        scale = float(np.abs(b).max()) if b.size else 0.0
        mrel = mabs / max(scale, atol_floor)
        ok = mrel <= rtol
        self.rows.append((what, mabs, mrel, rtol, "ok" if ok else "DIFF", note))
        return ok

    def note(self, what, text):
        self.rows.append((what, float("nan"), float("nan"), float("nan"), "info", text))

    def print(self):
        print(f"\n## {self.title}")
        print("| quantity | max abs | max rel (to max abs official) | tol rel | status | note |")
        print("|---|---|---|---|---|---|")
        for w, a, r, t, s, n in self.rows:
            if s == "info":
                print(f"| {w} | | | | info | {n} |")
            else:
                print(f"| {w} | {a:.3g} | {r:.3g} | {t:g} | {s} | {n} |")
        sys.stdout.flush()


# ------------------------------------------------------------------ weights
def torch_state(module, prefix="") -> dict:
    """state_dict as float32/int NumPy arrays keyed ``prefix + name``."""
    return {prefix + k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def torch_grads(module, prefix="") -> dict:
    return {prefix + "grad." + k: p.grad.detach().cpu().numpy()
            for k, p in module.named_parameters() if p.grad is not None}


def resnet_name_map(depth_blocks=(2, 2, 2, 2), seq_prefix="net.") -> dict:
    """torch ModelBase(net=Sequential of torchvision ResNet children, CIFAR stem, no
    max-pool) parameter prefixes -> our ``backbones.resnet`` layer names."""
    m = {seq_prefix + "0": "stem_conv", seq_prefix + "1": "stem_bn"}
    for s, n in enumerate(depth_blocks):
        for b in range(n):
            t = f"{seq_prefix}{3 + s}.{b}."
            o = f"stage{s + 1}_block{b}_"
            m.update({t + "conv1": o + "conv1", t + "bn1": o + "bn1", t + "conv2": o + "conv2",
                      t + "bn2": o + "bn2", t + "downsample.0": o + "down",
                      t + "downsample.1": o + "down_bn"})
    return m


def set_keras_layer(layer, sd: dict, tprefix: str) -> None:
    """Copies torch parameters ``tprefix.{weight,bias,running_*}`` into a Keras layer
    (Conv2D: OIHW -> HWIO; Dense: [out,in] -> [in,out]; BN: gamma, beta, moving stats)."""
    import keras
    w = sd[tprefix + ".weight"]
    if isinstance(layer, keras.layers.Conv2D):
        vals = [w.transpose(2, 3, 1, 0)] + ([sd[tprefix + ".bias"]] if layer.use_bias else [])
    elif isinstance(layer, keras.layers.Dense):
        vals = [w.T] + ([sd[tprefix + ".bias"]] if layer.use_bias else [])
    else:  # batch norm (ours or Keras's): gamma, beta, moving mean, moving variance
        vals = [w, sd[tprefix + ".bias"], sd[tprefix + ".running_mean"], sd[tprefix + ".running_var"]]
    layer.set_weights(vals)


def keras_layer_values(layer) -> dict:
    """Same naming as torch: weight (torch layout), bias, running_mean, running_var."""
    import keras
    ws = [np.asarray(v) for v in layer.weights]
    if isinstance(layer, keras.layers.Conv2D):
        out = {"weight": ws[0].transpose(3, 2, 0, 1)}
        if layer.use_bias:
            out["bias"] = ws[1]
    elif isinstance(layer, keras.layers.Dense):
        out = {"weight": ws[0].T}
        if layer.use_bias:
            out["bias"] = ws[1]
    else:
        d = {v.path.split("/")[-1]: np.asarray(v) for v in layer.weights}
        out = {"weight": d["gamma"], "bias": d["beta"], "running_mean": d["moving_mean"],
               "running_var": d["moving_variance"]}
    return out


def keras_grads_by_layer(model_layers: dict, variables, grads) -> dict:
    """{layer_name.weight|bias: grad in torch layout} for the given (variable, grad) pairs."""
    import keras
    byid = {id(v): g for v, g in zip(variables, grads) if g is not None}
    out = {}
    for name, layer in model_layers.items():
        for v in layer.trainable_weights:
            if id(v) not in byid:
                continue
            g = np.asarray(byid[id(v)])
            short = v.path.split("/")[-1]
            key = {"kernel": "weight", "gamma": "weight", "bias": "bias", "beta": "bias"}[short]
            if key == "weight" and isinstance(layer, keras.layers.Conv2D):
                g = g.transpose(3, 2, 0, 1)
            elif key == "weight" and isinstance(layer, keras.layers.Dense):
                g = g.T
            out[f"{name}.{key}"] = g
    return out
