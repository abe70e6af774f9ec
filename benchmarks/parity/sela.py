"""Parity of tfssl's SeLa label assignment with the official code
(yukimasano/self-label @ 3891e376).

Official: sinkhornknopp.py::optimize_L_sk (:112-139): float64 NumPy
Sinkhorn-Knopp on P^lambda, r = 1/K / (P c), c = 1/N / (r^T P), error
sum|c/c_new - 1| every 10 iterations, stop at err <= 0.1 (hard-coded), labels
argmax_k of diag(c) P^lambda diag(r).

Run (tfssl's Python; the official half runs in the torch venv):
    python3 benchmarks/parity/sela.py
Venv and trees: benchmarks/parity/common_self.py.

(2) Label assignments, iteration counts, final error and the cluster scalings r
    from the same log-probabilities (float32 log_softmax of random logits; the
    official gets exp of them in float64, as its CPU path stores softmax
    outputs), for ours in both formulations (scaled, log), several N, K, lambda.
(1)/(3) SeLa's training loss is plain cross-entropy on the assigned labels; the
    step is covered by the semi-supervised/CE scripts (see PARITY.md).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common_self as cs  # noqa: E402

# (N, K, lambda, logit scale)
CASES = ((2000, 10, 25.0, 3.0), (3000, 30, 25.0, 1.0), (1024, 10, 10.0, 5.0), (4096, 100, 25.0, 2.0))


def _log_p(n, k, scale, seed):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, k)) * scale).astype(np.float32)
    z[:, 0] += 1.0  # an unbalanced model: one cluster favoured
    z = z - z.max(1, keepdims=True)
    return (z - np.log(np.exp(z).sum(1, keepdims=True))).astype(np.float32)


def official_main():
    cs.setup_torch(0)
    cs.official_tree("selflabel", "sinkhornknopp.py")
    import torch
    sys.modules.setdefault("tensorboardX", types.ModuleType("tensorboardX"))
    from sinkhornknopp import optimize_L_sk  # official
    out = {}
    for i, (n, k, lam, scale) in enumerate(CASES):
        lp = _log_p(n, k, scale, i)
        st = types.SimpleNamespace(PS=np.exp(lp.astype(np.float64)), L=torch.zeros(1, n).long(),
                                   outs=[k], lamb=lam, dtype=np.float64, dev="cpu")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            optimize_L_sk(st, nh=0)
        m = re.search(r"error:\s+(\S+)\s+step\s+(\d+)", buf.getvalue())
        q = st.PS.T  # [N, K] = diag(c) P^lambda diag(r) (the official leaves PS as [K, N])
        out[f"c{i}.labels"] = st.L[0].numpy()
        out[f"c{i}.iters"] = int(m.group(2))
        out[f"c{i}.err"] = float(m.group(1))
        out[f"c{i}.q_colsum"] = q.sum(0)
        out[f"c{i}.q_rowsum"] = q.sum(1)
    np.savez(cs.official_out(), **out)


def tfssl_main():
    sys.path.insert(0, cs.REPO)
    with tempfile.TemporaryDirectory() as tmp:
        off = cs.run_official(__file__, os.path.join(tmp, "o.npz"))
    import tensorflow as tf
    from tfssl.ops import sinkhorn
    rep = cs.Report("SeLa: tfssl sinkhorn vs official optimize_L_sk")
    for i, (n, k, lam, scale) in enumerate(CASES):
        lp = _log_p(n, k, scale, i)
        for method in sinkhorn.METHODS:
            res = sinkhorn.sinkhorn(tf.constant(lp), lam, tol=0.1, method=method)
            lab = np.asarray(res.labels)
            tag = f"(2) N={n} K={k} lambda={lam:g} {method}"
            frac = float(np.mean(lab != off[f"c{i}.labels"]))
            rep.add(f"{tag}: labels (fraction that differ)", frac, 0.0, 0.0, atol_floor=1.0)
            rep.add(f"{tag}: iterations ({res.iterations} vs {off[f'c{i}.iters']})",
                    res.iterations, off[f"c{i}.iters"], 0)
            rep.add(f"{tag}: final error", res.error, off[f"c{i}.err"], 1e-2,
                    note="float32 vs float64 estimate of a quantity below tol")
            # cluster marginal of the official plan Q vs ours (both should be 1/K after scaling)
            log_q = lam * lp + np.asarray(res.log_r)[None, :].reshape(1, -1)
            log_q += np.asarray(res.log_c).reshape(-1, 1) if not isinstance(res.log_c, (list, tuple)) else 0
            q = np.exp(log_q.astype(np.float64))
            rep.add(f"{tag}: plan column sums", q.sum(0), off[f"c{i}.q_colsum"], 1e-3)
            rep.add(f"{tag}: plan row sums", q.sum(1), off[f"c{i}.q_rowsum"], 1e-3)
    rep.print()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--official-half", default=None)
    a = ap.parse_args()
    if a.official_half:
        official_main()
    else:
        tfssl_main()
