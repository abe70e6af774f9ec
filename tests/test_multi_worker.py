"""fit under MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 ==
1 process on the same global batches, TF_CONFIG checks, the launcher, and a
killed worker (the survivor stops; a rerun resumes)."""

import inspect
import json
import os

import numpy as np
import pytest

from tfssl import distribute, testing

CASES = os.path.join(os.path.dirname(__file__), "multi_worker_cases.py")


def test_keras_behaviour_the_base_model_works_around_is_unchanged():
    # If a Keras upgrade changes either, revisit SSLModel._maybe_symbolic_build
    # and _make_function (tfssl/methods/base.py): they may become unneeded,
    # or wrong.
    from keras.src.backend.tensorflow import trainer

    build = inspect.getsource(trainer.TensorFlowTrainer._maybe_symbolic_build)
    assert "distribute_strategy.reduce" in build
    make = inspect.getsource(trainer.TensorFlowTrainer._make_function)
    assert "distribute_strategy.run(step_function" in make and "reduce_per_replica" in make
    for name in ("make_train_function", "make_test_function"):
        assert "self._make_function(self." in inspect.getsource(
            getattr(trainer.TensorFlowTrainer, name))
    reduce = inspect.getsource(trainer.reduce_per_replica)
    assert 'strategy.reduce("MEAN", v, axis=0)' in reduce
    # Keras's own multi-step loop (replaced for steps_per_execution > 1) and
    # the per-metric reads of get_metrics_result (packed under multi-worker).
    assert "iterator.get_next_as_optional()" in make and "self.steps_per_execution" in make
    from keras.src.trainers import trainer as base_trainer

    assert "metric.result()" in inspect.getsource(base_trainer.Trainer.get_metrics_result)
    # Keras resets each metric with assign(0), which reads the variable back
    # (SSLModel.reset_metrics zeroes the replicas' values instead).
    import keras

    assert "m.reset_state()" in inspect.getsource(base_trainer.Trainer.reset_metrics)
    assert "self.total.assign(0)" in inspect.getsource(keras.metrics.Mean.reset_state)


def test_per_device_datasets_are_built_without_autotune(monkeypatch):
    # distribute._per_device_datasets_without_autotune (applied by the
    # multi-worker strategy): the per-device stage of a MultiDeviceIterator
    # (what a distributed dataset's iterator feeds each device through) is
    # built with tf.data autotuning off, and still yields the elements. Its
    # autotuning thread made deleting the iterator wait up to 60 s.
    import tensorflow as tf
    from tensorflow.python.data.ops import multi_device_iterator_ops as mdi

    assert list(inspect.signature(mdi._create_device_dataset).parameters) == [
        "prototype_ds", "incarnation_id", "prefetch_buffer_size", "experimental_slack"]
    monkeypatch.setattr(mdi, "_create_device_dataset", mdi._create_device_dataset)
    built = []
    distribute._per_device_datasets_without_autotune()
    distribute._per_device_datasets_without_autotune()  # once is enough
    patched = mdi._create_device_dataset
    monkeypatch.setattr(mdi, "_create_device_dataset",
                        lambda *a, **k: built.append(patched(*a, **k)) or built[-1])
    it = mdi.OwnedMultiDeviceIterator(tf.data.Dataset.range(5), ["/cpu:0"])
    assert [int(it.get_next()[0]) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert len(built) == 1 and built[0].options().autotune.enabled is False
    assert distribute.without_autotune(tf.data.Dataset.range(2)).options().autotune.enabled is False


@pytest.mark.parametrize("replicas", [1, 2])
def test_packed_logs_unpack_to_the_same_logs(monkeypatch, replicas):
    # The multi-worker path of SSLModel._make_function (one packed tensor for
    # all scalar logs, averaged over the replicas inside the step) run in one
    # process: batch and epoch logs have the same names, order and values as
    # without packing, on 1 device and on 2 replicas (where a sum that is not
    # divided by the replica count would double them).
    import keras
    import tensorflow as tf

    strategy = (testing.mirrored_cpu_strategy(replicas) if replicas > 1
                else tf.distribute.get_strategy())

    def run(packed):
        if packed:
            monkeypatch.setattr(distribute, "is_multi_worker", lambda strategy=None: True)
        build, dataset = testing._load_case(f"{CASES}:supervised")()
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build()
        seen = []
        record = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda b, logs: seen.append(dict(logs)))
        history = model.fit(dataset, epochs=2, steps_per_epoch=3, verbose=0, callbacks=[record])
        monkeypatch.undo()
        return seen, history.history

    plain_batches, plain = run(False)
    packed_batches, packed = run(True)
    assert list(packed) == list(plain) and len(packed_batches) == len(plain_batches) == 6
    for a, b in zip(packed_batches, plain_batches):
        assert list(a) == list(b)
        np.testing.assert_allclose([float(v) for v in a.values()],
                                   [float(v) for v in b.values()], rtol=1e-6)
    for k in plain:
        np.testing.assert_allclose(packed[k], plain[k], rtol=1e-6)


def test_packed_epoch_metrics_equal_keras_reads(monkeypatch):
    # SSLModel.get_metrics_result's multi-worker path (every Mean's total and
    # count in one all-reduce), run in one process, gives Keras's values for
    # the train trackers and the (evaluated) test metrics alike.
    build, dataset = testing._load_case(f"{CASES}:supervised")()
    model = build()
    model.fit(dataset, epochs=1, steps_per_epoch=3, verbose=0)
    # (evaluate would reset the train trackers: update the test metrics here.)
    model.eval_loss.update_state([0.5, 0.9, 0.4])
    model.eval_top1.update_state([1, 2, 3], np.eye(10)[[1, 2, 4]])
    plain = {k: float(v) for k, v in model.get_metrics_result().items()}
    monkeypatch.setattr(distribute, "is_multi_worker", lambda strategy=None: True)
    packed = {k: float(v) for k, v in model.get_metrics_result().items()}
    assert list(packed) == list(plain) and len(plain) == 4
    assert all(v != 0 for v in plain.values())
    np.testing.assert_allclose(list(packed.values()), list(plain.values()), rtol=1e-6)


def test_multi_worker_reset_zeroes_every_replica_without_cross_replica_reads(monkeypatch):
    # SSLModel.reset_metrics's multi-worker path, run in one process on 2
    # mirrored replicas: every replica's total and count of every Mean are
    # zero afterwards, with no cross-replica reduce (Keras's path reads each
    # variable back, an eager all-reduce per variable under multi-worker).
    import tensorflow as tf

    strategy = testing.mirrored_cpu_strategy(2)
    build, dataset = testing._load_case(f"{CASES}:supervised")()
    with strategy.scope():
        model = build()
    model.fit(dataset, epochs=1, steps_per_epoch=3, verbose=0)
    rng = np.random.default_rng(0)
    test = tf.data.Dataset.from_tensor_slices(
        {"image": rng.uniform(0, 1, [8, 8, 8, 1]).astype("float32"),
         "label": rng.integers(0, 10, [8])}).batch(4)
    model.evaluate(test, verbose=0)  # (also resets the train trackers: update them here)
    tf.function(lambda: strategy.run(
        lambda: [m.update_state([1.0, 3.0]) for m in model._train_trackers]))()
    variables = [v for m in model.metrics for v in (m.total, m.count)]
    local = lambda: [float(x) for v in variables  # noqa: E731
                     for x in strategy.experimental_local_results(v.value)]
    counts = local()[2::4] + local()[3::4]  # [total r0, total r1, count r0, count r1] per Mean
    assert len(model.metrics) == 4 and all(counts)

    reduces = []
    extended = type(strategy.extended)
    reduce_to = extended._reduce_to
    monkeypatch.setattr(extended, "_reduce_to",
                        lambda self, *a, **k: reduces.append(1) or reduce_to(self, *a, **k))
    monkeypatch.setattr(distribute, "is_multi_worker", lambda strategy=None: True)
    model.reset_metrics()
    assert local() == [0.0] * 16 and reduces == []
    # Keras's path on the same model does read back (what the override avoids).
    monkeypatch.setattr(distribute, "is_multi_worker", lambda strategy=None: False)
    reduces.clear()
    model.reset_metrics()
    assert local() == [0.0] * 16 and len(reduces) >= 4


# Tolerances: PAWS's case uses tau = T = 0.5 (multi_worker_cases.paws). With
# the defaults 0.1 and 0.25 the sharpened soft nearest neighbours amplified
# float differences up to 7e-3 across workers on an Intel host, too close to
# what a distribution bug does (1e-2 and more); with 0.5 it matched at the
# default tolerances there. The margin below is for other hosts' kernels.
TOLERANCE = {"paws": dict(rtol=1e-3, atol=1e-4)}


@pytest.mark.parametrize("case", ["supervised", "sela", "mixmatch", "simmatch", "ascl", "paws",
                                  "ascl_steps_per_execution"])
def test_two_workers_match_one_process(case, tmp_path):
    one, workers = testing.assert_workers_match(f"{CASES}:{case}", num_workers=2, steps=3,
                                                log_dir=str(tmp_path),
                                                **TOLERANCE.get(case, {}))
    if case == "sela":
        labels = [k for k in one if k.endswith("labels")]
        assert labels and all((w[labels[0]] == one[labels[0]]).all() for w in workers)


THREAD_COUNT = """
import json, os, sys
import tensorflow as tf
from tfssl import distribute

def collective_threads():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{t}/comm").read().strip())
        except OSError:  # the thread ended
            pass
    return names.count("collective_ops")

strategy = distribute.make_strategy("multi_worker")
x = tf.ones([1000])
step = tf.function(lambda: strategy.run(
    lambda: tf.distribute.get_replica_context().all_reduce("SUM", x)))
for _ in range(5):
    step()
before = collective_threads()
for _ in range(40):
    step()
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
with open(os.path.join(sys.argv[1], f"threads{task}.json"), "w") as f:
    json.dump([before, collective_threads()], f)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc")
def test_collectives_do_not_leak_threads(tmp_path):
    # Upstream behaviour (TF 2.21): with CommunicationOptions(timeout_seconds=...)
    # every collective call left two "collective_ops" threads behind (80 here,
    # and 4 per training step). The library's multi-worker strategy must not.
    import sys

    from tfssl import launch

    script = tmp_path / "threads.py"
    script.write_text(THREAD_COUNT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    rc = launch.launch(2, [sys.executable, str(script), str(tmp_path)], str(tmp_path / "logs"),
                       threads_per_worker=1, stream_chief=False, timeout_s=120, env=env)
    assert rc == 0, (tmp_path / "logs" / "worker0.log").read_text()[-3000:]
    for task in (0, 1):
        before, after = json.loads((tmp_path / f"threads{task}.json").read_text())
        assert after - before <= 2, (task, before, after)


@pytest.mark.parametrize("raw,msg", [
    (None, "TF_CONFIG environment variable, which is not set"),
    ("{not json", "not valid JSON"),
    ('["a"]', "must be a JSON object"),
    ('{"task": {"type": "worker", "index": 0}}', "no 'cluster'"),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}',
     "'host:port'"),
    ('{"cluster": {"worker": ["h:1", "h:2"]}}', "no 'task'"),
    ('{"cluster": {"worker": ["h:1", "h:2"]}, "task": {"type": "worker", "index": 2}}',
     "index 2 is outside"),
    ('{"cluster": {"worker": ["h:1"]}, "task": {"type": "chief", "index": 0}}',
     "'chief' is not a job"),
    ('{"cluster": {"worker": ["h:1"], "ps": ["h:2"]}, "task": {"type": "worker", "index": 0}}',
     "uses only 'chief' and 'worker'"),
])
def test_bad_tf_config_is_a_clear_error(monkeypatch, raw, msg):
    if raw is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(ValueError, match=msg):
        distribute.parse_tf_config()
    from tfssl.train import ConfigError, TrainConfig, run

    with pytest.raises(ConfigError, match=msg):
        run(TrainConfig(strategy="multi_worker", workdir="/nonexistent/never-created"))


def test_good_tf_config_parses():
    cfg = {"cluster": {"chief": ["h:0"], "worker": ["h:1", "h:2"]}, "task": {"type": "worker",
                                                                           "index": 1}}
    assert distribute.parse_tf_config(json.dumps(cfg)) == cfg


def test_local_tf_configs():
    from tfssl import launch

    configs = launch.local_tf_configs(3)
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 3 and all(w.startswith("127.0.0.1:") for w in workers)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"] == configs[0]["cluster"] for c in configs)
    for c in configs:
        distribute.parse_tf_config(json.dumps(c))


def test_worker_cpus(monkeypatch):
    from tfssl import launch

    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: {0, 1, 2, 5}, raising=False)
    assert launch.worker_cpus(2, 1) == [[0], [1]]
    assert launch.worker_cpus(2, 2) == [[0, 1], [2, 5]]
    assert launch.worker_cpus(3, 2) is None  # not enough CPUs: no binding
    assert launch.worker_cpus(2, None) is None


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="binds workers to CPUs of their own (Linux, 2 or more CPUs)")
def test_launched_workers_are_bound_to_their_own_cpus(tmp_path):
    import sys

    from tfssl import launch

    show = ("import json, os, sys; i = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
            "open(os.path.join(sys.argv[1], f'cpus{i}'), 'w').write("
            "json.dumps([sorted(os.sched_getaffinity(0)), sys.argv[2:]]))")
    command = [sys.executable, "-c", show, str(tmp_path), "--a=1", "b"]
    assert launch.launch(2, command, str(tmp_path / "logs"), threads_per_worker=1,
                         stream_chief=False, timeout_s=60) == 0
    seen = [json.loads((tmp_path / f"cpus{i}").read_text()) for i in (0, 1)]
    assert [s[0] for s in seen] == launch.worker_cpus(2, 1)
    assert all(s[1] == ["--a=1", "b"] for s in seen)  # the command's own arguments
    assert launch.launch(2, command, str(tmp_path / "logs"), stream_chief=False, timeout_s=60) == 0
    assert all(json.loads((tmp_path / f"cpus{i}").read_text())[0]
               == sorted(os.sched_getaffinity(0)) for i in (0, 1))  # no threads given: unbound


@pytest.mark.parametrize("multi_worker", [True, False])
def test_a_lost_peer_is_a_clear_error_in_training_and_after(multi_worker):
    # tfssl.train._peer_loss (around fit, and around the final evaluation and
    # export): under multi-worker the collectives' abort becomes WorkerLost
    # with its first telling line and what to do; in one process it stays.
    import tensorflow as tf

    from tfssl import train

    message = ("{{function_node __wrapped__CollectiveReduceV2}} Collective ops is aborted by: "
               "x\nThe following tasks are unhealthy (stopped sending heartbeats):\nmore")
    with pytest.raises(train.WorkerLost if multi_worker else tf.errors.UnavailableError) as e:
        with train._peer_loss(multi_worker, "Rerun every worker."):
            raise tf.errors.UnavailableError(None, None, message)
    if multi_worker:
        assert str(e.value) == ("a worker of the cluster failed or became unreachable "
                                "({{function_node __wrapped__CollectiveReduceV2}} Collective ops "
                                "is aborted by: x). Rerun every worker.")
    with train._peer_loss(multi_worker, "-"):  # other errors pass through
        pass
    with pytest.raises(ValueError):
        with train._peer_loss(multi_worker, "-"):
            raise ValueError("not a peer")


def test_killed_worker_stops_the_other_and_a_rerun_resumes(tmp_path):
    import subprocess
    import sys
    import time

    from tfssl import launch

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tmp_path / "run"
    command = [sys.executable, os.path.join(root, "scripts", "train.py"),
               f"--flagfile={root}/flags/digits.cfg", "--epochs=3", "--steps_per_epoch=20",
               "--batch_size=16", "--eval_every=100", f"--workdir={workdir}", "--export_dir=",
               "--verbose=2", "--strategy=multi_worker"]
    scratch = tmp_path / "tmp"  # where non-chief workers put their outputs
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    procs, logs = launch.start(2, command, str(tmp_path / "logs"), threads_per_worker=1, env=env)
    try:
        meta = workdir / "backup" / "training_metadata.json"
        t0 = time.time()
        while not meta.exists():  # the chief backed up epoch 1
            assert procs[0].poll() is None and procs[1].poll() is None, "a worker died early"
            assert time.time() - t0 < 240, "no backup after 240 s"
            time.sleep(0.2)
        procs[1].kill()  # SIGKILL
        t1 = time.time()
        rc = procs[0].wait(timeout=120)
        assert rc != 0 and time.time() - t1 < 120
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f and f.close()
    chief_log = (tmp_path / "logs" / "worker0.log").read_text()
    assert "error: a worker of the cluster failed or became unreachable" in chief_log
    assert not (workdir / "summary.json").exists()
    left = sorted(p.name for p in scratch.glob("tfssl-*"))  # the killed worker's
    # A worker that cannot see the chief's backup (here: another --workdir, as on
    # a machine without the shared storage) is refused instead of going out of step.
    configs = launch.local_tf_configs(2)
    odd = [c.replace(f"--workdir={workdir}", f"--workdir={tmp_path / 'elsewhere'}")
           for c in command]
    mismatch = [subprocess.Popen(cmd, env=launch.worker_env(tf_config, 1, env),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for cmd, tf_config in zip((command, odd), configs)]
    outs = [p.communicate(timeout=180)[0] for p in mismatch]
    assert all(p.returncode != 0 for p in mismatch)
    assert "the workers resumed from different points" in outs[0] + outs[1]
    rc = launch.launch(2, command, str(tmp_path / "logs2"), threads_per_worker=1,
                       stream_chief=False, timeout_s=300, env=env)
    assert rc == 0, (tmp_path / "logs2" / "worker0.log").read_text()[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["epochs_completed"] == 3 and summary["global_steps"] == 3 * 20
    assert len(summary["history"]["loss_x"]) < 3  # the rerun resumed, not restarted
    # Only the chief wrote outputs; the other worker removed its scratch dir.
    assert sorted(p.name for p in scratch.glob("tfssl-*")) == left
    assert (workdir / "tensorboard").is_dir() and (workdir / "labeled_ids.json").exists()
