"""PAWS (Assran et al., ICCV 2021): predicting view assignments with support
samples. Semi-supervised and non-parametric: no classifier is trained; an
unlabeled view is classified by its soft nearest neighbours among a
class-balanced labeled support batch."""

from __future__ import annotations

from typing import Dict, Optional

import keras
import numpy as np
import tensorflow as tf

from tfssl import augment, distribute
from tfssl.methods.base import SSLModel
from tfssl.models import heads
from tfssl.ops import paws as paws_ops


def projection_head(input_dim: int, hidden: int, out: int, name: str = "projector") -> keras.Model:
    """``Dense(h) -> BN -> ReLU -> Dense(h) -> BN -> ReLU -> Dense(out)`` (synchronised
    BN: the official code converts the heads to SyncBN)."""
    return heads.mlp((hidden, hidden, out), input_dim, batch_norm=True, synchronized=True,
                     name=name)


def prediction_head(dim: int, name: str = "predictor") -> keras.Model:
    """``BN -> Dense(dim/4) -> BN -> ReLU -> Dense(dim)`` (PAWS ImageNet)."""
    x = inp = keras.Input(shape=(dim,))
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=True,
                                        name="bn_in")(x)
    x = keras.layers.Dense(max(1, dim // 4), use_bias=False, name="dense0")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=True,
                                        name="bn0")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dense(dim, name="dense1")(x)
    return keras.Model(inp, x, name=name)


@keras.saving.register_keras_serializable(package="tfssl")
class PAWS(SSLModel):
    """PAWS with multi-crop, sharpened swapped targets and ME-MAX.

    Data (global batches)::

      {"labeled":   {"view_0": [m, S, S, C], ..., "view_{V-1}": [m, ...], "label": [m]},
       "unlabeled": {"global_0": [b, S, S, C], "global_1": [b, ...],
                     "local_0": [b, s, s, C], ..., "label": [b]}}

    ``labeled`` is a support batch of ``m = classes_per_batch * imgs_per_class``
    images in the class-interleaved layout of ``tfssl.data.support_stream``
    (``tfssl.ops.paws.support_labels`` labels it; the model checks the layout
    against ``labeled.label`` every step). ``unlabeled.label`` (-1 if unknown)
    only feeds the ``pseudo_top1`` diagnostic.

    One step (official code):
      1. ``h = g(f(x))`` (projection head), ``z = p(h)`` (prediction head, or
         ``z = h``), for the supports and global views in one forward and the
         local crops in a second (another resolution).
      2. Anchors: ``z`` of every unlabeled view; anchor supports: ``z`` of the
         supports, all-gathered over replicas WITH gradient.
      3. Targets (no gradient): ``t = sharpen(snn(h_global swapped, h_supports), T)``,
         local crops get the mean of the two global targets, ``t < 1e-4 -> 0``.
      4. ``L_paws = mean_i H(t_i, snn(z_i, z_supports))``;
         ``L_me = sum_c p_bar_c log p_bar_c`` with
         ``p_bar = mean_{anchors, replicas} sharpen(snn(z_i, z_supports), T)``;
         ``L = L_paws + L_me``.
    with ``snn(q, S) = softmax(norm(q) . norm(S)^T / tau) @ Y_S``.

    Evaluation (``tfssl.evaluation.snn``): the soft nearest-neighbour classifier
    over the labeled set's ``h`` embeddings, and fine-tuning
    (``tfssl.evaluation.finetune``: the first projection layer kept, a new
    zero-initialised output).

    Args:
      encoder: images -> features (the backbone f); it is made to accept the
        local crops' size (``tfssl.models.accept_any_image_size``).
      num_classes: classes of the dataset (evaluation only: the loss's columns
        are the sampled classes of the step).
      classes_per_batch: C' classes in the (global) support batch.
      imgs_per_class: support images per class.
      unique_classes: each replica gets its own C'/R classes (ImageNet's 15 per
        GPU); otherwise every replica holds every class of the step.
      label_smoothing: of the support labels (0.1).
      proj_hidden, proj_dim: projection head widths (CIFAR: 128, 128; ImageNet:
        2048, 2048).
      use_pred_head: the prediction head (ImageNet yes, CIFAR no).
      temperature: tau of the SNN (0.1).
      sharpen_t: T of the targets and of ME-MAX (0.25).
      me_max: add the ME-MAX regulariser.
      finetune_epochs: epochs of the fine-tuning evaluation after training
        (0: skip it), with ``finetune_lr`` and ``finetune_batch_size``.
    """

    def __init__(self, encoder: keras.Model, num_classes: Optional[int] = None,
                 classes_per_batch: int = 10, imgs_per_class: int = 16,
                 unique_classes: bool = False, label_smoothing: float = 0.1,
                 proj_hidden: int = 128, proj_dim: int = 128, use_pred_head: bool = False,
                 temperature: float = 0.1, sharpen_t: float = 0.25, me_max: bool = True,
                 finetune_epochs: int = 100, finetune_lr: float = 0.01,
                 finetune_batch_size: int = 64, **kwargs):
        super().__init__(heads.accept_any_image_size(encoder), num_classes=None, **kwargs)
        if classes_per_batch < 2 or imgs_per_class < 1:
            raise ValueError("PAWS needs classes_per_batch >= 2 and imgs_per_class >= 1.")
        if not (temperature > 0 and sharpen_t > 0 and 0 <= label_smoothing < 1):
            raise ValueError("temperature and sharpen_t must be > 0, label_smoothing in [0, 1).")
        self.dataset_classes = num_classes
        self.classes_per_batch, self.imgs_per_class = classes_per_batch, imgs_per_class
        self.unique_classes, self.label_smoothing = unique_classes, label_smoothing
        self.proj_hidden, self.proj_dim, self.use_pred_head = proj_hidden, proj_dim, use_pred_head
        self.temperature, self.sharpen_t, self.use_me_max = temperature, sharpen_t, me_max
        if finetune_epochs < 0 or finetune_batch_size < 1 or not finetune_lr > 0:
            raise ValueError("finetune_epochs must be >= 0, finetune_batch_size >= 1, "
                             "finetune_lr > 0.")
        self.finetune_epochs, self.finetune_lr = finetune_epochs, finetune_lr
        self.finetune_batch_size = finetune_batch_size
        self.finetuned = None  # (encoder, head) after final_evaluation, for export
        self.projector = projection_head(self.feature_dim, proj_hidden, proj_dim)
        self.predictor = prediction_head(proj_dim) if use_pred_head else None
        for name in ("loss", "loss_paws", "loss_me", "pseudo_top1", "mean_max_target"):
            setattr(self, f"m_{name}", self.tracker(name))

    # ------------------------------------------------------------- plumbing
    @classmethod
    def views(cls, opts: Dict, local_size: Optional[int] = None, num_local: int = 6,
              recipe: Optional[str] = None, support_views: int = 2, **unused):
        """Supports ``view_0..``; unlabeled ``global_0/1`` + ``local_0..`` (see
        ``tfssl.augment.paws``). Default local size: 18/32 of the image side;
        default recipe: ``imagenet`` above 96 px, else ``cifar``."""
        size = opts["size"]
        local_size = local_size or max(4, round(size * 18 / 32))
        recipe = recipe or ("imagenet" if size > 96 else "cifar")
        return augment.paws(size, local_size, num_local, opts["channels"], recipe,
                            flip=opts.get("flip", True), support_views=support_views)

    @classmethod
    def support_sampling(cls, replicas: int, classes_per_batch: int = 10,
                         imgs_per_class: int = 16, unique_classes: bool = False,
                         replacement: bool = False, **unused) -> Dict:
        """The class-stratified sampler's arguments (``tfssl.data.support_stream``)."""
        return dict(classes_per_batch=classes_per_batch, imgs_per_class=imgs_per_class,
                    num_chunks=replicas if unique_classes else 1, replacement=replacement)

    @classmethod
    def from_args(cls, encoder, source, local_size=None, num_local=None, recipe=None,
                  support_views=None, replacement=None, **kwargs):
        """The view and sampler arguments only shape the data (``views``,
        ``support_sampling``)."""
        return cls(encoder=encoder, num_classes=source.num_classes, **kwargs)

    def training_callbacks(self, ctx) -> list:
        from tfssl.evaluation.snn import SNNMonitor

        if "bank" not in ctx:
            return []
        return [SNNMonitor(ctx["bank"], ctx["test"], ctx["source"].num_classes, self.temperature,
                           ctx.get("eval_every", 1))]

    def final_evaluation(self, ctx) -> Dict[str, float]:
        """``snn_top1`` (labeled set as supports) and, if ``finetune_epochs``,
        ``finetune_top1`` (a fine-tuned copy, kept in ``self.finetuned`` for export)."""
        from tfssl import data
        from tfssl.evaluation import snn
        from tfssl.evaluation.finetune import fine_tune

        source = ctx["source"]
        out = {"snn_top1": snn.snn_accuracy(snn.embedding_fn(self), ctx["bank"], ctx["test"],
                                            source.num_classes, self.temperature)}
        if self.finetune_epochs:
            # The dataset's weak view (flip + crop): the usual fine-tuning augmentation.
            view = (augment.weak(**ctx["view_options"]) if "view_options" in ctx
                    else ctx["labeled_views"]["view_0"])
            stream = data.semi_supervised(
                source, ctx["labeled_ids"], {"weak": view}, self.finetune_batch_size,
                seed=ctx.get("seed", 0), deterministic=ctx.get("deterministic", False))
            res = fine_tune(self.encoder, self.projector, stream, len(ctx["labeled_ids"]),
                           ctx["test"], source.num_classes, self.finetune_epochs,
                           self.finetune_batch_size, self.finetune_lr, view="weak")
            out["finetune_top1"] = res["top1"]
            self.finetuned = (res["encoder"], res["head"])
        return out

    def serving_head(self, labeled=None):
        """features -> projector -> SNN over the labeled set's embeddings (stored
        in the SavedModel): probabilities over the dataset's classes."""
        from tfssl.evaluation.snn import build_snn_head

        if labeled is None or self.dataset_classes is None:
            return None
        snn_head = build_snn_head(self, labeled, self.dataset_classes, self.temperature)
        inp = keras.Input(shape=(self.feature_dim,))
        return keras.Model(inp, snn_head(self.projector(inp)), name="snn_classifier"), True

    def support_label_matrix(self, num_views: int) -> np.ndarray:
        """[V * m, C'] labels of the gathered supports (global layout, per view)."""
        chunks = distribute.num_replicas() if self.unique_classes else 1
        return paws_ops.support_labels(self.classes_per_batch, self.imgs_per_class, num_views,
                                       self.label_smoothing, chunks)

    def embed(self, x, training=True):
        """(h, z): projection and prediction outputs, float32 [B, proj_dim]."""
        h = tf.cast(self.projector(self.encoder(x, training=training), training=training),
                    tf.float32)
        z = h if self.predictor is None else tf.cast(self.predictor(h, training=training),
                                                     tf.float32)
        return h, z

    def _gather_supports(self, x, num_views, grad):
        """[V * m_local, d] per-replica supports -> [V * m, d] global layout."""
        d = x.shape[-1]
        x = tf.reshape(x, [num_views, -1, d])
        x = (distribute.all_gather_with_grad(x, axis=1) if grad
             else distribute.all_gather(x, axis=1))
        return tf.reshape(x, [-1, d])

    # ----------------------------------------------------------------- step
    def train_step(self, data):
        data = self.unpack(data)
        sup, unl = data["labeled"], data["unlabeled"]
        num_views = len([k for k in sup if k.startswith("view_")])
        num_local = len([k for k in unl if k.startswith("local_")])
        if num_views < 1 or "global_0" not in unl or "global_1" not in unl:
            raise ValueError("PAWS needs labeled view_0.. and unlabeled global_0, global_1 views.")
        supports = tf.concat([sup[f"view_{v}"] for v in range(num_views)], 0)
        g = tf.concat([unl["global_0"], unl["global_1"]], 0)
        m_local, b = tf.shape(supports)[0], tf.shape(unl["global_0"])[0]
        labels = tf.constant(self.support_label_matrix(num_views))
        col_class = self._column_classes(sup, num_views, labels)

        with tf.GradientTape() as tape:
            h, z = self.embed(tf.concat([supports, g], 0))
            h_s, h_g = h[:m_local], h[m_local:]
            z_s, z_anchor = z[:m_local], z[m_local:]
            if num_local:
                _, z_local = self.embed(tf.concat([unl[f"local_{i}"] for i in range(num_local)], 0))
                z_anchor = tf.concat([z_anchor, z_local], 0)
            # Targets: h of the global views, swapped, against h of the supports.
            target_supports = self._gather_supports(tf.stop_gradient(h_s), num_views, grad=False)
            t = paws_ops.paws_targets(
                paws_ops.snn(tf.stop_gradient(h_g), target_supports, labels, self.temperature),
                num_local, self.sharpen_t)
            anchor_supports = self._gather_supports(z_s, num_views, grad=True)
            probs = paws_ops.snn(z_anchor, anchor_supports, labels, self.temperature)
            loss_paws = paws_ops.paws_cross_entropy(t, probs)
            loss_me = (paws_ops.me_max(probs, self.sharpen_t,
                                       distribute.all_reduce_mean_identity_grad)
                       if self.use_me_max else tf.constant(0.0))
            loss = loss_paws + loss_me
        self.m_loss.update_state(loss)
        self.m_loss_paws.update_state(loss_paws)
        self.m_loss_me.update_state(loss_me)
        t_global = t[:2 * b]
        self.m_mean_max_target.update_state(tf.reduce_max(t_global, -1))
        if "label" in unl:
            true = tf.cast(tf.concat([unl["label"], unl["label"]], 0), tf.int64)
            pred = tf.gather(col_class, tf.argmax(t_global, -1))
            self.m_pseudo_top1.update_state(tf.cast(tf.equal(pred, true), tf.float32),
                                            sample_weight=tf.cast(true >= 0, tf.float32))
        self.apply_loss(tape, loss)
        return self.train_results()

    def _column_classes(self, sup, num_views, labels):
        """The dataset class of each support column, from the gathered support
        labels; fails if a column's rows are not all of one class (a support
        batch whose layout does not match the label matrix)."""
        y = tf.tile(distribute.all_gather(tf.cast(sup["label"], tf.int64)), [num_views])
        cols = tf.argmax(labels, -1, output_type=tf.int32)
        lo = tf.math.unsorted_segment_min(y, cols, self.classes_per_batch)
        hi = tf.math.unsorted_segment_max(y, cols, self.classes_per_batch)
        tf.debugging.assert_equal(
            lo, hi, message="PAWS: the support batch is not in the class-interleaved layout of "
                            "its label matrix (use tfssl.data.support_stream).")
        return hi

    def get_config(self):
        return {**super().get_config(), "num_classes": self.dataset_classes,
                "classes_per_batch": self.classes_per_batch,
                "imgs_per_class": self.imgs_per_class, "unique_classes": self.unique_classes,
                "label_smoothing": self.label_smoothing, "proj_hidden": self.proj_hidden,
                "proj_dim": self.proj_dim, "use_pred_head": self.use_pred_head,
                "temperature": self.temperature, "sharpen_t": self.sharpen_t,
                "me_max": self.use_me_max, "finetune_epochs": self.finetune_epochs,
                "finetune_lr": self.finetune_lr, "finetune_batch_size": self.finetune_batch_size}
