#!/usr/bin/env python
"""Train a tfssl method.

    python scripts/train.py --flagfile=flags/digits.cfg                  # supervised baseline
    python scripts/train.py --flagfile=flags/sela_imagenet.cfg

Flagfiles (flags/<dataset>.cfg) hold a dataset scale's settings, with each
method's hyperparameters under that method's prefix (``--<method>_<name>``);
``--method`` is given on the command line. Results: ``<workdir>/summary.json``,
TensorBoard logs, and exported SavedModels under ``--export_dir``.

TensorFlow's oneDNN CPU kernels are switched on (TF_ENABLE_ONEDNN_OPTS=1, 2x
faster matmuls on AVX2 CPUs where TF leaves them off) unless the environment
already sets the variable.
"""

import os
import sys

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging  # noqa: E402

from tfssl.train import ConfigError, TrainConfig, WorkerLost  # noqa: E402

F = flags.FLAGS
d = TrainConfig()
flags.DEFINE_string("method", d.method, "Method name (tfssl.methods.available()).")
flags.DEFINE_string("dataset", d.dataset, "digits (bundled), folder, or a TFDS name "
                    "(cifar10, cifar100, svhn_cropped, stl10, imagenet2012, ...).")
flags.DEFINE_string("data_dir", d.data_dir, "TFDS data_dir, or the image folder for --dataset=folder.")
flags.DEFINE_string("manual_dir", d.manual_dir, "Manually downloaded archives (imagenet2012).")
flags.DEFINE_boolean("download", d.download, "Let TFDS download and prepare the dataset.")
flags.DEFINE_integer("image_size", d.image_size, "Training image side (folder / variable-size data).")
flags.DEFINE_string("workdir", d.workdir, "Run directory: checkpoints, logs, summary.json.")
flags.DEFINE_integer("epochs", d.epochs, "Training epochs.")
flags.DEFINE_integer("steps_per_epoch", d.steps_per_epoch,
                     "Steps per epoch (default: one pass over the unlabeled stream).")
flags.DEFINE_integer("steps_per_execution", d.steps_per_execution,
                     "Training steps per call of the train function, run in one graph: less "
                     "Python per step. Callbacks (SeLa's relabelling, --profile_batches) see "
                     "every N-th step; an epoch keeps its --steps_per_epoch steps.")
flags.DEFINE_integer("batch_size", d.batch_size, "GLOBAL labeled batch size B.")
flags.DEFINE_integer("unlabeled_batch_size", d.unlabeled_batch_size,
                     "GLOBAL unlabeled batch size B_u (default 7 * B for methods with unlabeled views).")
flags.DEFINE_integer("labels_per_class", d.labels_per_class, "Labeled images per class.")
flags.DEFINE_float("label_fraction", d.label_fraction,
                   "Labeled fraction instead of --labels_per_class (set that one to None).")
flags.DEFINE_boolean("include_labeled_in_unlabeled", d.include_labeled_in_unlabeled,
                     "The unlabeled stream includes the labeled images (unset: the method's "
                     "default; MixMatch's official split excludes them, the others include them).")
flags.DEFINE_integer("seed", d.seed, "Seed of the split, shuffling and initialisation.")
flags.DEFINE_string("backbone", d.backbone,
                    "auto, small_cnn, resnet18, resnet50, or a WideResNet wrn<depth>_<width> "
                    "(wrn28_2, wrn28_8) / wrn<depth>_f<filters>, optionally _s<scales> "
                    "(MixMatch-TF's --filters / --scales: wrn28_f135, wrn28_2_s4), with _usb or "
                    "_suncet for that official code's PyTorch WRN (wrn28_2_usb, wrn28_2_suncet).")
flags.DEFINE_enum("norm", d.norm, ["batch", "sync_batch", "ghost_batch", "none"],
                  "Backbone normalisation (ghost_batch: split BN in 8 groups, ASCL's single-device choice).")
flags.DEFINE_enum("conv_padding", d.conv_padding, ["auto", "tf", "torch"],
                  "Padding of strided convolutions: torch (k // 2 on every side, "
                  "torchvision's ResNets, USB's WRN), tf (TF 'same': 0 before, 1 after), "
                  "auto: torch for resnet*, tf for the WideResNets (google-research's).")
flags.DEFINE_string("optimizer", d.optimizer,
                    "sgd, adam, adamw or lars (LARS over SGD momentum; biases and BN excluded).")
flags.DEFINE_float("learning_rate", d.learning_rate, "Peak learning rate.")
flags.DEFINE_float("momentum", d.momentum, "SGD momentum.")
flags.DEFINE_boolean("nesterov", d.nesterov, "Nesterov momentum (sgd and lars).")
flags.DEFINE_float("weight_decay", d.weight_decay,
                   "Weight decay (not on the variables named in --weight_decay_exclude).")
flags.DEFINE_list("weight_decay_exclude", list(d.weight_decay_exclude),
                  "Variable names that never decay (nor, with lars, get the trust ratio): "
                  "biases and BN's gamma / beta by default (USB, PAWS, FixMatch-TF). Empty "
                  "(--weight_decay_exclude=) decays every parameter, as torch's "
                  "SGD(model.parameters(), weight_decay=wd) in the official ASCL, "
                  "SimMatch-ImageNet and self-label codes.")
flags.DEFINE_enum("weight_decay_form", d.weight_decay_form, ["coupled", "decoupled"],
                  "coupled: g <- g + wd * w before the momentum (PyTorch's SGD and Adam; the "
                  "same as TF FixMatch's wd * sum(l2_loss) in the loss; LARS's only form); "
                  "decoupled: w <- w - lr * wd * w (Keras's; AdamW's only form). Unset: "
                  "coupled for lars, decoupled for sgd, adam, adamw.")
flags.DEFINE_integer("warmup_epochs", d.warmup_epochs, "Linear warm-up epochs.")
flags.DEFINE_float("start_learning_rate", d.start_learning_rate,
                   "Learning rate at the start of the warm-up (cosine schedule).")
flags.DEFINE_float("final_learning_rate", d.final_learning_rate,
                   "Learning rate the cosine decay ends at.")
flags.DEFINE_float("lars_trust_coefficient", d.lars_trust_coefficient,
                   "LARS trust coefficient eta (--optimizer=lars; 0.001 in PAWS).")
flags.DEFINE_enum("lr_schedule", d.lr_schedule, ["cosine", "partial_cosine", "step", "constant"],
                  "cosine: warm-up, then 0.5 (1 + cos(pi p)) down to --final_learning_rate; "
                  "partial_cosine: warm-up, then lr cos(pi f p) with f = --lr_cosine_fraction "
                  "(USB and FixMatch: 7/16); step: lr * --lr_step_factor at each of "
                  "--lr_step_epochs (self-label); constant. p = progress after the warm-up.")
flags.DEFINE_float("lr_cosine_fraction", d.lr_cosine_fraction,
                   "partial_cosine: f in lr cos(pi f p) (USB / FixMatch: 7/16 = 0.4375).")
flags.DEFINE_list("lr_step_epochs", [str(e) for e in d.lr_step_epochs],
                  "step: 0-based epochs from which the rate is multiplied by --lr_step_factor "
                  "once more (self-label CIFAR 400 epochs: 240,320).")
flags.DEFINE_float("lr_step_factor", d.lr_step_factor, "step: the multiplier at each epoch.")
flags.DEFINE_float("ema_decay", d.ema_decay, "EMA of weights for evaluation/export (off if unset).")
flags.DEFINE_string("strategy", d.strategy, "auto, default, mirrored, multi_worker, tpu.")
flags.DEFINE_integer("num_cpu_devices", d.num_cpu_devices,
                     "Split the host CPU into N logical devices (mirrored without GPUs).")
flags.DEFINE_boolean("mixed_precision", d.mixed_precision, "float16 (GPU) / bfloat16 compute.")
flags.DEFINE_boolean("deterministic", d.deterministic,
                     "Bit-reproducible runs for a --seed: views applied one image at a time (slower "
                     "input pipeline), and TF op determinism on GPUs.")
flags.DEFINE_integer("knn_k", d.knn_k, "kNN monitor neighbours.")
flags.DEFINE_float("knn_t", d.knn_t, "kNN monitor temperature.")
flags.DEFINE_integer("eval_every", d.eval_every, "Evaluate every N epochs.")
flags.DEFINE_string("export_dir", d.export_dir, "Export root ('' to skip export).")
flags.DEFINE_list("profile_batches", [],
                  "Trace training batches first,last (counted from the start of the run) with "
                  "the TensorFlow profiler (TensorBoard's Profile tab, <workdir>/tensorboard/train).")
flags.DEFINE_boolean("overwrite", d.overwrite,
                     "Train again when --workdir holds a finished run (its summary.json): its "
                     "summary, logs and final weights are replaced. Without it such a rerun says "
                     "so and exits 0.")
flags.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"],
                  "Keras verbosity: 1 progress bar, 2 one line per epoch, auto: 1 on a terminal.")

# Method hyperparameters: --<method>_<argument>, passed to the method's constructor.
METHOD_FLAGS = {
    "supervised": ["label_smoothing"],
    "sela": ["num_clusters", "num_heads", "lam", "tol", "nopts", "schedule",
             "one_head_per_call", "relabel_mode", "max_iters", "augmentation",
             "crop_min_scale"],
    "simmatch": ["temperature", "alpha", "threshold", "lambda_u", "lambda_in", "da_len",
                 "bank_momentum", "teacher", "teacher_momentum", "proj_dims"],
    "fixmatch": ["threshold", "lambda_u", "teacher", "teacher_momentum"],
    "ascl": ["queue_size", "kind", "num_neighbours", "proj_dims", "t1", "t2", "momentum",
             "crop_min_scale", "key_view", "blur_p"],
    "moco": ["queue_size", "proj_dims", "t1", "momentum", "crop_min_scale", "key_view",
             "blur_p"],
    "ascl_byol": ["kind", "num_neighbours", "proj_dims", "pred_hidden", "t2", "momentum",
                  "crop_min_scale"],
    "paws": ["classes_per_batch", "imgs_per_class", "unique_classes", "replacement",
             "support_views", "label_smoothing", "proj_hidden", "proj_dim", "use_pred_head",
             "temperature", "sharpen_t", "me_max", "num_local", "local_size", "recipe",
             "finetune_epochs", "finetune_lr", "finetune_batch_size"],
    "mixmatch": ["num_augmentations", "temperature", "alpha", "lambda_u", "rampup_kimg",
                 "weight_decay", "interleave"],
}
flags.DEFINE_float("supervised_label_smoothing", 0.0, "Label smoothing of the baseline's CE.")
flags.DEFINE_integer("sela_num_clusters", 128, "SeLa: clusters K per head.")
flags.DEFINE_integer("sela_num_heads", 10, "SeLa: clustering heads hc.")
flags.DEFINE_float("sela_lam", 10.0, "SeLa: Sinkhorn lambda (25 ImageNet, 10 CIFAR).")
flags.DEFINE_float("sela_tol", 0.01, "SeLa: Sinkhorn tolerance (0.1 ImageNet, 0.01 CIFAR).")
flags.DEFINE_integer("sela_nopts", 100, "SeLa: number of relabellings over the run.")
flags.DEFINE_enum("sela_schedule", "quadratic", ["quadratic", "linear"],
                  "SeLa: relabel times spread quadratically (ImageNet) or linearly (CIFAR).")
flags.DEFINE_enum("sela_relabel_mode", "train", ["train", "eval"],
                  "SeLa: relabelling pass on augmented images in training mode (official) "
                  "or on plain images in inference mode.")
flags.DEFINE_integer("sela_max_iters", 1000, "SeLa: Sinkhorn iteration bound.")
flags.DEFINE_enum("sela_augmentation", "simclr", ["simclr", "weak", "strong"],
                  "SeLa: training view, simclr (the official transform: resized crop + colour "
                  "jitter), weak (flip/crop) or strong (weak + RandAugment, Cutout).")
flags.DEFINE_float("sela_crop_min_scale", 0.08,
                   "SeLa: smallest crop area of the simclr view (0.08 official ImageNet).")
flags.DEFINE_float("simmatch_temperature", 0.1, "SimMatch: instance similarity temperature t.")
flags.DEFINE_float("simmatch_alpha", 0.9, "SimMatch: weight of p in p_hat (aggregation 1 - alpha).")
flags.DEFINE_float("simmatch_threshold", 0.95, "SimMatch: confidence threshold tau (0.7 ImageNet).")
flags.DEFINE_float("simmatch_lambda_u", 1.0, "SimMatch: L_u weight (10 ImageNet).")
flags.DEFINE_float("simmatch_lambda_in", 1.0, "SimMatch: L_in weight (5 ImageNet).")
flags.DEFINE_integer("simmatch_da_len", 32, "SimMatch: DA queue length (256 ImageNet; 0: no DA).")
flags.DEFINE_float("simmatch_bank_momentum", 0.0,
                   "SimMatch: 0 overwrites bank rows (official); USB blends with 0.7.")
flags.DEFINE_enum("simmatch_teacher", "online", ["online", "ema"],
                  "SimMatch: teacher = the detached online model (CIFAR, USB) or an EMA copy "
                  "(ImageNet).")
flags.DEFINE_float("simmatch_teacher_momentum", 0.999, "SimMatch: EMA teacher momentum.")
flags.DEFINE_list("simmatch_proj_dims", ["128", "128"],
                  "SimMatch: projection head widths (2048,128 ImageNet).")
flags.DEFINE_float("fixmatch_threshold", 0.95, "FixMatch: confidence threshold tau.")
flags.DEFINE_float("fixmatch_lambda_u", 1.0, "FixMatch: L_u weight.")
flags.DEFINE_enum("fixmatch_teacher", "online", ["online", "ema"],
                  "FixMatch: pseudo-labels from the online model (official) or an EMA copy.")
flags.DEFINE_float("fixmatch_teacher_momentum", 0.999, "FixMatch: EMA teacher momentum.")
flags.DEFINE_integer("ascl_queue_size", 4096, "ASCL: queue of keys (65536 ImageNet); a multiple "
                     "of the global unlabeled batch.")
flags.DEFINE_enum("ascl_kind", "ascl", ["ascl", "ahcl", "hard", "moco"], "ASCL: relabelling type.")
flags.DEFINE_integer("ascl_num_neighbours", 1, "ASCL: neighbours K (5 for CIFAR-100).")
flags.DEFINE_list("ascl_proj_dims", ["2048", "128"], "ASCL: projector widths (no BN).")
flags.DEFINE_float("ascl_t1", 0.1, "ASCL: temperature of the contrastive logits.")
flags.DEFINE_float("ascl_t2", 0.05, "ASCL: temperature of the teacher distribution.")
flags.DEFINE_float("ascl_momentum", 0.99, "ASCL: key encoder momentum (0.999 ImageNet).")
flags.DEFINE_float("ascl_crop_min_scale", 0.2, "ASCL: smallest random-resized crop of the query view.")
flags.DEFINE_float("moco_crop_min_scale", 0.2, "MoCo v2: smallest crop of the query view.")
flags.DEFINE_enum("ascl_key_view", "weak", ["weak", "strong"],
                  "ASCL: key view, weak (crop + flip, official) or strong (the query's recipe).")
flags.DEFINE_enum("moco_key_view", "weak", ["weak", "strong"],
                  "MoCo v2: key view, weak (as ASCL's official code) or strong (MoCo v2's).")
flags.DEFINE_float("ascl_blur_p", 0.5, "ASCL: probability of the strong views' Gaussian blur "
                   "(sigma 0.1-2 px, official 0.5).")
flags.DEFINE_float("moco_blur_p", 0.5, "MoCo v2: probability of the views' Gaussian blur "
                   "(official 0.5).")
flags.DEFINE_float("ascl_byol_crop_min_scale", 0.2, "ASCL-BYOL: smallest crop of the query view.")
flags.DEFINE_integer("moco_queue_size", 4096, "MoCo v2: queue of keys.")
flags.DEFINE_list("moco_proj_dims", ["2048", "128"], "MoCo v2: projector widths.")
flags.DEFINE_float("moco_t1", 0.1, "MoCo v2: temperature.")
flags.DEFINE_float("moco_momentum", 0.99, "MoCo v2: key encoder momentum.")
flags.DEFINE_enum("ascl_byol_kind", "ascl", ["ascl", "ahcl", "hard", "moco"],
                  "ASCL-BYOL: relabelling type over the batch's other samples.")
flags.DEFINE_integer("ascl_byol_num_neighbours", 1, "ASCL-BYOL: neighbours K.")
flags.DEFINE_list("ascl_byol_proj_dims", ["2048", "128"], "ASCL-BYOL: projector widths.")
flags.DEFINE_integer("ascl_byol_pred_hidden", 512, "ASCL-BYOL: predictor hidden width.")
flags.DEFINE_float("ascl_byol_t2", 0.05, "ASCL-BYOL: teacher temperature.")
flags.DEFINE_float("ascl_byol_momentum", 0.99, "ASCL-BYOL: target encoder momentum.")
flags.DEFINE_integer("mixmatch_num_augmentations", 2, "MixMatch: K augmentations per unlabeled image.")
flags.DEFINE_float("mixmatch_temperature", 0.5, "MixMatch: sharpening temperature T.")
flags.DEFINE_float("mixmatch_alpha", 0.75, "MixMatch: Beta(alpha, alpha) of MixUp.")
flags.DEFINE_float("mixmatch_lambda_u", 75.0,
                   "MixMatch: L_u weight (75 CIFAR-10, 150 CIFAR-100, 250 SVHN, 50 STL-10).")
flags.DEFINE_float("mixmatch_rampup_kimg", 1024.0,
                   "MixMatch: thousands (x1024) of labeled images over which the L_u weight ramps up.")
flags.DEFINE_float("mixmatch_weight_decay", 0.02,
                   "MixMatch: decoupled decay of kernels after each step, w <- w (1 - wd lr). "
                   "Leave --weight_decay at 0 with MixMatch.")
flags.DEFINE_boolean("mixmatch_interleave", True,
                     "MixMatch: K+1 interleaved forwards, only the first updating BN (official); "
                     "false: one concatenated forward.")
flags.DEFINE_integer("paws_classes_per_batch", 10, "PAWS: classes C' in the (global) support "
                     "batch (10 CIFAR-10; ImageNet 960 = 64 replicas x 15 with --paws_unique_classes).")
flags.DEFINE_integer("paws_imgs_per_class", 16, "PAWS: support images per class (64 CIFAR-10, "
                     "7 ImageNet). The support batch, classes x images, replaces --batch_size.")
flags.DEFINE_boolean("paws_unique_classes", False,
                     "PAWS: each replica samples its own classes_per_batch / replicas classes.")
flags.DEFINE_boolean("paws_replacement", False,
                     "PAWS: sample support images with replacement (classes with fewer labeled "
                     "images than --paws_imgs_per_class are then allowed).")
flags.DEFINE_integer("paws_support_views", 2, "PAWS: views per support image (2 CIFAR, 1 ImageNet).")
flags.DEFINE_float("paws_label_smoothing", 0.1, "PAWS: smoothing of the support labels.")
flags.DEFINE_integer("paws_proj_hidden", 128, "PAWS: projection head hidden width (2048 ImageNet).")
flags.DEFINE_integer("paws_proj_dim", 128, "PAWS: projection output h (2048 ImageNet).")
flags.DEFINE_boolean("paws_use_pred_head", False, "PAWS: prediction head (ImageNet).")
flags.DEFINE_float("paws_temperature", 0.1, "PAWS: soft nearest-neighbour temperature tau.")
flags.DEFINE_float("paws_sharpen_t", 0.25, "PAWS: target sharpening temperature T.")
flags.DEFINE_boolean("paws_me_max", True, "PAWS: the ME-MAX regulariser.")
flags.DEFINE_integer("paws_num_local", 6, "PAWS: local multi-crops per unlabeled image (0: off).")
flags.DEFINE_integer("paws_local_size", None, "PAWS: local crop side (default 18/32 of the image).")
flags.DEFINE_enum("paws_recipe", None, ["cifar", "imagenet"],
                  "PAWS: view recipe (default: imagenet above 96 px, else cifar).")
flags.DEFINE_integer("paws_finetune_epochs", 100,
                     "PAWS: epochs of the fine-tuning evaluation on the labeled set (0: skip).")
flags.DEFINE_float("paws_finetune_lr", 0.01, "PAWS: fine-tuning learning rate (SGD Nesterov, cosine).")
flags.DEFINE_integer("paws_finetune_batch_size", 64, "PAWS: fine-tuning batch size.")
flags.DEFINE_boolean("sela_one_head_per_call", False,
                     "SeLa: relabel one head per call (CIFAR) instead of all (ImageNet).")


def config_from_flags() -> TrainConfig:
    fields = {f.name for f in __import__("dataclasses").fields(TrainConfig)} - {"method_args"}
    kwargs = {name: getattr(F, name) for name in fields}
    kwargs["export_dir"] = F.export_dir or None
    kwargs["verbose"] = F.verbose if F.verbose == "auto" else int(F.verbose)
    kwargs["weight_decay_exclude"] = tuple(F.weight_decay_exclude)
    try:
        kwargs["lr_step_epochs"] = tuple(int(e) for e in F.lr_step_epochs)
    except ValueError:
        sys.exit(f"error: --lr_step_epochs takes integers, got {','.join(F.lr_step_epochs)}.")
    try:
        kwargs["profile_batches"] = tuple(int(b) for b in F.profile_batches)
    except ValueError:
        sys.exit(f"error: --profile_batches takes two integers, got {','.join(F.profile_batches)}.")
    if F["label_fraction"].present and not F["labels_per_class"].present:
        kwargs["labels_per_class"] = None
    method_args = {a: getattr(F, f"{F.method}_{a}") for a in METHOD_FLAGS.get(F.method, [])}
    return TrainConfig(**kwargs, method_args=method_args)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    cfg = config_from_flags()
    from tfssl.train import AlreadyFinished, NonFiniteLoss, run

    try:
        summary = run(cfg)
    except AlreadyFinished as e:
        print(e)
        return
    except ConfigError as e:  # found before training: a message, not a traceback
        sys.exit(f"error: {e}")
    except (WorkerLost, NonFiniteLoss) as e:
        sys.exit(f"error: {e}")
    print(f"summary: {os.path.join(cfg.workdir, 'summary.json')}")
    print({k: summary[k] for k in ("method", "dataset", "num_labeled", "metrics", "export")})


if __name__ == "__main__":
    app.run(main)
