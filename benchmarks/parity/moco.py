"""Parity of tfssl's MoCo v2 (ASCL kind "moco") with the official ASCL code's
type "normal" (MrChenFeng/Adaptive-Soft-Contrastive-Learning_ICPR2022 @ 6de9b3d7,
model.py:214-215: one-hot target on the positive key; the rest of the step is
_forward_moco, model.py:166-233).

Run: python3 benchmarks/parity/moco.py [--no-step]
Same comparisons (1)-(3) as ascl.py (whose machinery this uses), for kind moco.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ascl  # noqa: E402

if __name__ == "__main__":
    ascl.main(default_kinds=("moco",), title="MoCo v2", script=os.path.abspath(__file__))
