"""The training program: bad input fails early and clearly, a run writes its
summary and exports, a killed run resumes at the next epoch."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfssl.train import TrainConfig, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tmp_path, **kw):
    base = dict(workdir=str(tmp_path / "run"), export_dir=str(tmp_path / "sm"), epochs=2,
                steps_per_epoch=3, batch_size=16, strategy="default", verbose=0, knn_k=10)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kw,msg", [
    (dict(method="nope"), "--method='nope' is unknown"),
    (dict(epochs=0), "--epochs must be a positive integer"),
    (dict(batch_size=-4), "--batch_size must be a positive integer"),
    (dict(labels_per_class=None), "exactly one of --labels_per_class and --label_fraction"),
    (dict(data_dir="/no/such/dir", dataset="cifar10"), "--data_dir='/no/such/dir' does not exist"),
    (dict(dataset="folder"), "--dataset=folder needs --data_dir"),
    (dict(optimizer="rmsprop"), "--optimizer='rmsprop' is not one of"),
    (dict(dataset="imagenet2012", download=True), "--manual_dir"),
    (dict(profile_batches=(3,)), "--profile_batches takes two batch numbers"),
    (dict(profile_batches=(3, 2)), "--profile_batches takes two batch numbers"),
    (dict(steps_per_execution=0), "--steps_per_execution must be a positive integer"),
])
def test_bad_flags_fail_in_validation(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        run(_cfg(tmp_path, **kw))
    assert not os.path.exists(tmp_path / "run")  # nothing started


def test_bad_data_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"--labels_per_class=500 is more than class"):
        run(_cfg(tmp_path, labels_per_class=500))
    with pytest.raises(ValueError, match="--dataset='no_such_set' is unknown"):
        run(_cfg(tmp_path, dataset="no_such_set"))
    with pytest.raises(ValueError, match=r"--batch_size=15 \(global\) does not divide by the 2"):
        run(_cfg(tmp_path, batch_size=15, strategy="mirrored", num_cpu_devices=2))
    os.makedirs(tmp_path / "one" / "only")
    with pytest.raises(ValueError, match="1 class subfolder"):
        run(_cfg(tmp_path, dataset="folder", data_dir=str(tmp_path / "one")))
    assert not os.path.exists(tmp_path / "run" / "summary.json")


def test_run_writes_summary_labeled_ids_and_exports(tmp_path):
    summary = run(_cfg(tmp_path, labels_per_class=3, profile_batches=(2, 3)))
    on_disk = json.load(open(tmp_path / "run" / "summary.json"))
    import glob
    assert glob.glob(str(tmp_path / "run" / "tensorboard" / "train" / "plugins" / "profile" /
                         "*" / "*.xplane.pb"))  # --profile_batches traced batches 2-3
    for key in ("method", "dataset", "num_labeled", "epochs_completed", "global_steps",
                "metrics", "train_seconds", "images_per_second", "export", "flags"):
        assert key in on_disk, key
    assert on_disk["num_labeled"] == 30 and on_disk["global_steps"] == 6
    assert on_disk["epochs_completed"] == 2
    assert set(on_disk["metrics"]) == {"test_top1", "knn_top1"}
    assert 0.0 <= on_disk["metrics"]["test_top1"] <= 1.0
    assert os.path.isfile(os.path.join(on_disk["export"]["encoder"], "saved_model.pb"))
    assert os.path.isfile(os.path.join(on_disk["export"]["classifier"], "saved_model.pb"))
    ids = json.load(open(tmp_path / "run" / "labeled_ids.json"))
    assert len(ids["indices"]) == 30 and np.bincount(ids["labels"]).tolist() == [3] * 10
    assert summary["history"]["knn_top1"] and summary["history"]["val_top1"]
    # each epoch's wall time (steps, evaluations, backup), in the logs too
    epoch_seconds = summary["history"]["epoch_seconds"]
    assert len(epoch_seconds) == 2 and all(0 < t < summary["train_seconds"] for t in epoch_seconds)
    assert sum(epoch_seconds) <= summary["train_seconds"]
    assert "epoch_seconds" in open(tmp_path / "run" / "log.csv").readline().split(",")


def test_run_under_mirrored_strategy_on_two_cpu_devices(tmp_path):
    summary = run(_cfg(tmp_path, strategy="mirrored", num_cpu_devices=2, epochs=1,
                       ema_decay=0.9))
    assert summary["replicas"] == 2 and summary["evaluated_weights"] == "ema"
    assert summary["global_steps"] == 3
    assert "val_top1" in summary["history"]


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill")


class _Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs, self.first_iteration = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)
        if self.first_iteration is None:
            self.first_iteration = int(self.model.optimizer.iterations.numpy())


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_a_killed_run_resumes_at_the_next_epoch(tmp_path, steps_per_execution):
    # With 2 steps per call an epoch of 3 steps is a call of 2 and one of 1.
    cfg = _cfg(tmp_path, epochs=3, export_dir=None, steps_per_execution=steps_per_execution)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, callbacks=[_Interrupt()])
    assert os.path.isdir(tmp_path / "run" / "backup")
    rec = _Record()
    summary = run(cfg, callbacks=[rec])
    assert rec.epochs == [1, 2]  # epoch 0 is not repeated
    assert rec.first_iteration == 3  # optimizer state (and its step count) restored
    assert summary["global_steps"] == 9 and summary["epochs_completed"] == 3


def test_script_reports_a_bad_flag_and_exits_nonzero(tmp_path):
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--method=nope",
         f"--workdir={tmp_path}/w"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode != 0
    assert "--method='nope' is unknown; available: [" in res.stderr and "'supervised'" in res.stderr


def test_export_run_rebuilds_a_finished_run(tmp_path):
    from tfssl.train import export_run

    run(_cfg(tmp_path, epochs=1, export_dir=None))
    paths = export_run(str(tmp_path / "run"), str(tmp_path / "again"))
    assert os.path.isfile(os.path.join(paths["classifier"], "saved_model.pb"))
    with pytest.raises(ValueError, match="no summary.json"):
        export_run(str(tmp_path / "nothing"))


def test_mixed_precision_run_and_the_policy_is_restored(tmp_path):
    summary = run(_cfg(tmp_path, epochs=1, mixed_precision=True, export_dir=None))
    assert summary["global_steps"] == 3
    assert keras.mixed_precision.dtype_policy().name == "float32"


def test_a_tfds_dataset_end_to_end_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=200):
        summary = run(_cfg(tmp_path, dataset="cifar10", backbone="small_cnn", epochs=1,
                           labels_per_class=2, steps_per_epoch=2))
    assert summary["num_labeled"] == 20 and summary["global_steps"] == 2
    assert summary["backbone"] == "small_cnn"
    assert os.path.isdir(summary["export"]["encoder"])


def test_deterministic_runs_reproduce_exactly(tmp_path):
    a = run(_cfg(tmp_path / "a", epochs=2, deterministic=True, export_dir=None, seed=3))
    b = run(_cfg(tmp_path / "b", epochs=2, deterministic=True, export_dir=None, seed=3))
    assert a["history"]["loss_x"] == b["history"]["loss_x"]
    assert a["metrics"] == b["metrics"]
    c = run(_cfg(tmp_path / "c", epochs=2, deterministic=True, export_dir=None, seed=4))
    assert c["history"]["loss_x"] != a["history"]["loss_x"]
