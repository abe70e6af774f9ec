"""Every shipped recipe trains: each flagfile in flags/ with each method it
serves, through scripts/train.py's program path, on 1 device and on 2 logical
CPU devices.

A case parses the real flagfile (plus the command line its header documents
for that method) with scripts/train.py's absl flags and ``config_from_flags``,
then overrides only sizes: batch sizes (global 4; 16 under ``ghost_batch``,
whose 8 groups need 8 images per replica; 6 for MixMatch, whose interleave
cuts a replica's batch into K + 1 = 3 slices), one step per epoch (the recipe's
epochs and warm-up epochs stay, so the learning-rate schedule is the recipe's;
a callback ends ``fit`` after the second epoch), the dataset (1 labeled image
per class, tiny synthetic uint8 images at the recipe's image size served by
``tfds.testing.mock_data``; digits is the bundled data), PAWS's support batch
(1 image per class) and fine-tuning (1 epoch), the workdir, and no export.
Backbone, norm, optimizer, schedule, views and method flags are the recipe's.
``tfssl.train.run`` then runs everything a real run does (split, views, fit
with its callbacks, final evaluation, summary.json).

Each case checks that the run made exactly 2 optimizer steps on the requested
number of replicas, that every logged loss and metric of both steps is finite,
that every trainable variable changed, and, under 2 replicas, that the mirrored
copies of every variable agree.

ImageNet-size cases (224 px, ResNet-50, 1000 classes) are marked ``imagenet``
and deselected by default (setup.cfg); run them with
``python -m pytest -q tests/test_recipes.py -m imagenet``.
"""

import dataclasses
import glob
import os
import time

import keras
import numpy as np
import pytest

from tfssl import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2

# TFDS split names and sizes of the mock datasets (one labeled image per class
# comes from "train"; the other train images and "unlabelled" are unlabeled).
MOCK_SPLITS = {
    "cifar10": dict(train=20, test=4),
    "cifar100": dict(train=200, test=4),
    "svhn_cropped": dict(train=20, test=4),
    "stl10": dict(train=20, test=4, unlabelled=8),
    # 1000 classes, one image each: the whole train set is the labeled set
    # (--label_fraction=1); the images vary in size around 232 x 240 px.
    "imagenet2012": dict(train=1000, validation=4),
}
IMAGENET_BASE_SIZE = (232, 240)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A flagfile, the method it is run with, and the extra command line its
    header (or the README's method table) documents for that method."""

    flagfile: str
    method: str
    extra: tuple = ()
    xfail: str = ""  # the exact cause of a known crash (strict xfail)

    @property
    def imagenet(self) -> bool:
        """ImageNet-size, or one of the two widest CIFAR/STL recipes (WRN-28-8 on
        CIFAR-100, 96 px STL-10: 50-130 s a case), run by the same separate command
        to keep CI under its 15 minutes."""
        return "imagenet" in self.flagfile or self.flagfile in (
            "mixmatch_cifar100.cfg", "mixmatch_stl10.cfg")

    @property
    def id(self) -> str:
        return f"{self.flagfile[:-4]}-{self.method}"


GHOST_DIGITS = ("--norm=ghost_batch", "--epochs=100")  # digits.cfg's ASCL command line
RECIPES = [
    Recipe("digits.cfg", "supervised"),
    Recipe("digits.cfg", "simmatch"),
    Recipe("digits.cfg", "fixmatch"),
    Recipe("digits.cfg", "ascl", GHOST_DIGITS),
    Recipe("digits.cfg", "moco", GHOST_DIGITS),
    Recipe("digits.cfg", "ascl_byol", GHOST_DIGITS),
    Recipe("sela_digits.cfg", "sela"),
    Recipe("mixmatch_digits.cfg", "mixmatch"),
    Recipe("paws_digits.cfg", "paws"),
    Recipe("cifar10.cfg", "supervised"),
    Recipe("cifar10.cfg", "simmatch", ("--ema_decay=0.999",)),
    Recipe("cifar10.cfg", "fixmatch", ("--ema_decay=0.999",)),
    Recipe("sela_cifar10.cfg", "sela"),
    Recipe("ascl_cifar10.cfg", "ascl"),
    Recipe("ascl_cifar10.cfg", "moco"),
    Recipe("paws_cifar10.cfg", "paws"),
    Recipe("mixmatch_cifar10_250.cfg", "mixmatch"),
    Recipe("mixmatch_cifar10_4000.cfg", "mixmatch"),
    Recipe("mixmatch_cifar100.cfg", "mixmatch"),
    Recipe("mixmatch_svhn.cfg", "mixmatch"),
    Recipe("mixmatch_stl10.cfg", "mixmatch"),
    Recipe("imagenet.cfg", "supervised"),
    Recipe("sela_imagenet.cfg", "sela"),
    Recipe("ascl_imagenet.cfg", "ascl"),
    Recipe("moco_imagenet.cfg", "moco"),
    Recipe("simmatch_imagenet.cfg", "simmatch"),
    Recipe("paws_imagenet.cfg", "paws"),
]


def _cases():
    for r in RECIPES:
        for devices in (1, 2):
            marks = [pytest.mark.imagenet] if r.imagenet else []
            if r.xfail:
                marks.append(pytest.mark.xfail(strict=True, reason=r.xfail))
            yield pytest.param(r, devices, marks=marks, id=f"{r.id}-{devices}dev")


def _parse(script, argv):
    flags = script.F
    flags.unparse_flags()
    flags(["train.py", *argv])
    return flags


def shrunk_argv(script, recipe: Recipe, devices: int, workdir: str) -> list:
    """The recipe's command line followed by the size-only overrides (``script``:
    scripts/train.py as a module, the ``train_script`` fixture)."""
    argv = [f"--flagfile={os.path.join('flags', recipe.flagfile)}", *recipe.extra,
            f"--method={recipe.method}"]
    try:
        f = _parse(script, argv)
        norm, dataset, fraction = f.norm, f.dataset, f["label_fraction"].present
        unique_classes = f.paws_unique_classes
        interleave_slices = f.mixmatch_num_augmentations + 1
    finally:
        script.F.unparse_flags()
    # Per replica (on 2 devices): 8 images under ghost_batch (its 8 groups),
    # K + 1 for MixMatch (its interleave cuts the batch into K + 1 slices), else 2.
    per_replica = 8 if norm == "ghost_batch" else 2
    if recipe.method == "mixmatch":
        per_replica = max(per_replica, interleave_slices)
    b = 2 * per_replica
    over = [f"--batch_size={b}", f"--unlabeled_batch_size={b}", "--steps_per_epoch=1",
            f"--workdir={workdir}", "--export_dir=", "--verbose=0"]
    over += (["--strategy=default"] if devices == 1 else
             ["--strategy=mirrored", f"--num_cpu_devices={devices}"])
    if dataset != "digits":  # the mock datasets hold one labeled image per class
        over.append("--label_fraction=1" if fraction else "--labels_per_class=1")
    if recipe.method == "paws":
        over += ["--paws_imgs_per_class=1", "--paws_finetune_epochs=1",
                 "--paws_finetune_batch_size=4"]
        if unique_classes:  # one class per replica
            over.append("--paws_classes_per_batch=2")
    return argv + over


class _TwoSteps(keras.callbacks.Callback):
    """Ends fit after ``STEPS`` one-step epochs; records each step's logs, the
    trainable variables before and after, and whether the replicas agree."""

    def on_train_begin(self, logs=None):
        self.before = {v.path: np.array(v.numpy()) for v in self.model.trainable_variables}
        self.step_logs, self.replica_error = [], None

    def on_train_batch_end(self, batch, logs=None):
        self.step_logs.append({k: float(np.asarray(v)) for k, v in (logs or {}).items()})

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= STEPS:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.after = {v.path: np.array(v.numpy()) for v in self.model.trainable_variables}
        self.replica_error = _replicas_disagree(self.model)


def _replicas_disagree(model):
    """The first model or optimizer variable whose replicas hold different
    values, or None. Sync-on-read variables (BatchNormalization's moving
    statistics under per-replica BN) are local by design and are skipped."""
    import tensorflow as tf

    strategy = model.distribute_strategy
    if strategy.num_replicas_in_sync == 1:
        return None
    for v in list(model.weights) + list(model.optimizer.variables):
        tv = getattr(v, "value", v)
        if getattr(tv, "synchronization", None) == tf.VariableSynchronization.ON_READ:
            continue
        if (v.path.rsplit("/", 1)[-1] in ("moving_mean", "moving_variance")
                and getattr(tv, "aggregation", None) == tf.VariableAggregation.NONE):
            # Keras BatchNormalization's moving statistics (--norm=batch) are
            # mirrored without aggregation: each replica keeps the statistics of
            # its own shard (see the lead's report); nothing in training reads them.
            continue
        local = [np.asarray(x) for x in strategy.experimental_local_results(tv)]
        if len(local) < 2:
            return f"{v.path}: {len(local)} local copy under {strategy.num_replicas_in_sync} replicas"
        for i, x in enumerate(local[1:], 1):
            if not np.allclose(x, local[0], rtol=1e-5, atol=1e-6):
                return f"{v.path}: replica {i} differs from replica 0"
    return None


@pytest.fixture
def repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # nested --flagfile paths are relative to the repo root
    yield
    keras.backend.clear_session()


class _TrainingDone(Exception):
    """Ends a 2-device case where the run's final evaluation would begin."""


@pytest.mark.parametrize("recipe,devices", list(_cases()))
def test_recipe_trains_two_steps(recipe, devices, tmp_path, repo_root, train_script,
                                 monkeypatch):
    """Mutants caught: a recipe that crashes at start or in its step (e.g. the
    resized-crop TypeError above 96 px), a step that produces a NaN loss, a step
    whose gradients miss some trainable variable (e.g. a head the loss no longer
    reaches), a ghost-BN batch that does not divide per replica, replicas whose
    mirrored variables drift apart, a final evaluation that fails or gives a
    non-finite metric. The 2-device case stops where the final evaluation
    begins (``tfssl.train._stage``): that evaluation is the 1-device case's,
    and tests/test_train.py runs one under a 2-device strategy (CI time)."""
    from tfssl import train
    from tfssl.train import run

    if devices > 1:
        def stop(name):
            if name == "final_evaluation":
                raise _TrainingDone
        monkeypatch.setattr(train, "_stage", stop)

    def run_it():
        try:
            return run(cfg, callbacks=[probe])
        except _TrainingDone:
            return None

    script = train_script
    argv = shrunk_argv(script, recipe, devices, str(tmp_path / "run"))
    try:
        _parse(script, argv)
        cfg = script.config_from_flags()
    finally:
        script.F.unparse_flags()
    dataset = cfg.dataset
    probe = _TwoSteps()
    start = time.perf_counter()
    if dataset == "digits":
        summary = run_it()
    else:
        with testing.mock_tfds(MOCK_SPLITS[dataset], image_size=IMAGENET_BASE_SIZE):
            summary = run_it()
    print(f"\n{recipe.id} on {devices} device(s): {time.perf_counter() - start:.1f} s")

    assert probe.model.distribute_strategy.num_replicas_in_sync == devices
    assert int(probe.model.optimizer.iterations.numpy()) == STEPS
    assert (summary is None) == (devices > 1)
    assert len(probe.step_logs) == STEPS
    for i, logs in enumerate(probe.step_logs):
        assert any("loss" in k for k in logs), logs
        bad = {k: v for k, v in logs.items() if not np.isfinite(v)}
        assert not bad, f"step {i}: non-finite logs {bad}"
    if summary is not None:
        assert summary["replicas"] == devices and summary["global_steps"] == STEPS
        assert all(np.isfinite(v) for v in summary["metrics"].values()), summary["metrics"]
    unchanged = [p for p, v in probe.before.items() if np.array_equal(v, probe.after[p])]
    assert not unchanged, f"trainable variables unchanged by {STEPS} steps: {unchanged}"
    assert probe.replica_error is None, probe.replica_error


def test_every_flagfile_and_method_has_a_recipe_case():
    """Mutant caught: a flagfile added to flags/ (or a method registered)
    without a case above."""
    from tfssl import methods

    files = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "flags", "*.cfg"))}
    assert files == {r.flagfile for r in RECIPES}
    assert set(methods.available()) <= {r.method for r in RECIPES}
