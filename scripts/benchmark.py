#!/usr/bin/env python
"""Benchmarks (never run as tests). Results are appended to BENCHMARKS.md.

Mode ``accuracy``: trains a method once per seed with scripts/train.py, reads
each run's summary.json, and appends one row per metric (mean / min / max over
seeds) with the commit, flagfile, flags and date:

    python scripts/benchmark.py --mode=accuracy --method=supervised \\
        --flagfile_to_run=flags/digits.cfg --seeds=0,1,2

Extra train.py flags go after ``--``:  ... --seeds=0,1,2 -- --epochs=50
"""

import datetime
import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_enum("mode", "accuracy", ["accuracy"], "What to measure.")
flags.DEFINE_string("method", "supervised", "Method to train.")
flags.DEFINE_string("flagfile_to_run", "flags/digits.cfg", "Flagfile for train.py.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one run each.")
flags.DEFINE_string("workroot", "runs/benchmark", "Where the runs' workdirs go.")
flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file the rows are appended to.")
flags.DEFINE_string("note", "", "Free text for the row (e.g. what the goal is).")
F = flags.FLAGS

HEADER = ("| date | commit | method | flagfile | extra flags | seeds | metric | mean | min | max "
          "| img/s (mean) | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")


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
    path = os.path.join(ROOT, F.output)
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("# tfssl benchmarks\n\nRows are appended by `scripts/benchmark.py`.\n\n"
                    "## Accuracy over seeds\n\n" + HEADER)
        f.writelines(rows)
    print("".join(rows))


def main(argv):
    extra = argv[1:]
    if F.mode == "accuracy":
        accuracy(extra)


if __name__ == "__main__":
    app.run(main)
