"""Test harness shared by every method's tests.

``assert_replicas_match`` trains the same model twice from the same
initialisation on the same global batches, once on one device and once under
``MirroredStrategy`` over N logical CPU devices, and checks that every weight
(trainable, non-trainable state such as queues and banks, optimizer slots) and
every metric in the fit logs is equal to float tolerance, and that mirrored
variables are identical on all replicas.

The process must have split its CPU into >= N logical devices before
TensorFlow initialised (``tfssl.distribute.configure_cpu_devices``; the test
suite's conftest does it).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf


def mirrored_cpu_strategy(num_replicas: int = 2) -> tf.distribute.MirroredStrategy:
    """MirroredStrategy over the first ``num_replicas`` logical CPU devices."""
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < num_replicas:
        raise RuntimeError(
            f"{num_replicas} logical CPU devices needed, {len(cpus)} configured: call "
            "tfssl.distribute.configure_cpu_devices before TensorFlow initialises.")
    return tf.distribute.MirroredStrategy([d.name for d in cpus[:num_replicas]],
                                          cross_device_ops=tf.distribute.ReductionToOneDevice())


def train_steps(build_model: Callable[[], keras.Model], dataset: tf.data.Dataset,
                strategy: tf.distribute.Strategy, steps: int, seed: int = 0, callbacks=()):
    """Builds (seeded) and compiles under ``strategy``, fits ``steps`` steps on
    ``dataset`` (global batches). Returns (model, {variable: value}, fit logs):
    the epoch's logs, and each step's as ``"step_<i>/<name>"`` (the running
    means callbacks see after step i)."""
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        model = build_model()
    per_step = {}

    class StepLogs(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            for k, v in (logs or {}).items():
                per_step[f"step_{batch}/{k}"] = float(np.asarray(v))

    history = model.fit(dataset.take(steps), epochs=1, steps_per_epoch=steps, verbose=0,
                        callbacks=list(callbacks) + [StepLogs()])
    logs = {k: v[-1] for k, v in history.history.items()}
    return model, snapshot(model, strategy), {**logs, **per_step}


def snapshot(model: keras.Model, strategy=None) -> Dict[str, np.ndarray]:
    """Every model and optimizer variable (in order); checks mirrored copies agree."""
    out = {}
    variables: List = list(model.weights)
    if model.optimizer is not None:
        variables += list(model.optimizer.variables)
    for v in variables:
        tv = getattr(v, "value", v)
        if strategy is not None and strategy.num_replicas_in_sync > 1:
            locals_ = [np.asarray(x) for x in strategy.experimental_local_results(tv)]
            for i, x in enumerate(locals_[1:], 1):
                np.testing.assert_allclose(
                    x, locals_[0], rtol=1e-5, atol=1e-6,
                    err_msg=f"{v.path}: replica {i} differs from replica 0")
        # Keyed by position plus the variable's own name (the last path
        # component): auto-named layers, models and optimizers (a
        # LossScaleOptimizer's inner one) get new unique names in each build.
        out[f"{len(out):04d}:{v.path.rsplit('/', 1)[-1]}"] = np.asarray(v.numpy())
    return out


def assert_replicas_match(build_model: Callable[[], keras.Model], dataset: tf.data.Dataset,
                          steps: int = 3, num_replicas: int = 2, rtol: float = 1e-4,
                          atol: float = 1e-5, seed: int = 0):
    """Asserts N-replica training == one-device training after ``steps`` steps.

    Args:
      build_model: returns a compiled model; called inside each strategy scope.
        Use synchronised BN (``norm="sync_batch"``) where the model has BN:
        per-replica BN statistics are a different algorithm.
      dataset: GLOBAL batches (batch size divisible by ``num_replicas``), the
        same every time it is iterated (no random augmentation).
    Returns:
      (one-device snapshot, N-replica snapshot) for further method checks.
    """
    _, one, one_logs = train_steps(build_model, dataset, tf.distribute.get_strategy(), steps,
                                   seed)
    _, many, many_logs = train_steps(build_model, dataset, mirrored_cpu_strategy(num_replicas),
                                     steps, seed)
    # fit logs are global-batch values, not replica 0's.
    assert set(one_logs) == set(many_logs)
    for k in one_logs:
        np.testing.assert_allclose(many_logs[k], one_logs[k], rtol=rtol, atol=atol,
                                   err_msg=f"logged {k}: {num_replicas} replicas != 1 device")
    assert set(one) == set(many), sorted(set(one) ^ set(many))
    for path in one:
        np.testing.assert_allclose(many[path], one[path], rtol=rtol, atol=atol,
                                   err_msg=f"{path}: {num_replicas} replicas != 1 device")
    return one, many


# --------------------------------------------------------------- multi-worker
def _load_case(case: str):
    """``path/to/file.py:function`` -> the function (loaded from the file)."""
    import importlib.util

    path, _, name = case.rpartition(":")
    spec = importlib.util.spec_from_file_location("_tfssl_multi_worker_case", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def run_case(case: str, strategy: tf.distribute.Strategy, steps: int, seed: int = 0):
    """Trains the case ``path.py:function`` (a function returning
    ``(build_model, dataset_of_global_batches)``) for ``steps`` steps under
    ``strategy``; returns (snapshot, fit logs)."""
    build_model, dataset, *rest = _load_case(case)()
    callbacks = rest[0]() if rest else ()
    _, snap, logs = train_steps(build_model, dataset, strategy, steps, seed, callbacks)
    return snap, logs


def assert_workers_match(case: str, num_workers: int = 2, steps: int = 3, rtol: float = 1e-4,
                         atol: float = 1e-5, timeout_s: float = 300, log_dir: str = None):
    """Asserts that ``num_workers`` worker processes on 127.0.0.1 under
    ``MultiWorkerMirroredStrategy`` train the case to the same weights, state
    and fit logs as this process on one device, on the same global batches.

    Args:
      case: ``"tests/file.py:function"``; the function returns
        ``(build_model, dataset)`` as for ``assert_replicas_match``, or
        ``(build_model, dataset, make_callbacks)``, and must
        be importable from a fresh process (deterministic data, seeded model).
      num_workers: worker processes (one CPU thread each).
    Returns:
      (one-process snapshot, list of the workers' snapshots).
    """
    import os
    import sys
    import tempfile

    from tfssl import launch

    out = tempfile.mkdtemp(prefix="tfssl-workers-")
    log_dir = log_dir or out
    command = [sys.executable, "-m", "tfssl.testing", case, str(steps), out]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    rc = launch.launch(num_workers, command, log_dir, threads_per_worker=1, stream_chief=False,
                       timeout_s=timeout_s, env=env)
    if rc:
        logs = "\n".join(f"--- worker{i}.log ---\n" + open(os.path.join(log_dir, f"worker{i}.log")).read()[-3000:]
                         for i in range(num_workers))
        raise AssertionError(f"a worker exited with code {rc}\n{logs}")
    one, one_logs = run_case(case, tf.distribute.get_strategy(), steps)
    workers = []
    for i in range(num_workers):
        with np.load(os.path.join(out, f"worker{i}.npz")) as z:
            snap = {k[2:]: z[k] for k in z.files if k.startswith("w:")}
            logs = {k[2:]: float(z[k]) for k in z.files if k.startswith("l:")}
        assert set(logs) == set(one_logs), (sorted(logs), sorted(one_logs))
        for k in one_logs:
            if "seconds" in k:  # timings are logged, not compared
                continue
            np.testing.assert_allclose(logs[k], one_logs[k], rtol=rtol, atol=atol,
                                       err_msg=f"logged {k}: worker {i} of {num_workers} != 1 process")
        assert set(snap) == set(one), sorted(set(snap) ^ set(one))
        for path in one:
            np.testing.assert_allclose(snap[path], one[path], rtol=rtol, atol=atol,
                                       err_msg=f"{path}: worker {i} of {num_workers} != 1 process")
        workers.append(snap)
    return one, workers


def mock_tfds(splits: Dict[str, int], image_size: Optional[Tuple[int, int]] = None,
              seed: int = 0):
    """A context manager under which every TFDS image-classification dataset
    (``tfds.builder(name)``, with its real features from TFDS's code and
    metadata) serves small synthetic splits through ``tfds.testing.mock_data``.

    Each split yields ``splits[name]`` examples with every feature the builder
    declares: ``image`` uint8 random noise ``[H, W, C]`` (the feature's shape;
    where it varies, as ImageNet's does, ``image_size`` (H, W) plus a few pixels
    that differ from image to image), ``label`` = example index mod the number
    of classes (balanced classes), or -1 in an ``unlabelled`` split (as STL-10's
    real one), and strings / zeros for the other features. A decoder that skips
    image decoding gets the PNG bytes. Asking for a split not in ``splits``
    raises, so a loader that reads the wrong split fails.

    Args:
      splits: split name -> number of examples, e.g. ``{"train": 20, "test": 4}``.
      image_size: (H, W) base size for features of unknown image shape.
      seed: seed of the pixels (the same for every run of a split).
    """
    import tensorflow_datasets as tfds

    def as_dataset(builder, split, decoders=None, read_config=None, shuffle_files=False):
        del read_config, shuffle_files
        name = str(split)
        if name not in splits:
            raise ValueError(f"mock {builder.name}: no split {name!r} (mocked: {sorted(splits)})")
        n = int(splits[name])
        feats = builder.info.features
        num_classes = int(feats["label"].num_classes)
        h, w, c = feats["image"].shape
        skip = isinstance((decoders or {}).get("image"), tfds.decode.SkipDecoding)

        def examples():
            for i in range(n):
                rng = np.random.default_rng([seed, i, sum(map(ord, name))])
                hi, wi = (h, w) if h else (image_size[0] + i % 5, image_size[1] + (3 * i) % 7)
                out = {}
                for key, feature in feats.items():
                    if key == "image":
                        out[key] = rng.integers(0, 256, [hi, wi, c], dtype=np.uint8)
                    elif key == "label":
                        out[key] = np.int64(-1 if name == "unlabelled" else i % num_classes)
                    elif feature.tf_dtype == tf.string:
                        out[key] = f"{builder.name}_{name}_{i}".encode()
                    else:
                        out[key] = np.zeros(feature.shape, feature.np_dtype)
                yield out

        signature = {k: tf.TensorSpec([None, None, c], tf.uint8) if k == "image" else
                     tf.TensorSpec(f.shape, f.tf_dtype) for k, f in feats.items()}
        ds = tf.data.Dataset.from_generator(examples, output_signature=signature)
        if skip:
            ds = ds.map(lambda e: {**e, "image": tf.io.encode_png(e["image"])})
        return ds.apply(tf.data.experimental.assert_cardinality(n))

    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def _worker_main(argv):
    """``python -m tfssl.testing CASE STEPS OUT``: one worker of
    ``assert_workers_match`` (TF_CONFIG from the launcher)."""
    import json
    import os

    case, steps, out = argv[1], int(argv[2]), argv[3]
    from tfssl import distribute

    strategy = distribute.make_strategy("multi_worker")
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    snap, logs = run_case(case, strategy, steps)
    arrays = {f"w:{k}": v for k, v in snap.items()}
    arrays.update({f"l:{k}": np.asarray(v) for k, v in logs.items()})
    np.savez(os.path.join(out, f"worker{task}.npz"), **arrays)


if __name__ == "__main__":
    import sys

    _worker_main(sys.argv)
