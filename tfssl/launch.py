"""Start a multi-worker cluster of local processes (how one tries
``--strategy=multi_worker`` on a single machine, and how the tests run it).

Each worker is ``python <script> <args> --strategy=multi_worker`` with its own
``TF_CONFIG`` naming every worker at ``127.0.0.1:<free port>``. The chief's
(worker 0's) output is streamed; the others' goes to ``worker<i>.log`` files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence


def free_ports(n: int) -> List[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 right now."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def local_tf_configs(num_workers: int) -> List[Dict]:
    """One ``TF_CONFIG`` dict per worker of a cluster on 127.0.0.1."""
    if num_workers < 1:
        raise ValueError(f"--num_workers must be >= 1, got {num_workers}.")
    workers = [f"127.0.0.1:{p}" for p in free_ports(num_workers)]
    return [{"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
            for i in range(num_workers)]


def worker_env(tf_config: Dict, threads: Optional[int] = None,
               base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of one worker: ``TF_CONFIG`` and, if ``threads`` is set,
    TensorFlow's intra/inter-op and OpenMP thread counts."""
    env = dict(os.environ if base is None else base)
    env["TF_CONFIG"] = json.dumps(tf_config)
    if threads:
        for var in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
            env[var] = str(threads)
    return env


def worker_cpus(num_workers: int, threads: Optional[int]) -> Optional[List[List[int]]]:
    """The CPUs each worker is bound to: ``threads`` CPUs of its own, from the
    ones this process may use, when ``threads`` is set and enough CPUs exist;
    else None (no binding; Linux only).

    Measured on 2 cores, digits, 2 workers x 1 thread: bound, the steady epoch
    ran 0.61-0.86x the one-process speed, unbound 0.55-0.61x (4 interleaved
    pairs): each worker's input pipeline and collectives then stop competing
    for the other worker's core."""
    if not threads or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if num_workers * threads > len(cpus):
        return None
    return [cpus[i * threads:(i + 1) * threads] for i in range(num_workers)]


# Run by ``python -c``: binds itself to the CPUs in argv[1], then becomes the
# command in argv[2:] (the binding outlives exec; every thread TF starts inherits it).
_BIND = ("import os, sys; os.sched_setaffinity(0, [int(c) for c in sys.argv[1].split(',')]); "
         "os.execvp(sys.argv[2], sys.argv[2:])")


def start(num_workers: int, command: Sequence[str], log_dir: str,
          threads_per_worker: Optional[int] = None, pipe_chief: bool = False,
          env: Optional[Dict[str, str]] = None):
    """Starts the worker processes (see ``launch``) and returns
    ``(processes, open log files)``; the chief's output is a pipe if
    ``pipe_chief``, else ``<log_dir>/worker0.log``."""
    os.makedirs(log_dir, exist_ok=True)
    procs, logs = [], []
    bindings = worker_cpus(num_workers, threads_per_worker)
    for i, tf_config in enumerate(local_tf_configs(num_workers)):
        e = worker_env(tf_config, threads_per_worker, env)
        if bindings:
            command_i = [sys.executable, "-c", _BIND, ",".join(map(str, bindings[i])), *command]
        else:
            command_i = list(command)
        if i == 0 and pipe_chief:
            procs.append(subprocess.Popen(command_i, env=e, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, bufsize=1))
            logs.append(None)
        else:
            f = open(os.path.join(log_dir, f"worker{i}.log"), "w")
            logs.append(f)
            procs.append(subprocess.Popen(command_i, env=e, stdout=f, stderr=subprocess.STDOUT))
    return procs, logs


def launch(num_workers: int, command: Sequence[str], log_dir: str,
           threads_per_worker: Optional[int] = None, stream_chief: bool = True,
           timeout_s: Optional[float] = None, env: Optional[Dict[str, str]] = None) -> int:
    """Runs ``command`` (argv, e.g. ``[python, scripts/train.py, ...]``) as
    ``num_workers`` worker processes on 127.0.0.1 and waits for all of them.

    Args:
      num_workers: N worker processes; worker 0 is the chief.
      command: the argv every worker runs (``TF_CONFIG`` differs per worker).
      log_dir: where ``worker<i>.log`` files go (the chief's too, when not streamed).
      threads_per_worker: CPU threads each worker may use (None: TF's default);
        each worker is also bound to that many CPUs of its own when the
        machine has enough (``worker_cpus``).
      stream_chief: copy the chief's output to this process's stdout as it comes.
      timeout_s: kill every worker after this many seconds (exit code 124).
      env: the base environment (default: this process's).

    Returns:
      0 if every worker exited 0, else the first non-zero exit code in order of
      exit (a worker that fails first is the cause; the others usually fail after).
    """
    procs, logs = start(num_workers, command, log_dir, threads_per_worker, stream_chief, env)
    if stream_chief:
        _stream(procs[0])
    began, first_failure = time.time(), 0
    pending = set(range(num_workers))
    try:
        while pending:
            for i in sorted(pending):
                rc = procs[i].poll()
                if rc is not None:
                    pending.discard(i)
                    if rc != 0 and first_failure == 0:
                        first_failure = rc
            if timeout_s is not None and time.time() - began > timeout_s:
                for i in pending:
                    procs[i].kill()
                first_failure = first_failure or 124
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            if f is not None:
                f.close()
    return first_failure


def _stream(proc: subprocess.Popen) -> None:
    """Copies ``proc``'s output to stdout from a background thread."""
    import threading

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()

    threading.Thread(target=pump, daemon=True).start()
