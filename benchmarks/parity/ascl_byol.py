"""Parity of tfssl's ASCL-BYOL (methods.ascl.ASCLBYOL) with the official ASCL
code's model "byol" (MrChenFeng/Adaptive-Soft-Contrastive-Learning_ICPR2022 @
6de9b3d7, model.py::ASCL._forward_byol :235-279; predictor :105-109).

Run: python3 benchmarks/parity/ascl_byol.py [--kinds ascl,ahcl,hard] [--no-step]

(1) targets/loss/dL/dq from identical q, k (lookup tables, predictor replaced
    by the identity on both sides so that only the loss math is compared);
(2) queue rows / labels / pointer (the official enqueues BYOL keys too);
(3) two SGD steps of ResNet-18 (CIFAR stem, split BN 8) + the real predictor,
    weights copied: here the predictor's input differs (see PARITY.md).
The official _forward_byol returns the per-sample loss [N] and main_simple.py:79-82
calls backward() on it, which PyTorch refuses for a non-scalar: the official BYOL
path cannot run as written; this script takes its mean (what ours does).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ascl  # noqa: E402

if __name__ == "__main__":
    ascl.main(default_kinds=("ascl", "ahcl", "hard"), byol=True, title="ASCL-BYOL",
              script=os.path.abspath(__file__))
