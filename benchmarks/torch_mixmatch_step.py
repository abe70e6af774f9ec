#!/usr/bin/env python
"""A PyTorch MixMatch training step of the shape USB runs, timed on this host.

Not part of tfssl and not a dependency: it needs PyTorch, installed apart
from tfssl's environment, e.g.

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch numpy --index-url https://download.pytorch.org/whl/cpu
    /tmp/torchenv/bin/python benchmarks/torch_mixmatch_step.py

Why: the MixMatch throughput anchor in ../shared/PERFORMANCE.md (USB's step,
1.75 s, MFU 0.67) was measured on an AMD EPYC host; the hosts drift, and MFU
against a 4096^2 matmul peak is not the same yardstick on every CPU (an
AVX-512 host's matmul peak grows more than its small convolutions do). This
script times a step of the same shape in the same session as
``scripts/benchmark.py --mode=throughput --method=mixmatch``, so the two can
be compared directly. It is written from the description of USB's step (the
setup table of PERFORMANCE.md), not from USB's code, so it is an estimate of
that step, not a measurement of it.

The step (WRN-28-2, 32x32x3, fp32, 2 threads, random tensors):
  * guess: 2 x 64 unlabeled views forward without grad, BN statistics not
    updated (USB freezes BN there);
  * a labeled forward of 64 whose output is not in the loss (USB's logging
    forward; autograd records it, as there, but no backward runs through it);
  * MixUp of the 192 labeled + unlabeled rows, interleaved into 3 batches of
    64, each forward with grad, only the first updating BN statistics;
  * soft CE on the labeled rows + L2 on the unlabeled ones, backward, SGD
    (momentum 0.9, Nesterov, weight decay 5e-4) and an EMA of the weights.
Prints the median step seconds of ``--steps`` after ``--warmup``, and img/s
(source images: 64 labeled + 64 unlabeled).
"""

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):
    """Pre-activation residual block: BN-LReLU-conv3x3-BN-LReLU-conv3x3."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=0.001)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.001)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (None if cin == cout and stride == 1
                         else nn.Conv2d(cin, cout, 1, stride, 0, bias=False))

    def forward(self, x):
        o = F.leaky_relu(self.bn1(x), 0.1)
        skip = x if self.shortcut is None else self.shortcut(o)
        y = self.conv2(F.leaky_relu(self.bn2(self.conv1(o)), 0.1))
        return y + skip


class WRN28_2(nn.Module):
    def __init__(self, classes=10, width=2, blocks=4):
        super().__init__()
        ch = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        layers = []
        for g, stride in enumerate([1, 2, 2]):
            for b in range(blocks):
                layers.append(Block(ch[g] if b == 0 else ch[g + 1], ch[g + 1],
                                    stride if b == 0 else 1))
        self.body = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(ch[3], momentum=0.001)
        self.fc = nn.Linear(ch[3], classes)

    def forward(self, x):
        x = F.leaky_relu(self.bn(self.body(self.stem(x))), 0.1)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def set_bn_update(model, update):
    """Freeze (False) or restore (True) BN running statistics, keeping batch
    statistics for normalisation."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if update:
                m.momentum = m._saved_momentum
            else:
                m._saved_momentum = m.momentum
                m.momentum = 0.0


def interleave(xs, batch):
    """Splits each of the 3 batches into 3 parts and swaps the diagonal, so
    every forward holds labeled and unlabeled rows."""
    n = len(xs)
    sizes = [batch // n + (1 if i < batch % n else 0) for i in range(n)]
    parts = [list(torch.split(x, sizes)) for x in xs]
    for i in range(1, n):
        parts[0][i], parts[i][i] = parts[i][i], parts[0][i]
    return [torch.cat(p) for p in parts]


def step(model, ema, opt, x, y, u1, u2, classes=10, lam_u=75.0, t=0.5, alpha=0.75):
    b = x.shape[0]
    set_bn_update(model, False)
    with torch.no_grad():
        p = (F.softmax(model(u1), 1) + F.softmax(model(u2), 1)) / 2
        p = p ** (1 / t)
        q = p / p.sum(1, keepdim=True)
    model(x)  # the labeled forward for logging (outside no_grad, as USB's; not in the loss)
    set_bn_update(model, True)
    inputs = torch.cat([x, u1, u2])
    targets = torch.cat([F.one_hot(y, classes).float(), q, q])
    lam = np.random.beta(alpha, alpha)
    lam = max(lam, 1 - lam)
    perm = torch.randperm(inputs.shape[0])
    mixed_x = lam * inputs + (1 - lam) * inputs[perm]
    mixed_y = lam * targets + (1 - lam) * targets[perm]
    chunks = interleave(list(torch.split(mixed_x, b)), b)
    logits = [model(chunks[0])]
    set_bn_update(model, False)
    logits += [model(c) for c in chunks[1:]]
    set_bn_update(model, True)
    logits = interleave(logits, b)
    lx = -(F.log_softmax(logits[0], 1) * mixed_y[:b]).sum(1).mean()
    lu = F.mse_loss(F.softmax(torch.cat(logits[1:]), 1), mixed_y[b:])
    loss = lx + lam_u * lu
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for e, w in zip(ema.parameters(), model.parameters()):
            e.mul_(0.999).add_(w, alpha=0.001)
    return loss.item()


def forward_gflops(model):
    """Conv and linear FLOPs (2 per multiply-add) of one 32x32 image."""
    total = []

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            total.append(2 * out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, nn.Linear):
            total.append(2 * m.in_features * m.out_features)

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    model.train()
    for h in hooks:
        h.remove()
    return sum(total) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, ema = WRN28_2(), WRN28_2()
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    x, u1, u2 = (torch.rand(64, 3, 32, 32) for _ in range(3))
    y = torch.randint(0, 10, (64,))
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step(model, ema, opt, x, y, u1, u2)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times[args.warmup:])
    fwd = forward_gflops(model)
    flops = fwd * (128 + 64) + 3 * fwd * 192  # no-grad forwards + mixed forward/backward
    print(f"WRN-28-2 forward {fwd:.3f} GFLOP/image, step {flops:.1f} GFLOP")
    print(f"torch {torch.__version__}, {args.threads} threads: median step {sec:.3f} s, "
          f"{128 / sec:.1f} img/s (steps: {', '.join(f'{s:.3f}' for s in times[args.warmup:])})")


if __name__ == "__main__":
    main()
