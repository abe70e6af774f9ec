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

Mode ``multi_worker``: the throughput step and a short digits run with
scripts/train.py, once in one process with ``--threads`` CPU threads and once
as ``--num_workers`` local workers (scripts/launch_local.py's machinery) with
``--threads / --num_workers`` threads each; also times one all-reduce of the
gradients' size between the workers (the collective share of a step):

    python scripts/benchmark.py --mode=multi_worker --method=supervised \
        --backbone=wrn28_2 --batch_size=64 --num_workers=2 --threads=2

``--norandom_step`` runs the digits part only; ``--digits_args`` passes flags to
it (e.g. ``--digits_args=--steps_per_execution=8``). The digits row's step and
img/s are over the whole ``fit`` (start-up and tracing included); its last
column gives the steady figures: the median ``epoch_seconds`` of the epochs
after the first, and the profile of a few steps.

Mode ``sinkhorn``: tfssl's Sinkhorn-Knopp against the official float64 NumPy
loop on random logits, for each of ``--sinkhorn_sizes``: iterations, seconds
per iteration of the first call (all-in: compilation, warm-up, kernel build,
labels) and of a repeat call at the same shape, the matrix GB/s beside a NumPy
copy's bandwidth measured in the same run, and whether the labels agree:

    python scripts/benchmark.py --mode=sinkhorn --sinkhorn_sizes=50000x128,200000x1000
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

flags.DEFINE_enum("mode", "accuracy", ["accuracy", "throughput", "sinkhorn", "multi_worker"],
                  "What to measure. multi_worker: one process with --threads threads vs "
                  "--num_workers local workers with --threads/--num_workers threads each, on "
                  "the throughput step (random tensors) and on a digits run.")
flags.DEFINE_list("sinkhorn_sizes", ["50000x128", "200000x1000"],
                  "sinkhorn: problems NxK (e.g. 1281167x3000 for full ImageNet).")
flags.DEFINE_integer("sinkhorn_official_iters", 1000,
                     "sinkhorn: cap on the official NumPy loop's iterations.")
flags.DEFINE_float("sinkhorn_lambda", 25.0, "sinkhorn: lambda.")
flags.DEFINE_float("sinkhorn_tol", 0.1, "sinkhorn: stopping tolerance.")
flags.DEFINE_string("backbone", "wrn28_2", "throughput: backbone.")
flags.DEFINE_integer("image_size", 32, "throughput: image side.")
flags.DEFINE_integer("channels", 3, "throughput: image channels.")
flags.DEFINE_string("norm", "batch", "throughput: backbone normalisation (ghost_batch: split BN).")
flags.DEFINE_integer("num_classes", 10, "throughput: classes.")
flags.DEFINE_integer("batch_size", 64, "throughput: labeled batch B.")
flags.DEFINE_integer("unlabeled_batch_size", 0, "throughput: unlabeled batch B_u.")
flags.DEFINE_integer("steps", 5, "throughput: timed steps.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "lars"],
                  "throughput: SGD momentum 0.9, or LARS (PAWS's; trust 0.001, wd 1e-6).")
flags.DEFINE_multi_string("method_arg", [], "throughput: a method argument NAME=VALUE "
                          "(Python literal), e.g. --method_arg=imgs_per_class=64.")
flags.DEFINE_integer("warmup", 3, "throughput: untimed warm-up steps.")
flags.DEFINE_string("method", "supervised", "Method to train.")
flags.DEFINE_string("flagfile_to_run", "flags/digits.cfg", "Flagfile for train.py.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one run each.")
flags.DEFINE_boolean("parallel_seeds", False,
                     "accuracy: run the seeds at the same time (img/s is then shared).")
flags.DEFINE_string("workroot", "runs/benchmark", "Where the runs' workdirs go.")
flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file the rows are appended to.")
flags.DEFINE_string("note", "", "Free text for the row (e.g. what the goal is).")
flags.DEFINE_string("strategy", "default", "throughput: default | multi_worker (TF_CONFIG).")
flags.DEFINE_string("result_json", "", "throughput: write the result here instead of a row.")
flags.DEFINE_integer("num_workers", 2, "multi_worker: worker processes.")
flags.DEFINE_integer("threads", 2, "multi_worker: CPU threads in all (split over the workers).")
flags.DEFINE_integer("digits_epochs", 5, "multi_worker: epochs of the digits run.")
flags.DEFINE_boolean("random_step", True, "multi_worker: also time the random-tensor step "
                     "(--backbone etc.), not only the digits run.")
flags.DEFINE_list("digits_args", [], "multi_worker: extra train.py flags of the digits run "
                  "(e.g. --sela_nopts=5).")
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
    summaries, runs = [], []
    for seed in F.seeds:
        workdir = os.path.join(F.workroot, f"{F.method}_{os.path.basename(F.flagfile_to_run)}_s{seed}")
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
               f"--flagfile={F.flagfile_to_run}", f"--method={F.method}", f"--seed={seed}",
               f"--workdir={workdir}", "--export_dir=", "--overwrite", *extra]
        print("$", " ".join(cmd), flush=True)
        runs.append((workdir, subprocess.Popen(cmd, cwd=ROOT)))
        if not F.parallel_seeds:
            runs[-1][1].wait()
    for workdir, proc in runs:
        if proc.wait():
            raise SystemExit(f"the run in {workdir} failed (exit {proc.returncode})")
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
    "sela": lambda b, b_u: 3 * b_u,  # forward+backward on the unlabeled view only
    # K=2 label-guess forwards (no gradient), then B + K*B_u mixed rows with gradient.
    "mixmatch": lambda b, b_u: 2 * b_u + 3 * (b + 2 * b_u),
    # One forward with gradient over labeled + weak + strong (online teacher).
    "simmatch": lambda b, b_u: 3 * (b + 2 * b_u),
    "fixmatch": lambda b, b_u: 3 * (b + 2 * b_u),
    # Query with gradient + key through the momentum encoder without.
    "ascl": lambda b, b_u: 4 * b_u,
    "moco": lambda b, b_u: 4 * b_u,
    "ascl_byol": lambda b, b_u: 4 * b_u,
    # PAWS: see _paws_step_flops (two resolutions).
}


def _paws_step_flops(model, batch, backbone, channels):
    """PAWS: forward+backward of every support view and both global views at
    the image size, and of the local crops at their size (counted on the same
    backbone built at that size)."""
    from tfssl import models
    from tfssl.models.flops import forward_flops

    def fwd(size):
        enc = models.encoder(models.get_backbone(backbone, (size, size, channels)),
                             (0.5,) * channels, (0.25,) * channels)
        return forward_flops(enc) + forward_flops(model.projector)

    sup, unl = batch["labeled"], batch["unlabeled"]
    total = 0
    for views in (sup, unl):
        for name, x in views.items():
            if name not in ("label", "index"):
                total += 3 * fwd(int(x.shape[1])) * int(x.shape[0])
    return total


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

    from tfssl import distribute

    strategy = distribute.make_strategy(F.strategy)  # before any op (multi-worker needs it)
    os_onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset")
    peak = _peak_gflops()
    shape = (F.image_size, F.image_size, F.channels)

    class _Source:  # what from_args needs
        num_classes = F.num_classes
        num_train, num_extra_unlabeled = 50_000, 0  # CIFAR-sized (SeLa's label table)
        train_labels = np.arange(50_000) % F.num_classes

    keras.utils.set_random_seed(0)
    with strategy.scope():
        encoder = models.encoder(models.get_backbone(F.backbone, shape, norm=F.norm),
                                 (0.5,) * F.channels,
                                 (0.25,) * F.channels)
        import ast

        from tfssl import optimizers
        extra = {}
        for item in F.method_arg:
            key, _, value = item.partition("=")
            extra[key] = ast.literal_eval(value)
        if getattr(methods.get(F.method), "needs_labeled_ids", False):
            extra["labeled_ids"] = np.arange(4000)  # a CIFAR-10 4000-label bank
        cls = methods.get(F.method)
        model = cls.from_args(encoder=encoder, source=_Source(), **extra)
        opt = (optimizers.LARS(0.1, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001)
               if F.optimizer == "lars" else keras.optimizers.SGD(0.01, momentum=0.9))
        model.compile(optimizer=opt)
    opts = dict(size=F.image_size, channels=F.channels, flip=True, pad=F.image_size // 8)
    lab_views, unl_views = cls.views(opts, **extra)
    support = cls.support_sampling(strategy.num_replicas_in_sync, **extra)
    b = F.batch_size
    if support is not None:  # PAWS: the support batch, class-interleaved labels
        b = support["classes_per_batch"] * support["imgs_per_class"]
    rng = np.random.default_rng(0)

    def fake(views, n, labels=None):
        out = {}
        for name, view in views.items():  # each view's own output size (multi-crop)
            vshape = tuple(view(tf.zeros(shape, tf.uint8)).shape)
            out[name] = tf.constant(rng.uniform(0, 1, (n,) + vshape).astype("float32"))
        out["label"] = tf.constant(rng.integers(0, F.num_classes, [n]) if labels is None
                                   else labels)
        out["index"] = tf.range(n, dtype=tf.int64)
        return out

    batch = {"labeled": fake(lab_views, b, None if support is None else
                             np.arange(b) % support["classes_per_batch"])}
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
    if F.method == "paws":
        step_flops = _paws_step_flops(model, batch, F.backbone, F.channels)
    else:
        step_flops = fwd * STEP_PASSES[F.method](F.batch_size, F.unlabeled_batch_size)
    images = b + F.unlabeled_batch_size
    mfu = step_flops / step_s / (peak * 1e9)
    if F.result_json:
        result = dict(step_s=step_s, steps_s=timer.times[F.warmup:], images_per_s=images / step_s,
                      labeled_batch=b,
                      peak_gflops=peak, mfu=mfu, step_gflops=step_flops / 1e9,
                      replicas=strategy.num_replicas_in_sync)
        if distribute.is_multi_worker(strategy):
            result["allreduce_s"] = _allreduce_seconds(strategy, model.trainable_variables)
            if not distribute.is_chief(strategy):
                return
        with open(F.result_json, "w") as f:
            json.dump(result, f)
        return
    row = (f"| {datetime.date.today()} | {_commit()} | {F.method} | {F.backbone} {F.image_size}px"
           f"{'' if F.norm == 'batch' else ' ' + F.norm}, "
           f"B={b}, B_u={F.unlabeled_batch_size}{', ' + F.optimizer if F.optimizer != 'sgd' else ''}"
           f"{''.join(', ' + a for a in F.method_arg)} | {step_flops / 1e9:.1f} G | "
           f"{step_s:.3f} s | {images / step_s:.1f} | {peak:.0f} GFLOP/s | {mfu:.2f} | "
           f"{os_onednn} | {F.note or '-'} |\n")
    _append("## Throughput (one training step, random tensors, fp32)", THROUGHPUT_HEADER, [row])
    print(row)


def _allreduce_seconds(strategy, variables, repeats=10):
    """Median time of one all-reduce of a gradient-sized float32 vector across
    the workers: the collective part of a data-parallel step."""
    import tensorflow as tf

    n = int(sum(np.prod(v.shape) for v in variables))
    x = tf.ones([n])

    @tf.function
    def reduce():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("SUM", x))

    reduce()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        strategy.experimental_local_results(reduce())[0].numpy()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


MULTI_WORKER_HEADER = (
    "| date | commit | method | workload | 1 process (threads) | N workers (threads each) "
    "| 1-process step / img/s | N-worker step / img/s | ratio | all-reduce of the gradients "
    "(share of the step) | note |\n|---|---|---|---|---|---|---|---|---|---|---|\n")


def multi_worker_bench():
    """One process with T threads against N local workers with T/N threads each."""
    import tempfile

    sys.path.insert(0, ROOT)
    from tfssl import launch

    out = tempfile.mkdtemp(prefix="tfssl-mw-bench-")
    per = max(1, F.threads // F.num_workers)
    me = [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py")]
    common = [f"--method={F.method}", f"--backbone={F.backbone}", f"--image_size={F.image_size}",
              f"--channels={F.channels}", f"--num_classes={F.num_classes}",
              f"--batch_size={F.batch_size}", f"--unlabeled_batch_size={F.unlabeled_batch_size}",
              f"--steps={F.steps}", f"--warmup={F.warmup}", f"--optimizer={F.optimizer}",
              "--mode=throughput", *[f"--method_arg={a}" for a in F.method_arg]]
    env1 = launch.worker_env({}, F.threads)
    env1.pop("TF_CONFIG")
    rows = []
    if F.random_step:
        one_json, many_json = os.path.join(out, "one.json"), os.path.join(out, "many.json")
        subprocess.run(me + common + [f"--result_json={one_json}"], check=True, env=env1, cwd=ROOT)
        rc = launch.launch(F.num_workers, me + common + ["--strategy=multi_worker",
                                                         f"--result_json={many_json}"],
                           os.path.join(out, "logs"), threads_per_worker=per, stream_chief=False)
        if rc:
            raise SystemExit(f"the workers failed (rc {rc}); logs in {out}/logs")
        one, many = json.load(open(one_json)), json.load(open(many_json))
        # Both steps against the one process's peak (2 threads: the machine);
        # the N-worker step does the same global batch's FLOPs.
        flops = (f"{one['step_gflops']:.1f} GFLOP a step, peak {one['peak_gflops']:.0f} GFLOP/s "
                 f"(1 process), MFU {one['mfu']:.2f} vs "
                 f"{one['step_gflops'] / many['step_s'] / one['peak_gflops']:.2f}, "
                 f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}; ")
        setup = (f"{F.backbone} {F.image_size}px B={one.get('labeled_batch', F.batch_size)} "
                 f"B_u={F.unlabeled_batch_size}"
                 f"{', ' + F.optimizer if F.optimizer != 'sgd' else ''}, random tensors")
        rows += [f"| {datetime.date.today()} | {_commit()} | {F.method} | {setup} | "
                 f"1 ({F.threads}) | {F.num_workers} ({per}) | "
                 f"{one['step_s']:.3f} s / {one['images_per_s']:.1f} | "
                 f"{many['step_s']:.3f} s / {many['images_per_s']:.1f} | "
                 f"{many['images_per_s'] / one['images_per_s']:.2f} | {many['allreduce_s']:.3f} s "
                 f"({many['allreduce_s'] / many['step_s']:.0%}) | {flops}{F.note or '-'} |\n"]
    # The digits run: scripts/train.py end to end (input pipeline included),
    # after the peak of this machine now (this process: all its threads).
    peak = _peak_gflops()
    flags_run = [f"--flagfile={os.path.join(ROOT, F.flagfile_to_run)}", f"--method={F.method}",
                 f"--epochs={F.digits_epochs}", "--eval_every=1000", "--export_dir=", "--verbose=0",
                 *F.digits_args]
    train = [sys.executable, os.path.join(ROOT, "scripts", "train.py")]
    profile = f"--profile_batches={PROFILED[0]},{PROFILED[1]}"
    subprocess.run(train + flags_run + [f"--workdir={out}/one", profile], check=True, env=env1,
                   cwd=ROOT)
    rc = launch.launch(F.num_workers, train + flags_run + [f"--workdir={out}/many",
                                                           "--strategy=multi_worker", profile],
                       os.path.join(out, "logs2"), threads_per_worker=per, stream_chief=False)
    if rc:
        raise SystemExit(f"the workers failed (rc {rc}); logs in {out}/logs2")
    a = json.load(open(f"{out}/one/summary.json"))
    b = json.load(open(f"{out}/many/summary.json"))
    steps = a["global_steps"]
    # Profiled batches are calls of the train function (--steps_per_execution
    # steps each, fewer at an epoch's end).
    n_prof = _steps_in_calls(PROFILED, steps // F.digits_epochs,
                             int(a["flags"].get("steps_per_execution") or 1))
    one_ms, _, _ = _profile(f"{out}/one/tensorboard", n_prof)
    many_ms, coll_ms, ops_ms = _profile(f"{out}/many/tensorboard", n_prof)
    # The same global batch per step: the steady-state throughput ratio is one_ms / many_ms.
    prof = "-" if many_ms is None or one_ms is None else (
        f"collectives {coll_ms:.1f} ms of {many_ms:.1f} ms ({coll_ms / many_ms:.0%}), other ops "
        f"{ops_ms:.1f} ms; 1 process {one_ms:.1f} ms: steady-state ratio "
        f"{one_ms / many_ms:.2f} (profiled)")
    # The epochs after the first (epoch_seconds: steps and epoch-end work, no
    # start-up, tracing or fit's teardown), median over the epochs.
    per_epoch = steps // F.digits_epochs
    one_ep, many_ep = (_steady_epoch(x) for x in (a, b))
    if one_ep and many_ep:
        gflops = _train_step_gflops(a)
        mfu = ("" if gflops is None else
               f", {gflops:.2f} GFLOP a step, MFU {gflops * per_epoch / one_ep / peak:.3f} vs "
               f"{gflops * per_epoch / many_ep / peak:.3f}")
        prof = (f"epochs 2-{F.digits_epochs}: {1e3 * one_ep / per_epoch:.1f} vs "
                f"{1e3 * many_ep / per_epoch:.1f} ms a step, ratio {one_ep / many_ep:.2f}"
                f"{mfu} (peak {peak:.0f} GFLOP/s, TF_ENABLE_ONEDNN_OPTS="
                f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}); " + prof)
    rows.append(
        f"| {datetime.date.today()} | {_commit()} | {F.method} | {F.flagfile_to_run}, "
        f"{F.digits_epochs} epochs{' ' + ' '.join(F.digits_args) if F.digits_args else ''}, "
        f"scripts/train.py | 1 ({F.threads}) | {F.num_workers} ({per}) | "
        f"{a['train_seconds'] / steps:.3f} s / {a['images_per_second']:.0f} | "
        f"{b['train_seconds'] / steps:.3f} s / {b['images_per_second']:.0f} | "
        f"{b['images_per_second'] / a['images_per_second']:.2f} | {prof} | {F.note or '-'} |\n")
    _append("## Multi-worker (local workers over loopback TCP)", MULTI_WORKER_HEADER, rows)
    print("".join(rows))
    import shutil

    shutil.rmtree(out, ignore_errors=True)


PROFILED = (5, 10)  # digits batches traced in both runs of multi_worker (the chief's trace)


def _train_step_gflops(summary):
    """Model GFLOPs of one training step of a train.py run (its flags, its
    model), counted as ``STEP_PASSES`` counts them; None for a method without
    a count (PAWS: its views are of two sizes)."""
    from tfssl import data, train
    from tfssl.models.flops import forward_flops

    if summary["method"] not in STEP_PASSES:
        return None
    cfg = train.TrainConfig(**summary["flags"])
    source = data.get_source(cfg.dataset, cfg.data_dir, cfg.manual_dir, cfg.image_size,
                             cfg.download)
    model, _ = train.build_model(cfg, source, labeled_ids=np.arange(summary["num_labeled"]))
    fwd = forward_flops(model.encoder) + (forward_flops(model.head)
                                          if getattr(model, "head", None) is not None else 0)
    return fwd * STEP_PASSES[cfg.method](cfg.batch_size, cfg.unlabeled_batch_size or 0) / 1e9


def _steady_epoch(summary):
    """Median ``epoch_seconds`` of a train.py summary's epochs after the first
    (None with fewer than 2 epochs)."""
    seconds = summary.get("history", {}).get("epoch_seconds", [])[1:]
    return float(np.median(seconds)) if seconds else None


def _steps_in_calls(calls, steps_per_epoch, steps_per_execution):
    """Training steps in the train-function calls ``calls = (first, last)``
    (1-based over the run), each epoch's calls being N, N, ..., the rest."""
    sizes = [min(steps_per_execution, steps_per_epoch - k)
             for k in range(0, steps_per_epoch, steps_per_execution)]
    return sum(sizes[(c - 1) % len(sizes)] for c in range(calls[0], calls[1] + 1))


def _profile(logdir, steps):
    """From a run's (the chief's) TensorFlow profile of ``steps`` training
    steps: (wall ms per step, ms per step inside cross-worker collective ops,
    ms per step in the other TensorFlow ops), or Nones without a profile.
    Collectives are CollectiveReduceV2 / GatherV2 / ...: the gradient
    all-reduce and the logs' reduction; a collective's time runs from its
    start to its completion, so it includes waiting for the slower worker.
    The other ops' time is thread time (ops may overlap)."""
    import glob

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        return None, None, None
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as f:
        space.ParseFromString(f.read())
    collective, ops, start, end = 0, 0, None, None
    for plane in space.planes:
        names = plane.event_metadata
        for line in plane.lines:
            for ev in line.events:
                name = names[ev.metadata_id].name
                if line.name.startswith("tf_Compute") or line.name.startswith("collective"):
                    t0 = line.timestamp_ns * 1000 + ev.offset_ps
                    start = t0 if start is None else min(start, t0)
                    end = t0 + ev.duration_ps if end is None else max(end, t0 + ev.duration_ps)
                if line.name.startswith("collective") and ":Collective" in name:
                    collective += ev.duration_ps
                elif (line.name.startswith("tf_Compute") and ":" in name
                      and "::" not in name and "Collective" not in name):  # "op:OpType"
                    ops += ev.duration_ps
    if start is None:
        return None, None, None
    return (end - start) / 1e9 / steps, collective / 1e9 / steps, ops / 1e9 / steps


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
        per_it = total / res.iterations
        # A repeat call at the same shape (what SeLa pays for every head after
        # the first and every later relabelling: compiled and traced already).
        # In place, the first call destroyed the input: no repeat.
        repeat = None
        if not in_place:
            t = time.perf_counter()
            res2 = sinkhorn(var, lam, tol)
            labels2 = res2.labels.numpy()
            repeat = (time.perf_counter() - t) / res2.iterations
            assert res2.iterations == res.iterations and np.array_equal(labels, labels2)
        # An iteration is two matvecs over the matrix (the second from cache
        # when the kernel blocks fit a core's L2: see tfssl/ops/sinkhorn.py).
        best = repeat or per_it
        gbps = 2 * nbytes / best / 1e9
        same = "-"
        if official is not None:
            o_labels, o_it, o_sec = official
            if o_it < F.sinkhorn_official_iters or o_it == res.iterations:
                same = f"{np.mean(o_labels == labels):.4f}"
            off = f"{o_sec:.4f} s ({o_it} it{'' if o_it < F.sinkhorn_official_iters else ', capped'})"
            speedup = f"{o_sec / per_it:.2f}x / " + (f"{o_sec / repeat:.2f}x" if repeat else "-")
        else:
            off, speedup = "does not fit (float64)", "-"
        rows.append(
            f"| {datetime.date.today()} | {_commit()} | {n}x{k} | {lam:g} | {tol:g} | "
            f"{res.iterations} | {per_it:.4f} s | {f'{repeat:.4f} s' if repeat else '-'} | "
            f"{total:.1f} s | {gbps:.1f} GB/s "
            f"({gbps / bw:.0%} of {bw:.1f}) | {off} | {speedup} | {same} | "
            f"{'in place' if in_place else 'copy'} | {F.note or '-'} |\n")
        print(rows[-1], flush=True)
        del var
        _append("## Sinkhorn-Knopp, first and repeat calls", SINKHORN_HEADER, rows[-1:])


SINKHORN_HEADER = (
    "| date | commit | N x K | lambda | tol | iterations | s / iteration, first call (all-in) "
    "| s / iteration, repeat call | total, first call "
    "| matrix GB/s, two reads per iteration (of copy bandwidth) "
    "| official float64 NumPy s / iteration | speed-up first / repeat "
    "| same labels | kernel | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def main(argv):
    extra = argv[1:]
    if F.mode == "accuracy":
        accuracy(extra)
    elif F.mode == "throughput":
        throughput()
    elif F.mode == "multi_worker":
        multi_worker_bench()
    else:
        sinkhorn_bench()


if __name__ == "__main__":
    app.run(main)
