"""The training program: bad input fails early and clearly, a run writes its
summary and exports, a killed run resumes at the next epoch."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfssl.train import ConfigError, TrainConfig, run

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
    (dict(weight_decay_form="l2"), "--weight_decay_form='l2' is not one of"),
    (dict(optimizer="lars", weight_decay_form="decoupled"), "--optimizer=lars takes "
     "--weight_decay_form=coupled"),
    (dict(optimizer="adamw", weight_decay_form="coupled"), "--optimizer=adamw is Adam with "
     "decoupled decay"),
    (dict(momentum=1.0), r"--momentum must be in \[0, 1\)"),
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
    """(Also: summary.json states the coupled decay and plain momentum that
    ran. Mutant: no "optimizer" entry in summary.json.)"""
    summary = run(_cfg(tmp_path, strategy="mirrored", num_cpu_devices=2, epochs=1,
                       ema_decay=0.9, weight_decay_form="coupled", nesterov=False))
    assert summary["replicas"] == 2 and summary["evaluated_weights"] == "ema"
    assert summary["global_steps"] == 3
    assert "val_top1" in summary["history"]
    on_disk = json.load(open(tmp_path / "run" / "summary.json"))
    assert on_disk["optimizer"] == {
        "name": "sgd", "learning_rate": 0.03, "lr_schedule": "cosine", "weight_decay": 5e-4,
        "weight_decay_form": "coupled", "weight_decay_excludes": ["bias", "gamma", "beta"],
        "momentum": 0.9, "nesterov": False}


def _built_optimizer(**kw):
    from tfssl.train import _optimizer

    cfg = TrainConfig(**{"epochs": 1, **kw})
    cfg.validate()
    return _optimizer(cfg, steps_per_epoch=10)


@pytest.mark.parametrize("kw,form", [
    (dict(), "decoupled"),  # today's default: Keras's decoupled decay
    (dict(weight_decay_form="coupled"), "coupled"),
    (dict(weight_decay_form="coupled", nesterov=False), "coupled"),
    (dict(optimizer="adam"), "decoupled"),
    (dict(optimizer="adam", weight_decay_form="coupled"), "coupled"),
    (dict(optimizer="adamw"), "decoupled"),
    (dict(optimizer="lars", nesterov=False), "coupled"),
    (dict(optimizer="lars", weight_decay_form="coupled"), "coupled"),
])
def test_optimizer_has_the_flags_decay_form_and_nesterov(kw, form):
    """The optimizer built from the flags applies ``--weight_decay`` in
    ``--weight_decay_form`` (unset: LARS coupled, the others decoupled) with
    ``--nesterov``, biases and BN excluded, and ``summary.json``'s entry says
    so. Measured on one step from w = 1, g = 0 (momentum empty), lr 0.1: a
    decayed kernel moves by lr * wd (both forms: first step), a bias not at
    all; and on a second step with g = 0 where the forms differ (coupled:
    momentum carries the first decay).

    Mutants: ``_optimizer`` ignoring the form (SGD coupled built as Keras's
    decoupled SGD); Adam without decay (today's ``Adam(lr)``); LARS without
    ``--nesterov``; biases decayed."""
    from tfssl import optimizers
    from tfssl.train import optimizer_summary

    wd = 0.01
    base = dict(learning_rate=0.1, lr_schedule="constant", weight_decay=wd, momentum=0.9)
    opt = _built_optimizer(**{**base, **kw})
    cfg = TrainConfig(**{**base, **kw})
    assert optimizer_summary(cfg)["weight_decay_form"] == form
    assert optimizer_summary(cfg).get("nesterov", cfg.nesterov) == cfg.nesterov
    if cfg.optimizer in ("sgd", "lars"):
        assert opt.nesterov == cfg.nesterov
    kernel = keras.Variable(np.full((4, 4), 1.0, "float32"), name="kernel")
    bias = keras.Variable(np.ones(4, "float32"), name="bias")
    zeros = [np.zeros((4, 4), "float32"), np.zeros(4, "float32")]
    if cfg.optimizer == "lars":
        # zero gradient: LARS leaves the weights (suncet); check a real step instead
        assert isinstance(opt, optimizers.LARS) and opt.lars_weight_decay == wd
        return
    opt.apply(zeros, [kernel, bias])
    np.testing.assert_allclose(bias.numpy(), 1.0)
    if cfg.optimizer == "sgd":
        np.testing.assert_allclose(kernel.numpy(), 1.0 - 0.1 * wd * (1.9 if cfg.nesterov
                                                                     and form == "coupled"
                                                                     else 1.0), rtol=1e-6)
        w1 = float(kernel.numpy()[0, 0])
        opt.apply(zeros, [kernel, bias])
        if form == "coupled":  # v = 0.9 v1 + wd w1: the first decay carried by the momentum
            v1 = wd * 1.0
            v2 = 0.9 * v1 + wd * w1
            step = (wd * w1 + 0.9 * v2) if cfg.nesterov else v2
            want = w1 - 0.1 * step
        else:  # decoupled: w - lr wd w, and Keras's buffer holds no decay
            want = w1 * (1 - 0.1 * wd)
        np.testing.assert_allclose(kernel.numpy()[0, 0], want, rtol=1e-6)
    else:  # Adam and AdamW: the kernel decays, the bias not
        assert float(kernel.numpy()[0, 0]) < 1.0


@pytest.mark.parametrize("optimizer,form", [("sgd", "coupled"), ("sgd", "decoupled"),
                                            ("adam", "coupled"), ("lars", "coupled")])
def test_weight_decay_exclude_empty_decays_every_parameter(optimizer, form):
    """``--weight_decay_exclude=`` (empty): the official ASCL, SimMatch-ImageNet
    and self-label codes decay every parameter (``SGD(model.parameters(),
    weight_decay=wd)``); the default excludes biases and BN's gamma / beta.
    One step from w = 1, g = 0: the bias moves by exactly what the kernel
    moves (LARS: a non-zero gradient, the bias is then adapted like a kernel).

    Mutants: ``_optimizer`` passing the default exclude list whatever the flag
    (the bias stays at 1); ``summary.json`` still naming the default list."""
    from tfssl.train import optimizer_summary

    kw = dict(optimizer=optimizer, weight_decay_form=form, learning_rate=0.1,
              lr_schedule="constant", weight_decay=0.01, momentum=0.9, nesterov=False)
    for exclude in ((), ("bias", "gamma", "beta")):
        cfg = TrainConfig(**kw, weight_decay_exclude=exclude)
        assert optimizer_summary(cfg)["weight_decay_excludes"] == list(exclude)
        opt = _built_optimizer(**kw, weight_decay_exclude=exclude)
        kernel = keras.Variable(np.ones((4, 4), "float32"), name="kernel")
        bias = keras.Variable(np.ones(4, "float32"), name="bias")
        g = 0.5 if optimizer == "lars" else 0.0
        opt.apply([np.full((4, 4), g, "float32"), np.full(4, g, "float32")], [kernel, bias])
        moved_k, moved_b = 1 - float(kernel.numpy()[0, 0]), 1 - float(bias.numpy()[0])
        assert moved_k > 0
        if exclude:
            assert moved_b != pytest.approx(moved_k, rel=1e-3)
        else:
            assert moved_b == pytest.approx(moved_k, rel=1e-5)


def _lr_at(cfg, steps_per_epoch, ks):
    from tfssl.train import _learning_rate

    lr = _learning_rate(cfg, steps_per_epoch)
    return np.array([float(lr(k)) for k in ks])


def test_step_schedule_is_self_labels_epoch_wise_drop():
    """``--lr_schedule=step --lr_step_epochs=240,320``: self-label's CIFAR
    ``adjust_learning_rate`` at 400 epochs, ``lr 0.1^((epoch - 160) // 80)``
    from epoch 160, set at the start of each epoch; and its ImageNet lambda,
    ``lr 0.1^(epoch // 150)`` below epoch 350, ``lr 0.1^3`` from it. Both
    evaluated here from those formulas for every optimizer step ``k`` (Keras
    calls the schedule with the step count before the update), epoch k // spe.

    Mutants: boundaries at ``e * spe`` (the first step of epoch 240 keeps the
    old rate); the factor applied once too often; epochs counted from 1."""
    spe = 3
    cfg = TrainConfig(epochs=400, lr_schedule="step", lr_step_epochs=(240, 320), learning_rate=0.03)
    cfg.validate()
    ks = np.arange(400 * spe)
    epoch = ks // spe
    want = np.where(epoch >= 160, 0.03 * 0.1 ** ((epoch - 160) // 80), 0.03)
    np.testing.assert_allclose(_lr_at(cfg, spe, ks), want, rtol=1e-6)

    cfg = TrainConfig(epochs=401, lr_schedule="step", lr_step_epochs=(150, 300, 350),
                      learning_rate=0.08)
    ks = np.arange(401 * 2)
    epoch = ks // 2
    want = (epoch < 350) * 0.08 * 0.1 ** (epoch // 150) + (epoch >= 350) * 0.08 * 0.1 ** 3
    np.testing.assert_allclose(_lr_at(cfg, 2, ks), want, rtol=1e-6)


@pytest.mark.parametrize("warmup", [0, 2])
def test_partial_cosine_is_usbs_schedule(warmup):
    """``--lr_schedule=partial_cosine``: USB's ``get_cosine_schedule_with_warmup``
    (``num_cycles = 7/16``): ``k / W`` during a warm-up of W steps, then
    ``max(0, cos(pi 7/16 (k - W) / (K - W)))``, times the peak (FixMatch's
    ``eta cos(7 pi k / 16 K)`` at W = 0). Ends at cos(7 pi / 16) = 0.195 of the
    peak, not at 0.

    Mutants: the full cosine (0.5 (1 + cos(pi p))); the fraction ignored (f = 1/2);
    the warm-up's progress counted from step 0."""
    spe, epochs = 5, 8
    cfg = TrainConfig(epochs=epochs, lr_schedule="partial_cosine", learning_rate=0.03,
                      warmup_epochs=warmup)
    cfg.validate()
    K, W = epochs * spe, warmup * spe
    ks = np.arange(K)
    want = np.where(ks < W, ks / max(1, W),
                    np.maximum(0.0, np.cos(np.pi * 7 / 16 * (ks - W) / (K - W)))) * 0.03
    np.testing.assert_allclose(_lr_at(cfg, spe, ks), want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kw,needle", [
    (dict(lr_schedule="step"), "--lr_step_epochs"),
    (dict(lr_schedule="step", lr_step_epochs=(20, 10)), "increasing"),
    (dict(lr_schedule="step", lr_step_epochs=(30,)), "[1, --epochs=30)"),
    (dict(lr_schedule="step", lr_step_epochs=(10,), lr_step_factor=1.0), "--lr_step_factor"),
    (dict(lr_schedule="step", lr_step_epochs=(10,), warmup_epochs=2), "--warmup_epochs=0"),
    (dict(lr_step_epochs=(10,)), "is for --lr_schedule=step"),
    (dict(lr_schedule="partial_cosine", lr_cosine_fraction=0.0), "--lr_cosine_fraction"),
])
def test_schedule_flags_are_checked(kw, needle):
    """Bad schedule flags fail in ``validate`` naming the flag (mutant: a step
    list accepted unsorted, silently dropping a decay)."""
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw).validate()
    assert needle in str(e.value)


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


@pytest.mark.parametrize("steps_per_execution,form", [(1, None), (2, "coupled")])
def test_a_killed_run_resumes_at_the_next_epoch(tmp_path, steps_per_execution, form):
    # With 2 steps per call an epoch of 3 steps is a call of 2 and one of 1.
    # (The coupled case restores tfssl's own SGD and its momentum.)
    cfg = _cfg(tmp_path, epochs=3, export_dir=None, steps_per_execution=steps_per_execution,
               weight_decay_form=form)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, callbacks=[_Interrupt()])
    assert os.path.isdir(tmp_path / "run" / "backup")
    rec = _Record()
    summary = run(cfg, callbacks=[rec])
    assert rec.epochs == [1, 2]  # epoch 0 is not repeated
    assert rec.first_iteration == 3  # optimizer state (and its step count) restored
    assert summary["global_steps"] == 9 and summary["epochs_completed"] == 3


def test_script_passes_weight_decay_form_to_the_config(tmp_path):
    """--weight_decay_form reaches TrainConfig (mutant: the flag not defined,
    or not read: no error about adamw's form)."""
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--optimizer=adamw",
         "--weight_decay_form=coupled", f"--workdir={tmp_path}/w"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode != 0
    assert "--optimizer=adamw is Adam with decoupled decay" in res.stderr


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
