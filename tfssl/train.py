"""The training program behind ``scripts/train.py``.

It takes a ``TrainConfig`` (one field per flag; the flags are parsed only in
the script), checks it, and runs: source -> split -> views -> ``model.fit``
(with auto-resume, TensorBoard, kNN monitor, test accuracy) -> final
evaluation -> export -> ``<workdir>/summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np


BACKUP_DIR = "backup"
OPTIMIZERS = ("sgd", "adam", "adamw", "lars")
LR_SCHEDULES = ("cosine", "partial_cosine", "step", "constant")


class ConfigError(ValueError):
    """A flag or an input that cannot work, found before training starts."""


class WorkerLost(RuntimeError):
    """Multi-worker training stopped because a peer worker died or became
    unreachable; rerunning every worker resumes from the last backup."""


class AlreadyFinished(Exception):
    """``workdir`` holds a finished run (its ``summary.json``) and
    ``overwrite`` is off: nothing was trained; the message says where the
    summary is."""


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite: training stopped in that step, nothing
    was exported, and the last epoch's backup was kept for a rerun."""


def _stage(name: str) -> None:
    """Marks a point of the run's end (``"final_evaluation"``, ``"export"``);
    a no-op that tests replace to stop a run there, as a kill would."""


@dataclasses.dataclass
class TrainConfig:
    """One field per ``scripts/train.py`` flag (same names, same meaning)."""

    method: str = "supervised"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    manual_dir: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None
    workdir: str = "runs/default"
    epochs: int = 30
    steps_per_epoch: Optional[int] = None
    steps_per_execution: int = 1
    batch_size: int = 64
    unlabeled_batch_size: Optional[int] = None
    labels_per_class: Optional[int] = 4
    label_fraction: Optional[float] = None
    include_labeled_in_unlabeled: Optional[bool] = None  # None: the method's default
    seed: int = 0
    backbone: str = "auto"
    norm: str = "batch"
    conv_padding: str = "auto"  # tf | torch; auto: the backbone's official code's
    optimizer: str = "sgd"
    learning_rate: float = 0.03
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    weight_decay_form: Optional[str] = None  # coupled | decoupled; None: the optimizer's own
    warmup_epochs: int = 0
    start_learning_rate: float = 0.0
    final_learning_rate: float = 0.0
    lars_trust_coefficient: float = 0.001
    lr_schedule: str = "cosine"
    lr_cosine_fraction: float = 7 / 16  # partial_cosine: lr cos(pi f k / K)
    lr_step_epochs: Sequence[int] = ()  # step: epochs where the rate is multiplied
    lr_step_factor: float = 0.1  # step: by this factor
    weight_decay_exclude: Sequence[str] = ("bias", "gamma", "beta")  # names that never decay
    ema_decay: Optional[float] = None
    strategy: str = "auto"
    num_cpu_devices: int = 1
    mixed_precision: bool = False
    deterministic: bool = False
    knn_k: int = 200
    knn_t: float = 0.1
    eval_every: int = 1
    export_dir: Optional[str] = "saved_models"
    verbose: Any = "auto"  # 1 progress bar, 2 a line per epoch; auto: 1 on a terminal
    profile_batches: Sequence[int] = ()  # (first, last) training batch of the run to trace
    overwrite: bool = False  # a finished run in workdir: train it again (else say so and stop)
    method_args: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        """Raises ValueError naming the flag for any value that cannot work.
        Runs before any data is read or any TensorFlow device is touched."""
        from tfssl import distribute, methods
        from tfssl.data.sources import TFDS_SPECS
        from tfssl.models.backbones import BACKBONES, NORMS, PADDINGS, is_backbone

        methods.get(self.method)
        if self.dataset == "folder" and not self.data_dir:
            raise ConfigError("--dataset=folder needs --data_dir=<folder of class subfolders>.")
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ConfigError(f"--data_dir={self.data_dir!r} does not exist.")
        if TFDS_SPECS.get(self.dataset, {}).get("manual") and self.download:
            if not self.manual_dir or not os.path.isdir(self.manual_dir):
                raise ConfigError(
                    f"--dataset={self.dataset} --download needs --manual_dir=<folder with "
                    f"the downloaded archives>; got {self.manual_dir!r}.")
        for name in ("epochs", "batch_size", "eval_every", "knn_k"):
            if getattr(self, name) is None or getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        pb = tuple(self.profile_batches or ())
        if pb and (len(pb) != 2 or not 1 <= int(pb[0]) <= int(pb[1])):
            raise ConfigError(f"--profile_batches takes two batch numbers first,last with "
                              f"1 <= first <= last, got {','.join(map(str, pb))}.")
        if self.steps_per_execution is None or self.steps_per_execution < 1:
            raise ConfigError(f"--steps_per_execution must be a positive integer, got "
                              f"{self.steps_per_execution}.")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"--steps_per_epoch must be positive, got {self.steps_per_epoch}.")
        if self.unlabeled_batch_size is not None and self.unlabeled_batch_size < 0:
            raise ConfigError(f"--unlabeled_batch_size must be >= 0, got {self.unlabeled_batch_size}.")
        if (self.labels_per_class is None) == (self.label_fraction is None):
            raise ConfigError("Give exactly one of --labels_per_class and --label_fraction.")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise ConfigError(f"--labels_per_class must be >= 1, got {self.labels_per_class}.")
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise ConfigError(f"--label_fraction must be in (0, 1], got {self.label_fraction}.")
        if self.backbone != "auto" and not is_backbone(self.backbone):
            raise ConfigError(f"--backbone={self.backbone!r} is not one of {('auto',) + BACKBONES} "
                              f"nor wrn<depth>_<width> / wrn<depth>_f<filters>[_s<scales>]"
                              f"[_usb|_suncet].")
        if self.norm not in NORMS:
            raise ConfigError(f"--norm={self.norm!r} is not one of {NORMS}.")
        if self.conv_padding not in ("auto",) + PADDINGS:
            raise ConfigError(f"--conv_padding={self.conv_padding!r} is not one of "
                              f"{('auto',) + PADDINGS}.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer={self.optimizer!r} is not one of {OPTIMIZERS}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr_schedule={self.lr_schedule!r} is not one of {LR_SCHEDULES}.")
        if self.lr_schedule == "partial_cosine" and not 0 < self.lr_cosine_fraction <= 1:
            raise ConfigError(f"--lr_cosine_fraction must be in (0, 1], got "
                              f"{self.lr_cosine_fraction}.")
        if self.lr_schedule == "step":
            e = [int(x) for x in self.lr_step_epochs]
            if not e or e != sorted(set(e)) or e[0] < 1 or e[-1] >= self.epochs:
                raise ConfigError(f"--lr_schedule=step needs --lr_step_epochs: increasing epochs "
                                  f"in [1, --epochs={self.epochs}), got {list(self.lr_step_epochs)}.")
            if not 0 < self.lr_step_factor < 1:
                raise ConfigError(f"--lr_step_factor must be in (0, 1), got {self.lr_step_factor}.")
            if self.warmup_epochs:
                raise ConfigError("--lr_schedule=step has no warm-up: give --warmup_epochs=0.")
        elif self.lr_step_epochs:
            raise ConfigError(f"--lr_step_epochs is for --lr_schedule=step, not "
                              f"--lr_schedule={self.lr_schedule}.")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}.")
        if self.start_learning_rate < 0 or self.final_learning_rate < 0:
            raise ConfigError("--start_learning_rate and --final_learning_rate must be >= 0.")
        if not self.lars_trust_coefficient > 0:
            raise ConfigError(f"--lars_trust_coefficient must be > 0, got "
                              f"{self.lars_trust_coefficient}.")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight_decay must be >= 0, got {self.weight_decay}.")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}.")
        from tfssl.optimizers import WEIGHT_DECAY_FORMS

        if self.weight_decay_form not in (None,) + WEIGHT_DECAY_FORMS:
            raise ConfigError(f"--weight_decay_form={self.weight_decay_form!r} is not one of "
                              f"{WEIGHT_DECAY_FORMS}.")
        form = weight_decay_form(self)
        if self.optimizer == "lars" and form != "coupled":
            raise ConfigError("--optimizer=lars takes --weight_decay_form=coupled: LARS's decay "
                              "is inside its trust ratio (PAWS).")
        if self.optimizer == "adamw" and form != "decoupled":
            raise ConfigError("--optimizer=adamw is Adam with decoupled decay: give "
                              "--weight_decay_form=decoupled, or --optimizer=adam "
                              "--weight_decay_form=coupled for Adam with L2 decay.")
        if self.warmup_epochs < 0 or (self.warmup_epochs and self.warmup_epochs >= self.epochs):
            raise ConfigError(f"--warmup_epochs must be in [0, --epochs), got {self.warmup_epochs}.")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.strategy not in distribute.STRATEGIES:
            raise ConfigError(f"--strategy={self.strategy!r} is not one of {distribute.STRATEGIES}.")
        if self.strategy == "multi_worker":
            try:
                distribute.parse_tf_config()
            except ValueError as e:
                raise ConfigError(str(e)) from e
        if self.num_cpu_devices < 1:
            raise ConfigError(f"--num_cpu_devices must be >= 1, got {self.num_cpu_devices}.")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"--image_size must be >= 8, got {self.image_size}.")

    @property
    def run_name(self) -> str:
        return os.path.basename(os.path.normpath(self.workdir))


def auto_backbone(image_shape) -> str:
    """small_cnn for tiny images (digits), WRN-28-2 up to 32 px, ResNet-18 up
    to 96 px, ResNet-50 above."""
    side = image_shape[0]
    if side <= 16:
        return "small_cnn"
    if side <= 32:
        return "wrn28_2"
    if side <= 96:
        return "resnet18"
    return "resnet50"


def view_options(dataset: str, image_shape) -> Dict[str, Any]:
    """Per-dataset weak-view settings: no flip for digits and SVHN (flipping
    changes the symbol), pad size/8, random-resized crop for ImageNet-scale."""
    side, _, channels = image_shape
    opts = dict(size=side, channels=channels, flip=dataset not in ("digits", "svhn_cropped"),
                pad=max(1, side // 8))
    if side > 96:
        opts.update(pad=None, resized_crop_scale=(0.08, 1.0))
    return opts


def weight_decay_form(cfg: TrainConfig) -> str:
    """--weight_decay_form, or when unset the optimizer's own: coupled for LARS
    (inside its trust ratio), decoupled (Keras's) for sgd, adam and adamw."""
    if cfg.weight_decay_form is not None:
        return cfg.weight_decay_form
    return "coupled" if cfg.optimizer == "lars" else "decoupled"


def optimizer_summary(cfg: TrainConfig) -> Dict[str, Any]:
    """What the run's optimizer does, for ``summary.json``: its name, the
    weight decay's value and form (``coupled``: ``g + wd w`` before the
    momentum, PyTorch's SGD; ``decoupled``: ``w - lr wd w``, Keras's), and
    the momentum and Nesterov setting of the momentum optimizers."""
    out: Dict[str, Any] = {"name": cfg.optimizer, "learning_rate": cfg.learning_rate,
                           "lr_schedule": cfg.lr_schedule, "weight_decay": cfg.weight_decay,
                           "weight_decay_form": weight_decay_form(cfg),
                           "weight_decay_excludes": list(cfg.weight_decay_exclude)}
    if cfg.lr_schedule == "partial_cosine":
        out["lr_cosine_fraction"] = cfg.lr_cosine_fraction
    if cfg.lr_schedule == "step":
        out.update(lr_step_epochs=[int(e) for e in cfg.lr_step_epochs],
                   lr_step_factor=cfg.lr_step_factor)
    if cfg.optimizer in ("sgd", "lars"):
        out.update(momentum=cfg.momentum, nesterov=bool(cfg.nesterov))
    return out


def _learning_rate(cfg: TrainConfig, steps_per_epoch: int):
    """The learning rate or schedule the flags describe, over the run's
    ``epochs x steps_per_epoch`` optimizer steps."""
    from tfssl import optimizers

    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    if cfg.lr_schedule == "cosine":
        return optimizers.warmup_cosine(cfg.learning_rate, max(total_steps, warmup_steps + 1),
                                        warmup_steps, cfg.start_learning_rate,
                                        cfg.final_learning_rate)
    if cfg.lr_schedule == "partial_cosine":
        return optimizers.PartialCosine(cfg.learning_rate, max(total_steps, warmup_steps + 1),
                                        cfg.lr_cosine_fraction, warmup_steps,
                                        cfg.start_learning_rate)
    if cfg.lr_schedule == "step":
        return optimizers.step_decay(cfg.learning_rate, steps_per_epoch, cfg.lr_step_epochs,
                                     cfg.lr_step_factor)
    return cfg.learning_rate


def _optimizer(cfg: TrainConfig, steps_per_epoch: int):
    """The optimizer the flags describe (validated: LARS is coupled, AdamW
    decoupled). Variables named in ``--weight_decay_exclude`` (biases and
    normalisation parameters unless the recipe's official code decays every
    parameter) never decay."""
    from tfssl import optimizers

    lr = _learning_rate(cfg, steps_per_epoch)
    exclude = tuple(cfg.weight_decay_exclude)
    coupled = weight_decay_form(cfg) == "coupled"
    wd = cfg.weight_decay
    if cfg.optimizer == "lars":
        # LARS couples its weight decay with the trust ratio and excludes biases
        # and normalisation parameters from both itself.
        return optimizers.LARS(lr, momentum=cfg.momentum, weight_decay=wd,
                               trust_coefficient=cfg.lars_trust_coefficient,
                               nesterov=cfg.nesterov, exclude=exclude)
    if coupled:
        if cfg.optimizer == "sgd":
            return optimizers.SGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                  weight_decay=wd, exclude=exclude)
        return optimizers.Adam(lr, weight_decay=wd, exclude=exclude)
    # Keras's decoupled decay, with the exclusions kept in the optimizer's
    # config (a model loaded with keras.saving keeps them).
    exclude = exclude if wd else ()
    if cfg.optimizer == "sgd":
        return optimizers.DecoupledSGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                       weight_decay=wd or None, exclude=exclude)
    if cfg.optimizer == "adam":
        return optimizers.DecoupledAdam(lr, weight_decay=wd or None, exclude=exclude)
    return optimizers.AdamW(lr, weight_decay=wd, exclude=exclude)


def build_model(cfg: TrainConfig, source, labeled_ids=None):
    """The method's model for ``source`` as ``cfg`` describes it (uncompiled).
    Call inside the strategy scope. Methods whose class sets
    ``needs_labeled_ids`` (a labeled bank) get ``labeled_ids``. Returns
    (model, backbone name)."""
    from tfssl import methods, models

    backbone_name = cfg.backbone if cfg.backbone != "auto" else auto_backbone(source.image_shape)
    backbone = models.get_backbone(backbone_name, source.image_shape, norm=cfg.norm,
                                   padding=cfg.conv_padding)
    encoder = models.encoder(backbone, source.mean, source.std)
    kwargs = dict(cfg.method_args)
    if cfg.ema_decay is not None:
        kwargs["ema_decay"] = cfg.ema_decay
    if getattr(methods.get(cfg.method), "needs_labeled_ids", False):
        if labeled_ids is None:
            raise ValueError(f"--method={cfg.method} needs the labeled ids.")
        kwargs["labeled_ids"] = labeled_ids
    return methods.get(cfg.method).from_args(encoder=encoder, source=source, **kwargs), backbone_name


FINAL_WEIGHTS = "final.weights.h5"


def run(cfg: TrainConfig, callbacks=()) -> Dict[str, Any]:
    """Trains, evaluates and exports as ``cfg`` says; returns the summary dict
    (also written to ``<workdir>/summary.json``).

    A run killed mid-way resumes from its last completed epoch when started
    again with the same ``workdir`` (Keras BackupAndRestore: weights, method
    state, optimizer state and the epoch counter).

    Args:
      cfg: the configuration (validated first).
      callbacks: extra Keras callbacks for ``fit`` (run after tfssl's own).
    """
    import keras
    import tensorflow as tf

    try:
        prepared = _prepare(cfg)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e
    previous_policy = keras.mixed_precision.dtype_policy()
    if cfg.deterministic and tf.config.list_physical_devices("GPU"):
        # GPU kernels (cuDNN, atomics) need it; it stays on for the process.
        tf.config.experimental.enable_op_determinism()
    if cfg.mixed_precision:
        keras.mixed_precision.set_dtype_policy(
            "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16")
    cfg, prepared, scratch = prepared[0], prepared[1:-1], prepared[-1]
    try:
        return _train(cfg, callbacks, *prepared)
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


RUN_OUTPUTS = ("summary.json", "log.csv", FINAL_WEIGHTS, "tensorboard", BACKUP_DIR)


def _finished_run(cfg: TrainConfig) -> None:
    """A run is finished when its ``summary.json`` is written and its backup is
    gone (the backup lives until the final evaluation and export succeed).
    Raises AlreadyFinished, or with ``overwrite`` clears the old run's outputs."""
    summary = os.path.join(cfg.workdir, "summary.json")
    if not os.path.isfile(summary) or os.path.exists(os.path.join(cfg.workdir, BACKUP_DIR)):
        return
    if not cfg.overwrite:
        raise AlreadyFinished(
            f"--workdir={cfg.workdir!r} holds a finished run ({summary}); nothing to do. "
            "Pass --overwrite to train it again, or give another --workdir.")
    for name in RUN_OUTPUTS:
        path = os.path.join(cfg.workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _prepare(cfg: TrainConfig):
    """Everything that can reject the configuration: flags, strategy, data,
    split, batch divisibility. Writes ``labeled_ids.json`` when all is well."""
    cfg.validate()
    _finished_run(cfg)
    from tfssl import distribute

    distribute.configure_cpu_devices(cfg.num_cpu_devices)

    import keras

    from tfssl import data, methods

    strategy = distribute.make_strategy(cfg.strategy)
    replicas = strategy.num_replicas_in_sync
    method_cls = methods.get(cfg.method)
    source = data.get_source(cfg.dataset, cfg.data_dir, cfg.manual_dir, cfg.image_size,
                             cfg.download)
    labeled_ids = data.labeled_split(source.train_labels, source.num_classes,
                                     cfg.labels_per_class, cfg.label_fraction, cfg.seed)
    # Seed Python, NumPy, TF and Keras before anything random is built (views
    # draw their layer seeds at construction).
    keras.utils.set_random_seed(cfg.seed)
    labeled_views, unlabeled_views = method_cls.views(
        view_options(cfg.dataset, source.image_shape), **cfg.method_args)
    support = method_cls.support_sampling(replicas, **cfg.method_args)
    if support is not None:
        # A class-stratified support batch replaces the labeled batch (PAWS):
        # its size is classes_per_batch x imgs_per_class, not --batch_size.
        cfg = dataclasses.replace(
            cfg, batch_size=support["classes_per_batch"] * support["imgs_per_class"])
        # Checks the labeled set against the sampler (classes, images per class).
        data.support_indices(np.asarray(source.train_labels)[labeled_ids],
                             support["classes_per_batch"], support["imgs_per_class"],
                             support["num_chunks"], support["replacement"])
    b_u = cfg.unlabeled_batch_size
    if b_u is None:
        b_u = 7 * cfg.batch_size if unlabeled_views else 0
    if not unlabeled_views:
        b_u = 0
    flag_of_b = f"{cfg.method}_classes_per_batch x {cfg.method}_imgs_per_class" if support else (
        "batch_size")
    for flag, b in ((flag_of_b, cfg.batch_size), ("unlabeled_batch_size", b_u)):
        if b % replicas:
            raise ValueError(f"--{flag}={b} (global) does not divide by the {replicas} "
                             f"replicas of --strategy={cfg.strategy}.")
    cfg, scratch = _worker_outputs(cfg, strategy)
    os.makedirs(cfg.workdir, exist_ok=True)
    data.write_labeled_ids(cfg.workdir, labeled_ids, source.train_labels, cfg.seed)
    return (cfg, strategy, source, labeled_ids, labeled_views, unlabeled_views, b_u, support,
            scratch)


class _EpochSeconds:
    """Adds ``epoch_seconds`` to each epoch's logs (TensorBoard, log.csv,
    ``summary.json``'s history): the wall time from the epoch's start to its
    end, the evaluations and backups of the callbacks before it included. Unlike
    ``train_seconds`` it leaves out what ``fit`` does before the first epoch and
    after the last, so the epochs after the first give the steady throughput."""

    def __new__(cls):
        import keras

        class EpochSeconds(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                if logs is not None:
                    logs["epoch_seconds"] = time.perf_counter() - self.start

        return EpochSeconds()


class _StopOnNonFiniteLoss:
    """Raises NonFiniteLoss at the end of the first step (or execution, with
    ``steps_per_execution``) whose logged losses are not all finite: unlike
    Keras's TerminateOnNaN, which ends ``fit`` normally (and the run would then
    evaluate and export NaN weights), the run stops with an error, nothing is
    exported, and the backup of the last completed epoch stays for a rerun."""

    def __new__(cls, backup_dir: str):
        import keras

        class StopOnNonFiniteLoss(keras.callbacks.Callback):
            epoch = 0

            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                bad = {k: float(np.asarray(v)) for k, v in (logs or {}).items()
                       if "loss" in k and not np.all(np.isfinite(np.asarray(v, np.float64)))}
                if not bad:
                    return
                key, value = next(iter(bad.items()))
                step = int(self.model.optimizer.iterations.numpy())
                kept = (f"the backup of epoch {self.epoch} in {backup_dir!r} is kept: rerun "
                        "with a lower --learning_rate (same --workdir) to resume from it"
                        if self.epoch else "no epoch had completed, so a rerun starts over")
                raise NonFiniteLoss(
                    f"the loss {key} became {value} in epoch {self.epoch + 1}, step {batch + 1} "
                    f"(optimizer step {step}); training stopped there and nothing was exported; "
                    f"{kept}.")

        return StopOnNonFiniteLoss()


class _SameResumePoint:
    """Multi-worker only, right after BackupAndRestore: checks that every worker
    restored the same epoch and optimizer step (a worker that cannot see the
    chief's backup would start over and the collectives would go out of step)."""

    def __new__(cls):
        import keras
        import tensorflow as tf

        class SameResumePoint(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                strategy = self.model.distribute_strategy
                mine = tf.constant([float(getattr(self.model, "_initial_epoch", 0) or 0),
                                    float(self.model.optimizer.iterations.numpy())])

                @tf.function
                def spread():
                    def fn():
                        ctx = tf.distribute.get_replica_context()
                        every = ctx.all_gather(mine[None], axis=0)  # [workers, 2]
                        return tf.reduce_max(every, 0) - tf.reduce_min(every, 0)
                    return strategy.run(fn)

                gap = strategy.experimental_local_results(spread())[0].numpy()
                if gap.max() > 0:
                    raise ConfigError(
                        f"the workers resumed from different points (this worker: epoch "
                        f"{int(mine[0])}, step {int(mine[1])}): --workdir must be on storage "
                        "that every worker sees, so that all restore the chief's backup.")

        return SameResumePoint()


def _include_labeled(cfg: TrainConfig) -> bool:
    """--include_labeled_in_unlabeled, or the method's default when unset."""
    if cfg.include_labeled_in_unlabeled is not None:
        return bool(cfg.include_labeled_in_unlabeled)
    from tfssl import methods

    return bool(methods.get(cfg.method).include_labeled_in_unlabeled)


def _worker_outputs(cfg: TrainConfig, strategy):
    """Where this process writes. The chief (and any single-process run) writes
    to ``--workdir``/``--export_dir``. Other multi-worker tasks run the same
    program, saves included (reading some variables is a collective that every
    worker must join), into a scratch directory removed at the end; they start
    from a copy of the chief's backup, so a rerun resumes on every worker from
    the same epoch. The workdir must therefore be on storage that all workers
    see (a shared file system or a bucket), as with any Keras multi-worker run.

    Returns:
      (the config this process uses, the scratch directory to remove or None).
    """
    from tfssl import distribute

    if distribute.is_chief(strategy):
        return cfg, None
    resolver = strategy.cluster_resolver
    scratch = tempfile.mkdtemp(prefix=f"tfssl-{resolver.task_type}{resolver.task_id}-")
    workdir = os.path.join(scratch, cfg.run_name)
    chief_backup = os.path.join(cfg.workdir, BACKUP_DIR)
    if os.path.isdir(chief_backup):
        shutil.copytree(chief_backup, os.path.join(workdir, BACKUP_DIR))
    export_dir = os.path.join(scratch, "export") if cfg.export_dir else None
    return dataclasses.replace(cfg, workdir=workdir, export_dir=export_dir), scratch


@contextlib.contextmanager
def _peer_loss(multi_worker: bool, what_now: str):
    """Under multi-worker, the collective errors of a lost peer (the
    coordination service's heartbeats abort the collectives) become
    ``WorkerLost``: the first line that says what happened, and ``what_now``."""
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError) as e:
        if not multi_worker:
            raise
        keys = ("abort", "reset", "unavailable", "fail", "timed out", "heartbeat", "deadline")
        first = next((line.strip() for line in str(e.message or "").splitlines()
                      if any(k in line.lower() for k in keys)), type(e).__name__)
        raise WorkerLost(f"a worker of the cluster failed or became unreachable ({first}). "
                         f"{what_now}") from e


def _train(cfg, callbacks, strategy, source, labeled_ids, labeled_views, unlabeled_views, b_u,
           support):
    import keras

    from tfssl import data, distribute, evaluation, export
    from tfssl.models.backbones import default_padding

    replicas = strategy.num_replicas_in_sync
    keras.utils.set_random_seed(cfg.seed)

    multi_worker = distribute.is_multi_worker(strategy)
    # Beyond one host the input runs without tf.data autotuning: its thread
    # delays the iterator's deletion by up to 60 s (distribute.without_autotune).
    finish = distribute.without_autotune if multi_worker else (lambda ds: ds)

    def stream(input_context=None):
        return finish(data.semi_supervised(
            source, labeled_ids, labeled_views, cfg.batch_size, unlabeled_views, b_u,
            include_labeled_in_unlabeled=_include_labeled(cfg), seed=cfg.seed,
            deterministic=cfg.deterministic, support=support, input_context=input_context))

    # Beyond one host each worker builds only its slice of every global batch
    # (same order as one process; no worker augments another's images).
    train_ds = (strategy.distribute_datasets_from_function(stream) if multi_worker
                else distribute.shard_by_data(stream()))
    n_stream = source.num_train + source.num_extra_unlabeled
    steps = cfg.steps_per_epoch or max(1, math.ceil(n_stream / (b_u or cfg.batch_size)))
    side = source.image_shape[0]
    eval_bs = 256
    crop = 0.875 if side > 96 else None  # ImageNet-scale: resize 256, centre 224
    test_ds = data.evaluation(source.test(), side, eval_bs, crop)
    bank_ds = data.evaluation(source.subset(labeled_ids), side, eval_bs, crop)
    test_ds, bank_ds = (finish(distribute.shard_by_data(d)) for d in (test_ds, bank_ds))

    with strategy.scope():
        try:
            model, backbone_name = build_model(cfg, source, labeled_ids)
        except ValueError as e:
            raise ConfigError(f"{e} (method arguments come from the --{cfg.method}_* flags)") from e
        model.compile(optimizer=_optimizer(cfg, steps),
                      steps_per_execution=cfg.steps_per_execution)

    use_ema = model.evaluate_with_ema
    has_head = getattr(model, "head", None) is not None
    ctx = dict(source=source, labeled_ids=labeled_ids, epochs=cfg.epochs, steps_per_epoch=steps,
               batch_size=cfg.batch_size, unlabeled_batch_size=b_u,
               labeled_views=labeled_views, unlabeled_views=unlabeled_views, bank=bank_ds,
               test=test_ds, eval_every=cfg.eval_every, seed=cfg.seed,
               deterministic=cfg.deterministic,
               view_options=view_options(cfg.dataset, source.image_shape))
    callbacks = [evaluation.KNNMonitor(bank_ds, test_ds, source.num_classes, cfg.knn_k,
                                       cfg.knn_t, cfg.eval_every, use_ema=use_ema),
                 *([evaluation.TestAccuracy(test_ds, cfg.eval_every)] if use_ema and has_head
                   else []),
                 *([evaluation.LinearProbeMonitor(bank_ds, test_ds, source.num_classes,
                                                  cfg.eval_every, use_ema=use_ema)]
                   if not has_head else []),
                 *model.training_callbacks(ctx),
                 _StopOnNonFiniteLoss(os.path.join(cfg.workdir, BACKUP_DIR)),
                 # The backup outlives fit: it is removed once the final
                 # evaluation and the export have succeeded (a kill in either
                 # resumes there, without training again).
                 keras.callbacks.BackupAndRestore(os.path.join(cfg.workdir, BACKUP_DIR),
                                                  double_checkpoint=True,
                                                  delete_checkpoint=False),
                 *([_SameResumePoint()] if multi_worker else []),
                 # Only the chief traces --profile_batches: the other workers'
                 # logs are discarded, and stopping the profiler on a second
                 # worker crashed it (SIGSEGV / SIGABRT in profiler_v2.stop, 2
                 # of 12 two-worker runs on 2026-12-02).
                 keras.callbacks.TensorBoard(
                     os.path.join(cfg.workdir, "tensorboard"),
                     profile_batch=(tuple(int(b) for b in cfg.profile_batches) or 0)
                     if distribute.is_chief(strategy) else 0),
                 _EpochSeconds(),  # (before the loggers, after the epoch-end work)
                 keras.callbacks.CSVLogger(os.path.join(cfg.workdir, "log.csv"), append=True),
                 *callbacks]
    verbose = cfg.verbose
    if verbose == "auto":
        import sys
        verbose = 1 if sys.stdout.isatty() else 2
    step0 = int(model.optimizer.iterations.numpy())
    start = time.time()
    with _peer_loss(multi_worker, "Rerun every worker with the same flags: training resumes "
                    f"from the last epoch backed up in --workdir={cfg.workdir!r}."):
        history = model.fit(train_ds, epochs=cfg.epochs, steps_per_epoch=steps,
                            validation_data=test_ds if has_head and not use_ema else None,
                            validation_freq=cfg.eval_every, callbacks=callbacks, verbose=verbose)
    train_seconds = time.time() - start
    global_steps = int(model.optimizer.iterations.numpy())
    run_steps = global_steps - step0

    final = os.path.join(cfg.workdir, FINAL_WEIGHTS)
    metrics: Dict[str, float] = {}
    export_paths = {}
    with _peer_loss(multi_worker, "Training had finished; the peer was lost in the final "
                    f"evaluation or export. Rerunning every worker with the same flags resumes "
                    f"there from the backup in --workdir={cfg.workdir!r}, without training "
                    "again."):
        model.save_weights(final)
        _stage("final_evaluation")
        with (model.ema_applied() if use_ema else contextlib.nullcontext()):
            if has_head:
                metrics["test_top1"] = float(
                    model.evaluate(test_ds, verbose=0, return_dict=True)["top1"])
            metrics["knn_top1"] = evaluation.knn_accuracy(
                model.encoder, bank_ds, test_ds, source.num_classes, cfg.knn_k, cfg.knn_t)
            if not has_head:
                metrics["linear_probe_top1"] = evaluation.linear_probe_accuracy(
                    model.encoder, bank_ds, test_ds, source.num_classes, seed=cfg.seed)
            metrics.update(model.final_evaluation(ctx))
        _stage("export")
        if cfg.export_dir:
            export_paths = export.export_model(model, os.path.join(cfg.export_dir, cfg.run_name),
                                               use_ema=use_ema, labeled=bank_ds)
    summary = {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "num_labeled": int(len(labeled_ids)),
        "epochs_completed": int(cfg.epochs),
        "global_steps": global_steps,
        "metrics": metrics,
        "evaluated_weights": "ema" if use_ema else "online",
        "train_seconds": train_seconds,
        "images_per_second": (run_steps * (cfg.batch_size + b_u) / train_seconds
                              if train_seconds > 0 and run_steps else 0.0),
        "export": export_paths,
        "history": _history(history, cfg.workdir),
        "flags": {k: v for k, v in dataclasses.asdict(cfg).items()},
        "optimizer": optimizer_summary(cfg),
        "backbone": backbone_name,
        "conv_padding": (default_padding(backbone_name) if cfg.conv_padding == "auto"
                         else cfg.conv_padding),
        "replicas": replicas,
    }
    path = os.path.join(cfg.workdir, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    os.replace(path + ".tmp", path)
    # Done: the summary marks the run finished, and the backup can go.
    shutil.rmtree(os.path.join(cfg.workdir, BACKUP_DIR), ignore_errors=True)
    return summary


def _history(history, workdir: str) -> Dict[str, list]:
    """Per-epoch logs of the whole run: this ``fit``'s history, or, when the
    run was resumed (``fit`` saw fewer epochs than ``log.csv`` holds), the
    log's rows (empty cells, such as epochs without an evaluation, as None)."""
    import csv

    fit = {k: [float(x) for x in v] for k, v in history.history.items()}
    path = os.path.join(workdir, "log.csv")
    if not os.path.isfile(path):
        return fit
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) <= max((len(v) for v in fit.values()), default=0):
        return fit
    keys = [k for k in rows[0] if k != "epoch"]
    try:
        return {k: [float(r[k]) if r.get(k) not in ("", None) else None for r in rows]
                for k in keys}
    except ValueError:  # a row cut short by a kill
        return fit


def export_run(workdir: str, export_dir: Optional[str] = None) -> Dict[str, str]:
    """Re-exports a finished run from ``<workdir>/summary.json`` (its flags) and
    ``<workdir>/final.weights.h5``; returns the export paths."""
    from tfssl import data, export

    path = os.path.join(workdir, "summary.json")
    weights = os.path.join(workdir, FINAL_WEIGHTS)
    for p in (path, weights):
        if not os.path.exists(p):
            raise ValueError(f"--workdir={workdir!r} has no {os.path.basename(p)}: "
                             "is it a finished tfssl run?")
    with open(path) as f:
        flags_ = json.load(f)["flags"]
    # Runs from before --conv_padding existed were built with TF "same" padding.
    flags_.setdefault("conv_padding", "tf")
    cfg = TrainConfig(**{k: v for k, v in flags_.items()
                         if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    source = data.get_source(cfg.dataset, cfg.data_dir, cfg.manual_dir, cfg.image_size)
    labeled_ids = None
    ids_path = os.path.join(workdir, "labeled_ids.json")
    if os.path.exists(ids_path):
        with open(ids_path) as f:
            labeled_ids = np.asarray(json.load(f)["indices"], np.int64)
    model, _ = build_model(cfg, source, labeled_ids)
    model.load_weights(weights)
    labeled = None
    if labeled_ids is not None:
        side = source.image_shape[0]
        labeled = data.evaluation(source.subset(labeled_ids), side, 256,
                                  0.875 if side > 96 else None)
    return export.export_model(model, export_dir or os.path.join("saved_models", cfg.run_name),
                               use_ema=model.evaluate_with_ema, labeled=labeled)
