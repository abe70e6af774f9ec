#!/usr/bin/env python
"""Run scripts/train.py as N workers of a multi-worker cluster on this machine.

    python scripts/launch_local.py --num_workers=2 -- --flagfile=flags/digits.cfg

Everything after ``--`` goes to every worker's ``scripts/train.py``, with
``--strategy=multi_worker`` added; each worker gets a ``TF_CONFIG`` naming all
workers at 127.0.0.1 on free ports (worker 0 is the chief and writes the
outputs). Batch flags are global, as for one process. The chief's output is
shown here; the other workers' goes to ``<worker_logs>/worker<i>.log``. The exit
code is the first non-zero one of any worker (0 when all succeed).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("num_workers", 2, "Worker processes to start.")
flags.DEFINE_integer("threads_per_worker", 0,
                     "CPU threads per worker (0: TensorFlow's default, all cores each). When "
                     "the machine has num_workers x this many CPUs, each worker is also bound "
                     "to CPUs of its own.")
flags.DEFINE_string("worker_logs", "runs/launch_logs", "Where the non-chief workers' logs go.")
flags.DEFINE_float("timeout_s", 0, "Kill every worker after this many seconds (0: no limit).")
F = flags.FLAGS


def main(argv):
    from tfssl.launch import launch

    train_args = argv[1:]
    if any(a.startswith("--strategy") for a in train_args):
        raise app.UsageError("--strategy is set by the launcher (multi_worker); leave it out.")
    if F.num_workers < 1:
        raise app.UsageError(f"--num_workers must be >= 1, got {F.num_workers}.")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    command = [sys.executable, script, *train_args, "--strategy=multi_worker"]
    rc = launch(F.num_workers, command, F.worker_logs, threads_per_worker=F.threads_per_worker or None,
                timeout_s=F.timeout_s or None)
    if rc:
        print(f"launch_local: a worker exited with code {rc}; worker logs in {F.worker_logs}",
              file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    app.run(main)
