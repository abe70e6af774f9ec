"""The end of a run is as safe as its middle (issue 25): a non-finite loss stops
the run with an error and keeps the last backup; a run stopped in its final
evaluation or export resumes there without training again; a finished run is
not trained again by accident; exports are replaced atomically."""

import csv
import glob
import json
import os

import keras
import numpy as np
import pytest

from tfssl import train
from tfssl.train import AlreadyFinished, NonFiniteLoss, TrainConfig, run


def _cfg(tmp_path, **kw):
    base = dict(workdir=str(tmp_path / "run"), export_dir=str(tmp_path / "sm"), epochs=2,
                steps_per_epoch=2, batch_size=16, strategy="default", verbose=0, knn_k=10)
    base.update(kw)
    return TrainConfig(**base)


def _logged_epochs(tmp_path):
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


class _Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


class _PoisonEpoch(keras.callbacks.Callback):
    """Makes every weight NaN when epoch ``epoch`` begins (after the backup of
    the epoch before), so that the next step's loss is NaN."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            for v in self.model.trainable_variables:
                v.assign(v * np.nan)


class _Killed(Exception):
    """Stands in for a kill -9 at a stage of the run's end."""


def test_a_nan_loss_stops_the_run_exports_nothing_and_keeps_the_backup(tmp_path):
    """Mutants: no _StopOnNonFiniteLoss (the run ends normally and exports NaN
    weights: no NonFiniteLoss); Keras's TerminateOnNaN in its place (fit ends
    normally, summary.json written); the backup deleted on the error."""
    cfg = _cfg(tmp_path)
    with pytest.raises(NonFiniteLoss, match=r"became nan in epoch 2, step 1 .*backup of epoch 1"):
        run(cfg, callbacks=[_PoisonEpoch(1)])
    meta = json.load(open(tmp_path / "run" / "backup" / "training_metadata.json"))
    assert meta["epoch"] == 1  # the last good epoch's backup is kept
    assert not os.path.exists(tmp_path / "sm") and not os.path.exists(
        tmp_path / "run" / "summary.json")
    # a rerun (here with the same, good, weights) resumes from the backup
    rec = _Record()
    summary = run(cfg, callbacks=[rec])
    assert rec.epochs == [1] and summary["global_steps"] == 4
    assert np.isfinite(summary["metrics"]["knn_top1"])
    assert _logged_epochs(tmp_path) == [0, 1]
    assert not os.path.exists(tmp_path / "run" / "backup")


@pytest.mark.parametrize("stage", ["final_evaluation", "export"])
def test_a_run_stopped_at_its_end_resumes_there_without_training_again(tmp_path, stage,
                                                                      monkeypatch):
    """A kill in the final evaluation or the export: the backup is still there,
    so the rerun trains no epoch, evaluates, exports, and logs each epoch once.
    Mutant: the backup deleted when fit returns (Keras's default
    ``delete_checkpoint=True``): the rerun trains epochs 0 and 1 again."""
    cfg = _cfg(tmp_path)

    def stop(name):
        if name == stage:
            raise _Killed(name)
    monkeypatch.setattr(train, "_stage", stop)
    with pytest.raises(_Killed):
        run(cfg)
    assert os.path.isdir(tmp_path / "run" / "backup")
    monkeypatch.setattr(train, "_stage", lambda name: None)
    rec = _Record()
    summary = run(cfg, callbacks=[rec])
    assert rec.epochs == []  # nothing trained again
    assert summary["global_steps"] == 4 and summary["epochs_completed"] == 2
    assert os.path.isfile(os.path.join(summary["export"]["encoder"], "saved_model.pb"))
    assert _logged_epochs(tmp_path) == [0, 1]
    assert len(summary["history"]["loss_x"]) == 2  # the whole run's history, from log.csv
    assert not os.path.exists(tmp_path / "run" / "backup")


def test_a_finished_run_is_not_trained_again_without_overwrite(tmp_path):
    """Mutant: no finished-run check (the rerun trains from scratch and log.csv
    gets epochs 0, 1, 0, 1)."""
    cfg = _cfg(tmp_path, export_dir=None)
    run(cfg)
    before = open(tmp_path / "run" / "summary.json").read()
    with pytest.raises(AlreadyFinished, match="holds a finished run.*--overwrite"):
        run(cfg)
    assert open(tmp_path / "run" / "summary.json").read() == before
    assert _logged_epochs(tmp_path) == [0, 1]
    rec = _Record()
    run(TrainConfig(**{**cfg.__dict__, "overwrite": True}), callbacks=[rec])
    assert rec.epochs == [0, 1] and _logged_epochs(tmp_path) == [0, 1]


def test_exports_are_replaced_atomically(tmp_path, monkeypatch):
    """While an export is written, the export path still holds the previous
    complete SavedModel; an export killed while writing leaves the previous one
    in place, and the next export clears what the killed one left. Mutant:
    ``write_out(path)`` in place (the writer's target is the live path)."""
    from tfssl import export, models

    enc = models.encoder(models.small_cnn((8, 8, 1), norm="none"), (0.5,), (0.25,))
    path = str(tmp_path / "encoder")
    export.export_encoder(enc, path)
    first = os.path.getmtime(os.path.join(path, "saved_model.pb"))
    archive_cls = type(keras.export.ExportArchive())  # the backend's class
    real = archive_cls.write_out
    seen = []

    def watching(self, target, *a, **k):
        seen.append((os.path.normpath(target),
                     os.path.isfile(os.path.join(path, "saved_model.pb"))))
        return real(self, target, *a, **k)
    monkeypatch.setattr(archive_cls, "write_out", watching)
    export.export_encoder(enc, path)
    assert seen and seen[0][0] != os.path.normpath(path) and seen[0][1]

    def killed(self, target, *a, **k):
        os.makedirs(os.path.join(target, "variables"))  # half written, no saved_model.pb
        raise _Killed("write_out")
    monkeypatch.setattr(archive_cls, "write_out", killed)
    with pytest.raises(_Killed):
        export.export_encoder(enc, path)
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    assert glob.glob(path + ".tmp-*")
    monkeypatch.setattr(archive_cls, "write_out", real)
    export.export_encoder(enc, path)
    assert os.path.getmtime(os.path.join(path, "saved_model.pb")) >= first
    assert not glob.glob(path + ".tmp-*") and not glob.glob(path + ".old-*")


def test_the_script_exits_nonzero_on_a_nan_loss(tmp_path):
    """Issue 25's run: digits with --learning_rate=1e6 (it logged loss_x: nan and
    exported NaN probabilities with exit code 0). Mutant: NonFiniteLoss not
    caught by scripts/train.py (a traceback, no "error:" line)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "train.py"), "--flagfile=flags/digits.cfg",
         "--learning_rate=1e6", "--epochs=10", "--steps_per_epoch=3", "--eval_every=100",
         "--verbose=0",
         f"--workdir={tmp_path}/run", f"--export_dir={tmp_path}/sm"],
        capture_output=True, text=True, timeout=300, cwd=root)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "error: the loss" in res.stderr and "nothing was exported" in res.stderr
    assert not os.path.exists(tmp_path / "sm")
    assert not os.path.exists(tmp_path / "run" / "summary.json")
    # (the backup kept is checked in-process above; when NaN comes depends on the host)
