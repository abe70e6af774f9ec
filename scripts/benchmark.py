#!/usr/bin/env python
"""Benchmarks (never run as tests). Results are appended to BENCHMARKS.md.

Mode ``accuracy``: trains a method once per seed with scripts/train.py, reads
each run's summary.json, and appends one row per metric (mean / min / max over
seeds) with the commit, flagfile, flags and date:

    python scripts/benchmark.py --mode=accuracy --method=supervised \\
        --flagfile_to_run=flags/digits.cfg --seeds=0,1,2

Extra train.py flags go after ``--``:  ... --seeds=0,1,2 -- --epochs=50

Mode ``throughput``: one full training step (forward, loss, backward,
optimizer, state updates) on random in-memory tensors, median of ``--steps``
steps after ``--warmup`` steps; reports img/s, step seconds, model FLOPs per
step (convolutions and matmuls, backward = 2x forward), the peak (best of 5
fp32 4096x4096 matmuls, measured in the same process just before) and
MFU = FLOPs / step seconds / peak, as ../shared/PERFORMANCE.md defines them:

    python scripts/benchmark.py --mode=throughput --method=supervised \
        --backbone=wrn28_2 --image_size=32 --batch_size=64
"""

import datetime
import time
import json
import os
import subprocess
import sys

import numpy as np
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_enum("mode", "accuracy", ["accuracy", "throughput", "sinkhorn"], "What to measure.")
flags.DEFINE_list("sinkhorn_sizes", ["50000x128", "200000x1000"],
                  "sinkhorn: problems NxK (e.g. 1281167x3000 for full ImageNet).")
flags.DEFINE_integer("sinkhorn_official_iters", 1000,
                     "sinkhorn: cap on the official NumPy loop's iterations.")
flags.DEFINE_float("sinkhorn_lambda", 25.0, "sinkhorn: lambda.")
flags.DEFINE_float("sinkhorn_tol", 0.1, "sinkhorn: stopping tolerance.")
flags.DEFINE_string("backbone", "wrn28_2", "throughput: backbone.")
flags.DEFINE_integer("image_size", 32, "throughput: image side.")
flags.DEFINE_integer("channels", 3, "throughput: image channels.")
flags.DEFINE_integer("num_classes", 10, "throughput: classes.")
flags.DEFINE_integer("batch_size", 64, "throughput: labeled batch B.")
flags.DEFINE_integer("unlabeled_batch_size", 0, "throughput: unlabeled batch B_u.")
flags.DEFINE_integer("steps", 5, "throughput: timed steps.")
flags.DEFINE_integer("warmup", 3, "throughput: untimed warm-up steps.")
flags.DEFINE_string("method", "supervised", "Method to train.")
flags.DEFINE_string("flagfile_to_run", "flags/digits.cfg", "Flagfile for train.py.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one run each.")
flags.DEFINE_string("workroot", "runs/benchmark", "Where the runs' workdirs go.")
flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file the rows are appended to.")
flags.DEFINE_string("note", "", "Free text for the row (e.g. what the goal is).")
F = flags.FLAGS

HEADER = ("| date | commit | method | flagfile | extra flags | seeds | metric | mean | min | max "
          "| img/s (mean) | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")


THROUGHPUT_HEADER = ("| date | commit | method | setup | FLOPs/step | median step | img/s | peak "
                     "| MFU | TF_ENABLE_ONEDNN_OPTS | note |\n"
                     "|---|---|---|---|---|---|---|---|---|---|---|\n")


def _append(section: str, header: str, rows):
    """Adds ``rows`` at the end of ``section``'s table in --output (creating
    the file and the section as needed); text outside the tables is kept."""
    path = os.path.join(ROOT, F.output)
    text = open(path).read() if os.path.exists(path) else (
        "# tfssl benchmarks\n\nRows are appended by `scripts/benchmark.py`.\n")
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{header}"
    lines = text.splitlines(keepends=True)
    i = next(k for k, line in enumerate(lines) if line.strip() == section)
    j = i + 1
    while j < len(lines) and not lines[j].startswith("|"):
        j += 1
    while j < len(lines) and lines[j].startswith("|"):
        j += 1
    lines[j:j] = list(rows)
    with open(path, "w") as f:
        f.write("".join(lines))


def _commit():
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                      text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "tfssl", "scripts",
                                "flags"], cwd=ROOT).returncode
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def accuracy(extra):
    summaries = []
    for seed in F.seeds:
        workdir = os.path.join(F.workroot, f"{F.method}_{os.path.basename(F.flagfile_to_run)}_s{seed}")
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
               f"--flagfile={F.flagfile_to_run}", f"--method={F.method}", f"--seed={seed}",
               f"--workdir={workdir}", "--export_dir=", *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        with open(os.path.join(workdir, "summary.json")) as f:
            summaries.append(json.load(f))
    metrics = sorted(summaries[0]["metrics"])
    ips = np.mean([s["images_per_second"] for s in summaries])
    rows = []
    for m in metrics:
        vals = np.array([s["metrics"][m] for s in summaries])
        rows.append(
            f"| {datetime.date.today()} | {_commit()} | {F.method} | {F.flagfile_to_run} | "
            f"{' '.join(extra) or '-'} | {','.join(F.seeds)} | {m} | {vals.mean():.4f} | "
            f"{vals.min():.4f} | {vals.max():.4f} | {ips:.0f} | {F.note or '-'} |\n")
    _append("## Accuracy over seeds", HEADER, rows)
    print("".join(rows))


# Forward-equivalent image passes per step, for the FLOP count: a forward with
# gradient counts 3 (backward = 2x forward), one without counts 1.
STEP_PASSES = {
    "supervised": lambda b, b_u: 3 * b,
}


def _peak_gflops():
    import tensorflow as tf

    a = tf.random.normal([4096, 4096])
    b = tf.random.normal([4096, 4096])
    mm = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    mm()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mm().numpy()
        best = min(best, time.perf_counter() - t)
    return 2 * 4096 ** 3 / best / 1e9


def throughput():
    import keras
    import tensorflow as tf

    from tfssl import methods, models
    from tfssl.models.flops import forward_flops

    os_onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset")
    peak = _peak_gflops()
    shape = (F.image_size, F.image_size, F.channels)

    class _Source:  # what from_args needs
        num_classes = F.num_classes

    keras.utils.set_random_seed(0)
    encoder = models.encoder(models.get_backbone(F.backbone, shape), (0.5,) * F.channels,
                             (0.25,) * F.channels)
    model = methods.get(F.method).from_args(encoder=encoder, source=_Source())
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    opts = dict(size=F.image_size, channels=F.channels, flip=True, pad=F.image_size // 8)
    lab_views, unl_views = methods.get(F.method).views(opts)
    rng = np.random.default_rng(0)

    def fake(views, n):
        out = {name: tf.constant(rng.uniform(0, 1, (n,) + shape).astype("float32"))
               for name in views}
        out["label"] = tf.constant(rng.integers(0, F.num_classes, [n]))
        out["index"] = tf.range(n, dtype=tf.int64)
        return out

    batch = {"labeled": fake(lab_views, F.batch_size)}
    if unl_views and F.unlabeled_batch_size:
        batch["unlabeled"] = fake(unl_views, F.unlabeled_batch_size)
    ds = tf.data.Dataset.from_tensors(batch).repeat()

    class Timer(keras.callbacks.Callback):
        times = []

        def on_train_batch_begin(self, b, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, b, logs=None):
            {k: float(v) for k, v in (logs or {}).items()}  # wait for the step
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    model.fit(ds, epochs=1, steps_per_epoch=F.warmup + F.steps, verbose=0, callbacks=[timer])
    step_s = float(np.median(timer.times[F.warmup:]))
    fwd = forward_flops(model.encoder) + (forward_flops(model.head)
                                          if getattr(model, "head", None) is not None else 0)
    step_flops = fwd * STEP_PASSES[F.method](F.batch_size, F.unlabeled_batch_size)
    images = F.batch_size + F.unlabeled_batch_size
    mfu = step_flops / step_s / (peak * 1e9)
    row = (f"| {datetime.date.today()} | {_commit()} | {F.method} | {F.backbone} {F.image_size}px, "
           f"B={F.batch_size}, B_u={F.unlabeled_batch_size} | {step_flops / 1e9:.1f} G | "
           f"{step_s:.3f} s | {images / step_s:.1f} | {peak:.0f} GFLOP/s | {mfu:.2f} | "
           f"{os_onednn} | {F.note or '-'} |\n")
    _append("## Throughput (one training step, random tensors, fp32)", THROUGHPUT_HEADER, [row])
    print(row)


def _copy_bandwidth():
    """GB/s of a large NumPy copy (bytes read + written), best of 3."""
    a = np.random.default_rng(0).random(100_000_000 // 8)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(3))
    return 2 * a.nbytes / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _official_numpy(log_p, lam, tol, max_iters):
    """The official SeLa loop: float64, linear space. Returns (labels, iterations, s/iter)."""
    p = log_p.T.astype(np.float64)  # [K, N], one float64 buffer, worked in place
    np.exp(p, out=p)
    p **= lam
    k, n = p.shape
    r, c = np.ones(k) / k, np.ones(n) / n
    err, it, t = np.inf, 0, time.perf_counter()
    while err > tol and it < max_iters:
        r = (1 / k) / (p @ c)
        c_new = (1 / n) / (r @ p)
        if it % 10 == 0:
            err = np.nansum(np.abs(c / c_new - 1))
        c = c_new
        it += 1
    sec = (time.perf_counter() - t) / it
    p *= r[:, None]
    return np.nanargmax(p, 0), it, sec


def sinkhorn_bench():
    import tensorflow as tf

    from tfssl.ops.sinkhorn import sinkhorn, write_rows

    bw = _copy_bandwidth()
    lam, tol = F.sinkhorn_lambda, F.sinkhorn_tol
    rows = []
    sizes = [(int(a), int(b)) for a, b in (x.split("x") for x in F.sinkhorn_sizes)]
    for n, k in sizes:
        var = tf.Variable(tf.zeros([n, k]), trainable=False)
        for s0 in range(0, n, 65536):  # random logits, filled in chunks
            e = min(s0 + 65536, n)
            write_rows(var, s0, tf.nn.log_softmax(
                3.0 * tf.random.stateless_normal([e - s0, k], seed=[s0, 1])))
        nbytes = n * k * 4
        in_place = 3 * nbytes > 20e9  # input + kernel would not fit in 24 GiB
        official = None
        if n * k * 12 < 12e9:  # the float64 buffer (beside the float32 input) fits
            host = var.numpy()
            official = _official_numpy(host, lam, tol, F.sinkhorn_official_iters)
            del host
        sinkhorn(var[:2000] if n * k < 1e9 else tf.zeros([2000, k]), lam, tol, max_iters=12)
        t = time.perf_counter()
        res = sinkhorn(var, lam, tol, overwrite=in_place)
        labels = res.labels.numpy()
        total = time.perf_counter() - t
        # After the log warm-up, an iteration reads the matrix twice (two matvecs).
        per_it = total / res.iterations
        gbps = 2 * nbytes / per_it / 1e9
        same = "-"
        if official is not None:
            o_labels, o_it, o_sec = official
            if o_it < F.sinkhorn_official_iters or o_it == res.iterations:
                same = f"{np.mean(o_labels == labels):.4f}"
            off = f"{o_sec:.3f} s ({o_it} it{'' if o_it < F.sinkhorn_official_iters else ', capped'})"
            speedup = f"{o_sec / per_it:.2f}x"
        else:
            off, speedup = "does not fit (float64)", "-"
        rows.append(
            f"| {datetime.date.today()} | {_commit()} | {n}x{k} | {lam:g} | {tol:g} | "
            f"{res.iterations} | {per_it:.4f} s | {total:.1f} s | {gbps:.1f} GB/s "
            f"({gbps / bw:.0%} of {bw:.1f}) | {off} | {speedup} | {same} | "
            f"{'in place' if in_place else 'copy'} | {F.note or '-'} |\n")
        print(rows[-1], flush=True)
        del var
        _append("## Sinkhorn-Knopp (SeLa relabelling)", SINKHORN_HEADER, rows[-1:])


SINKHORN_HEADER = (
    "| date | commit | N x K | lambda | tol | iterations | s / iteration (all-in) | total "
    "| matrix GB/s (of copy bandwidth) | official float64 NumPy s / iteration | speed-up "
    "| same labels | kernel | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def main(argv):
    extra = argv[1:]
    if F.mode == "accuracy":
        accuracy(extra)
    elif F.mode == "throughput":
        throughput()
    else:
        sinkhorn_bench()


if __name__ == "__main__":
    app.run(main)
