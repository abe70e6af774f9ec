"""MixMatch (Berthelot et al., NeurIPS 2019), following the official code."""

from __future__ import annotations

from typing import Dict, Optional

import keras
import tensorflow as tf

from tfssl import augment, distribute
from tfssl.methods.base import SSLModel
from tfssl.ops import mixmatch as mm
from tfssl.ops import targets


@keras.saving.register_keras_serializable(package="tfssl")
class MixMatch(SSLModel):
    """MixMatch: guessed labels for K augmentations, MixUp of labeled and
    unlabeled rows, soft CE on the labeled part and L2 on the unlabeled part.

    Data: ``{"labeled": {"weak": [B, H, W, C], "label": [B]},
    "unlabeled": {"aug0": [B, ...], ..., "aug{K-1}": [B, ...]}}``, images in [0, 1],
    the unlabeled set excluding the labeled images (the official split; the
    class attribute ``include_labeled_in_unlabeled = False`` makes it the default
    of ``scripts/train.py`` for this method).

    One step (official code):
      1. ``q = sharpen(1/K sum_k softmax(f(u_k)), T)``, training-mode BN, no
         gradient; its BN statistics updates are discarded.
      2. ``W = [X, U_1..U_K]`` with targets ``[onehot(y), q, .., q]``; per row
         ``lambda ~ Beta(alpha, alpha)``, ``lambda' = max(lambda, 1 - lambda)``,
         a random partner; ``W' = lambda' W + (1 - lambda') W[perm]``. The first
         B rows are X', the rest U'.
      3. Interleave X', U'_1..U'_K so that each of the K+1 forwards holds labeled
         and unlabeled rows; only the FIRST forward's BN moving statistics are
         kept (``interleave=False``: one concatenated forward instead, a
         deviation from the official code that this class offers to measure).
      4. ``L = H(X' targets, f(X')) + w(t) * mean_{i,c} (U' targets - softmax(f(U')))^2``,
         ``w(t) = lambda_u * clip(images_seen / rampup_images, 0, 1)``, images
         seen counted in labeled images (global batch x steps).
      5. Optimizer step, then decoupled weight decay on conv/dense kernels only,
         ``w <- w (1 - wd * lr)``; EMA (``ema_decay``) of the trainable weights,
         used only for evaluation and export, with the raw model's BN statistics.

    Under a strategy the MixUp partners and coefficients are drawn over the
    GLOBAL batch (inputs and guesses are all-gathered, the draws come from a
    stateless seed of (seed, step)), so the result does not depend on the
    replica count; each replica then trains on its slice. With batch norm, the
    interleaved forwards' BN batches still depend on the replica layout (as in
    any data-parallel run).

    Args:
      encoder: images -> features.
      num_classes: C.
      num_augmentations: K unlabeled augmentations (2).
      temperature: sharpening T (0.5).
      alpha: Beta concentration (0.75).
      lambda_u: weight of L_u after the ramp (75 CIFAR-10, 150 CIFAR-100, 250
        SVHN, 50 STL-10).
      rampup_images: images seen over which w ramps linearly (1024 * 1024).
      weight_decay: decoupled decay wd of kernels (0.02; applied as wd * lr).
      ema_decay: EMA of the weights for evaluation (0.999).
      interleave: K+1 interleaved forwards (official) or one concatenated one.
      seed: seed of the MixUp draws.
    """

    include_labeled_in_unlabeled = False

    def __init__(self, encoder: keras.Model, num_classes: int, num_augmentations: int = 2,
                 temperature: float = 0.5, alpha: float = 0.75, lambda_u: float = 75.0,
                 rampup_images: int = 1024 * 1024, weight_decay: float = 0.02,
                 ema_decay: Optional[float] = 0.999, interleave: bool = True, seed: int = 0,
                 **kwargs):
        super().__init__(encoder, num_classes=num_classes, ema_decay=ema_decay, **kwargs)
        if num_augmentations < 1:
            raise ValueError(f"num_augmentations must be >= 1, got {num_augmentations}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}.")
        if lambda_u < 0 or weight_decay < 0 or rampup_images < 0:
            raise ValueError("lambda_u, weight_decay and rampup_images must be >= 0.")
        self.num_augmentations = num_augmentations
        self.temperature, self.alpha = temperature, alpha
        self.lambda_u, self.rampup_images = lambda_u, rampup_images
        self.weight_decay, self.interleave, self.seed = weight_decay, interleave, seed
        self.loss = self.tracker("loss")
        self.loss_x = self.tracker("loss_x")
        self.loss_u = self.tracker("loss_u")
        self.w_u = self.tracker("w_u")
        self.guess_top1 = self.tracker("guess_top1")
        self._kernels = [v for v in self.encoder.trainable_variables + self.head.trainable_variables
                         if v.path.endswith("kernel")]
        self._bn_stats = [v for v in self.encoder.non_trainable_variables
                          if v.path.endswith(("moving_mean", "moving_variance"))]
        self.init_ema()

    # ---------------------------------------------------------------- views
    @classmethod
    def views(cls, opts: Dict, num_augmentations: int = 2, **unused):
        """Labeled ``weak``; unlabeled ``aug0..aug{K-1}``: K independent weak
        views (flip where the data allows + reflect-pad-and-crop)."""
        return ({"weak": augment.weak(**opts)},
                {f"aug{k}": augment.weak(**opts) for k in range(num_augmentations)})

    @classmethod
    def from_args(cls, encoder, source, rampup_kimg: Optional[float] = None, **kwargs):
        """``rampup_kimg`` (the official flag, x1024 images) sets ``rampup_images``."""
        if rampup_kimg is not None:
            kwargs["rampup_images"] = int(round(rampup_kimg * 1024))
        return cls(encoder=encoder, num_classes=source.num_classes, **kwargs)

    # ----------------------------------------------------------------- step
    def _bn_read(self):
        return [tf.identity(tf.convert_to_tensor(v)) for v in self._bn_stats]

    def _bn_write(self, values):
        for v, x in zip(self._bn_stats, values):
            v.assign(x)

    def train_step(self, data):
        data = self.unpack(data)
        x, y = data["labeled"]["weak"], data["labeled"]["label"]
        us = [data["unlabeled"][f"aug{k}"] for k in range(self.num_augmentations)]
        c = self.num_classes
        b = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
        b_u = us[0].shape[0] if us[0].shape[0] is not None else tf.shape(us[0])[0]

        # 1. Label guess: online model, training-mode BN, BN updates discarded.
        bn = self._bn_read()
        probs = [tf.nn.softmax(tf.cast(self(u, training=True), tf.float32)) for u in us]
        self._bn_write(bn)
        q = tf.stop_gradient(targets.guess_labels(tf.stack(probs), self.temperature))
        if "label" in data["unlabeled"]:  # diagnostic: guess accuracy where labels are known
            true = tf.cast(data["unlabeled"]["label"], tf.int64)
            self.guess_top1.update_state(tf.cast(tf.equal(tf.argmax(q, -1), true), tf.float32),
                                         sample_weight=tf.cast(true >= 0, tf.float32))

        # 2. MixUp over the global batch; this replica keeps its rows.
        parts = [x] + us
        dists = [tf.one_hot(y, c)] + [q] * self.num_augmentations
        gathered = distribute.all_gather_many(parts + dists)  # one collective for all
        gx, gp = gathered[:len(parts)], gathered[len(parts):]
        sizes = [tf.shape(t)[0] for t in gx]
        step = tf.cast(self.optimizer.iterations, tf.int64)
        lam, perm = targets.mixup_draws(tf.add_n(sizes), self.alpha,
                                        tf.stack([tf.constant(self.seed, tf.int64), step]))
        xm, pm = targets.mixup(tf.concat(gx, 0), tf.concat(gp, 0), lam, perm)
        replica = tf.distribute.get_replica_context()
        r = replica.replica_id_in_sync_group if replica is not None else 0
        starts = tf.math.cumsum(tf.stack(sizes), exclusive=True)
        own = [(starts[0] + r * b, b)] + [(starts[k + 1] + r * b_u, b_u)
                                          for k in range(self.num_augmentations)]
        xs = [tf.ensure_shape(xm[s:s + n], [n if isinstance(n, int) else None] + x.shape[1:])
              for s, n in own]
        ps = [pm[s:s + n] for s, n in own]

        with tf.GradientTape() as tape:
            logits = self._forwards(xs)
            logits_x, logits_u = logits[0], tf.concat(logits[1:], 0)
            loss_x = tf.reduce_mean(targets.soft_cross_entropy(ps[0], logits_x))
            loss_u = mm.l2_unlabeled_loss(tf.concat(ps[1:], 0), logits_u)
            images_seen = tf.cast(self.optimizer.iterations, tf.float32) * tf.cast(sizes[0],
                                                                                  tf.float32)
            w = self.lambda_u * mm.linear_rampup(images_seen, self.rampup_images)
            loss = loss_x + w * loss_u
        self.loss.update_state(loss)
        self.loss_x.update_state(loss_x)
        self.loss_u.update_state(loss_u)
        self.w_u.update_state(w)
        self.apply_loss(tape, loss)
        self._decay_kernels()
        return self.train_results()

    def _forwards(self, xs):
        """Logits of the mixed batches [X', U'_1..U'_K], in that order."""
        if not self.interleave:
            cut = [tf.shape(t)[0] for t in xs]
            out = tf.cast(self(tf.concat(xs, 0), training=True), tf.float32)
            return tf.split(out, cut, axis=0)
        if any(t.shape[0] != xs[0].shape[0] for t in xs) and all(
                t.shape[0] is not None for t in xs):
            raise ValueError("interleave needs the unlabeled batch equal to the labeled one "
                             f"(got {[t.shape[0] for t in xs]} rows per replica); use "
                             "interleave=False or --unlabeled_batch_size=--batch_size.")
        batches = mm.interleave(xs)
        logits = [tf.cast(self(batches[0], training=True), tf.float32)]
        bn = self._bn_read()  # only the first forward's BN statistics are kept
        logits += [tf.cast(self(t, training=True), tf.float32) for t in batches[1:]]
        self._bn_write(bn)
        return mm.interleave(logits)

    def _decay_kernels(self):
        """``w <- w (1 - wd * lr)`` for conv/dense kernels, after the optimizer step."""
        if not self.weight_decay:
            return
        lr = tf.cast(self.optimizer.learning_rate, tf.float32)
        factor = 1.0 - self.weight_decay * lr
        for v in self._kernels:
            v.assign(v * tf.cast(factor, v.dtype))

    def get_config(self):
        return {**super().get_config(), "num_augmentations": self.num_augmentations,
                "temperature": self.temperature, "alpha": self.alpha,
                "lambda_u": self.lambda_u, "rampup_images": self.rampup_images,
                "weight_decay": self.weight_decay, "interleave": self.interleave,
                "seed": self.seed}
