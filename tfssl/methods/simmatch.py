"""SimMatch (Zheng et al., CVPR 2022) and FixMatch (Sohn et al., 2020) as its
special case."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfssl import augment, distribute
from tfssl.methods.base import SSLModel
from tfssl.models import heads
from tfssl.ops import memory_bank, similarity, targets


@keras.saving.register_keras_serializable(package="tfssl")
class SimMatch(SSLModel):
    """SimMatch: semantic and instance similarity with a labeled memory bank.

    Data: ``{"labeled": {"weak": [B, H, W, C], "label": [B], "index": [B]},
    "unlabeled": {"weak": [B_u, ...], "strong": [B_u, ...], "label": [B_u]}}``;
    ``labeled.index`` is the dataset index of each labeled image (the bank is
    indexed by it), ``unlabeled.label`` (-1 where unknown) is only used for the
    pseudo-label accuracy diagnostic.

    One step (official code; "teacher" = the online model detached, or an EMA
    copy with ``teacher="ema"``):
      1. Student logits of the labeled weak and unlabeled strong views, and the
         embedding ``z^s`` of the strong views; teacher probabilities ``p`` and
         embeddings ``z^w`` of the weak views, embeddings ``k`` of the labeled.
      2. DA: ``p <- normalize(p / mean(queue))``, the queue holding the last
         ``da_len`` batch means (averaged over replicas; this step's included),
         the mean over the rows filled so far (the queue starts empty).
      3. After ``warmup_steps`` (one epoch: the bank is filling):
         ``q^w = softmax(z^w . bank^T / t)``,
         ``q_hat = normalize(q^w * unfold(p))``,
         ``p_hat = alpha p + (1 - alpha) aggregate(q^w)``,
         ``L_in = mean_i H(q_hat_i, softmax(z^s_i . bank^T / t))``.
         Before it, ``p_hat = p`` and ``L_in = 0``.
      4. ``mask = max(p_hat) >= tau``;
         ``L_u = 1/B_u sum_i mask_i H(p_hat_i, softmax(logits^s_i))``.
      5. ``L = L_x + lambda_u L_u + lambda_in L_in``; then the bank rows of the
         labeled images get ``k`` (gathered from every replica first; the step
         read the bank as it was before this write).

    FixMatch (``FixMatch``) is ``lambda_in = 0``, no aggregation, no DA, hard
    argmax pseudo-labels: no bank.

    Args:
      encoder: images -> features h.
      num_classes: C.
      labeled_ids: [N_l] dataset indices of the labeled images (bank rows, in
        this order). Needed when the instance branch is on.
      labeled_labels: [N_l] their labels (the bank labels).
      num_train: N, dataset indices are in [0, N) (default: max(labeled_ids)+1).
      proj_dims: projection head ``Dense -> ReLU -> Dense`` widths ((128, 128)
        on CIFAR as USB, (2048, 128) ImageNet), L2-normalised output.
      temperature: t of the instance similarities (0.1).
      alpha: p's weight in p_hat (0.9).
      threshold: tau (0.95 CIFAR, 0.7 ImageNet).
      lambda_u, lambda_in: loss weights (1, 1 CIFAR; 10, 5 ImageNet).
      da_len: DA queue length (32 CIFAR, 256 ImageNet); 0 turns DA off.
      bank_momentum: 0 (overwrite, official) or USB's blended write (0.7).
      teacher: ``online`` (detached student, USB on CIFAR) or ``ema``.
      teacher_momentum: m of the EMA teacher (0.999).
      warmup_steps: optimizer steps without propagation (None: one epoch, set
        by ``scripts/train.py``; 0 when training by hand unless given).
      hard_labels: FixMatch's argmax pseudo-labels instead of soft p_hat.
      ema_decay: optional EMA of the weights for evaluation (0.999 in USB).
    """

    needs_labeled_ids = True

    def __init__(self, encoder: keras.Model, num_classes: int,
                 labeled_ids: Optional[Sequence[int]] = None,
                 labeled_labels: Optional[Sequence[int]] = None, num_train: Optional[int] = None,
                 proj_dims: Sequence[int] = (128, 128), temperature: float = 0.1,
                 alpha: float = 0.9, threshold: float = 0.95, lambda_u: float = 1.0,
                 lambda_in: float = 1.0, da_len: int = 32, bank_momentum: float = 0.0,
                 teacher: str = "online", teacher_momentum: float = 0.999,
                 warmup_steps: Optional[int] = None, hard_labels: bool = False,
                 ema_decay: Optional[float] = None, **kwargs):
        super().__init__(encoder, num_classes=num_classes, ema_decay=ema_decay, **kwargs)
        if teacher not in ("online", "ema"):
            raise ValueError(f"teacher must be 'online' or 'ema', got {teacher!r}.")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}.")
        if not 0.0 <= alpha <= 1.0 or not 0.0 <= bank_momentum < 1.0:
            raise ValueError("alpha must be in [0, 1] and bank_momentum in [0, 1).")
        if not temperature > 0 or lambda_u < 0 or lambda_in < 0 or da_len < 0:
            raise ValueError("temperature must be > 0; lambda_u, lambda_in, da_len >= 0.")
        self.temperature, self.alpha, self.threshold = temperature, alpha, threshold
        self.lambda_u, self.lambda_in, self.da_len = lambda_u, lambda_in, da_len
        self.bank_momentum, self.teacher = bank_momentum, teacher
        self.teacher_momentum, self.hard_labels = teacher_momentum, hard_labels
        self.warmup_steps = warmup_steps
        self.proj_dims = tuple(proj_dims)
        self.uses_bank = lambda_in > 0 or alpha < 1.0
        self.projector = None
        if self.uses_bank:
            if labeled_ids is None or labeled_labels is None:
                raise ValueError("SimMatch's bank needs labeled_ids and labeled_labels.")
            labeled_ids = np.asarray(labeled_ids, np.int64)
            labeled_labels = np.asarray(labeled_labels, np.int64)
            if labeled_ids.shape != labeled_labels.shape or len(set(labeled_ids)) != len(labeled_ids):
                raise ValueError("labeled_ids must be distinct and match labeled_labels.")
            num_train = int(num_train or labeled_ids.max() + 1)
            slot_of = np.full([num_train], -1, np.int64)
            slot_of[labeled_ids] = np.arange(len(labeled_ids))
            self.labeled_ids = labeled_ids
            self.num_train = num_train
            self.projector = heads.mlp(self.proj_dims, self.feature_dim, name="projector")
            # Bank: one teacher embedding per labeled image, random unit vectors
            # until written; labels known up front.
            k, d = len(labeled_ids), self.proj_dims[-1]
            init = np.random.default_rng(0).normal(size=(k, d)).astype("float32")
            self.bank = self.state_variable("bank", (k, d))
            self.bank.assign(init / np.linalg.norm(init, axis=1, keepdims=True))
            self.bank_labels = self.state_variable("bank_labels", (k,), "int64")
            self.bank_labels.assign(labeled_labels)
            self.slot_of = self.state_variable("slot_of", (num_train,), "int64")
            self.slot_of.assign(slot_of)
        if da_len:
            # Empty (zeros) until written; DA divides by the mean of the filled
            # rows (the official queue starts at zeros).
            self.da_queue = self.state_variable("da_queue", (da_len, num_classes))
            self.da_pointer = self.state_variable("da_pointer", (), "int64")
        self.teacher_net = None
        if teacher == "ema":
            self._build_teacher()
        for name in ("loss", "loss_x", "loss_u", "loss_in", "mask_rate", "pseudo_top1"):
            setattr(self, f"m_{name}", self.tracker(name))
        self.init_ema()

    # ------------------------------------------------------------- plumbing
    @classmethod
    def views(cls, opts: Dict, **unused):
        """Labeled ``weak``; unlabeled ``weak`` and ``strong``.

        At CIFAR/SVHN/STL sizes (``opts`` without ``resized_crop_scale``): weak
        is flip + pad-and-crop, strong is weak + USB's RandAugment (3 ops) + Cutout
        (``tfssl.randaugment``).
        At ImageNet size (``resized_crop_scale`` given), the official SimMatch
        ImageNet views (``data/transforms.py``): weak is a random-resized crop of
        area (0.2, 1) + flip, strong is MoCo v2's augmentation (the official
        default; its ``--randaug`` option is not reproduced)."""
        if opts.get("resized_crop_scale") is not None:
            o = dict(opts, resized_crop_scale=(0.2, 1.0))
            strong = augment.moco_v2(o["size"], o["channels"], scale=(0.2, 1.0),
                                     flip=o.get("flip", True))
            return ({"weak": augment.weak(**o)}, {"weak": augment.weak(**o), "strong": strong})
        return ({"weak": augment.weak(**opts)},
                {"weak": augment.weak(**opts), "strong": augment.strong(**opts)})

    @classmethod
    def from_args(cls, encoder, source, labeled_ids=None, **kwargs):
        if "proj_dims" in kwargs:  # flags give strings
            kwargs["proj_dims"] = tuple(int(d) for d in kwargs["proj_dims"])
        if labeled_ids is not None:
            labeled_ids = np.asarray(labeled_ids)
            kwargs.update(labeled_ids=labeled_ids,
                          labeled_labels=np.asarray(source.train_labels)[labeled_ids],
                          num_train=source.num_train)
        return cls(encoder=encoder, num_classes=source.num_classes, **kwargs)

    def training_callbacks(self, ctx) -> list:
        if self.warmup_steps is None:  # the official epoch-0 warm-up
            self.warmup_steps = int(ctx["steps_per_epoch"])
        return []

    def _build_teacher(self):
        """An EMA copy of encoder, classifier and projector (parameters only:
        its BN statistics are its own, from its train-mode forwards)."""
        self.teacher_encoder, pairs = self.momentum_copy(self.encoder)
        head_in = keras.Input((self.feature_dim,))
        self.teacher_head, head_pairs = self.momentum_copy(
            keras.Model(head_in, self.head(head_in)), name="teacher_classifier")
        pairs += head_pairs
        self.teacher_projector = None
        if self.projector is not None:
            self.teacher_projector, proj_pairs = self.momentum_copy(self.projector)
            pairs += proj_pairs
        self.teacher_net = (self.teacher_encoder, self.teacher_head, self.teacher_projector)
        self._teacher_pairs = pairs

    def _student(self, x, training=True):
        h = self.encoder(x, training=training)
        logits = tf.cast(self.head(h), tf.float32)
        z = None
        if self.projector is not None:
            z = tf.math.l2_normalize(tf.cast(self.projector(h), tf.float32), axis=-1)
        return logits, z

    def _teacher(self, x):
        enc, head, proj = self.teacher_net
        h = enc(x, training=True)
        logits = tf.cast(head(h), tf.float32)
        z = tf.math.l2_normalize(tf.cast(proj(h), tf.float32), axis=-1) if proj is not None else None
        return logits, z

    # ----------------------------------------------------------------- step
    def train_step(self, data):
        data = self.unpack(data)
        lab, unl = data["labeled"], data["unlabeled"]
        x, y = lab["weak"], lab["label"]
        u_w, u_s = unl["weak"], unl["strong"]
        b = tf.shape(x)[0]
        b_u = tf.shape(u_w)[0]
        propagate = None
        if self.uses_bank:
            bank = tf.convert_to_tensor(self.bank)  # read BEFORE this step's write
            bank_labels = tf.convert_to_tensor(self.bank_labels)
            propagate = self.optimizer.iterations >= int(self.warmup_steps or 0)

        with tf.GradientTape() as tape:
            if self.teacher == "online":
                logits, z = self._student(tf.concat([x, u_w, u_s], 0))
                logits_x, logits_w, logits_s = tf.split(logits, [b, b_u, b_u])
                if z is not None:
                    z_x, z_w, z_s = tf.split(z, [b, b_u, b_u])
                    k, z_w = tf.stop_gradient(z_x), tf.stop_gradient(z_w)
                logits_w = tf.stop_gradient(logits_w)
            else:
                logits, z = self._student(tf.concat([x, u_s], 0))
                logits_x, logits_s = tf.split(logits, [b, b_u])
                z_s = tf.split(z, [b, b_u])[1] if z is not None else None
                t_logits, t_z = self._teacher(tf.concat([x, u_w], 0))
                logits_w = tf.stop_gradient(tf.split(t_logits, [b, b_u])[1])
                if t_z is not None:
                    k, z_w = [tf.stop_gradient(t) for t in tf.split(t_z, [b, b_u])]

            p = tf.nn.softmax(logits_w)
            if self.da_len:
                batch_mean = distribute.all_reduce_mean(tf.reduce_mean(p, 0))
                queue, pointer = memory_bank.queue_push(tf.convert_to_tensor(self.da_queue),
                                                        tf.convert_to_tensor(self.da_pointer),
                                                        batch_mean[None])
                p = targets.distribution_alignment(p, targets.filled_rows_mean(queue))
            p_hat, loss_in = p, tf.constant(0.0)
            if self.uses_bank:
                q_w = similarity.instance_similarity(z_w, bank, self.temperature)
                q_hat, p_prop = similarity.calibrated_targets(p, q_w, bank_labels, self.alpha)
                q_s_logits = tf.matmul(z_s, bank, transpose_b=True) / self.temperature
                loss_in_prop = tf.reduce_mean(targets.soft_cross_entropy(
                    tf.stop_gradient(q_hat), q_s_logits))
                p_hat = tf.where(propagate, p_prop, p)
                loss_in = tf.where(propagate, loss_in_prop, 0.0)
            p_hat = tf.stop_gradient(p_hat)
            loss_u, mask = targets.thresholded_cross_entropy(p_hat, logits_s, self.threshold,
                                                             self.hard_labels)
            loss_x = tf.reduce_mean(targets.soft_cross_entropy(
                tf.one_hot(y, self.num_classes), logits_x))
            loss = loss_x + self.lambda_u * loss_u + self.lambda_in * loss_in
        self.m_loss.update_state(loss)
        self.m_loss_x.update_state(loss_x)
        self.m_loss_u.update_state(loss_u)
        self.m_loss_in.update_state(loss_in)
        self.m_mask_rate.update_state(mask)
        if "label" in unl:
            true = tf.cast(unl["label"], tf.int64)
            self.m_pseudo_top1.update_state(
                tf.cast(tf.equal(tf.argmax(p_hat, -1), true), tf.float32),
                sample_weight=tf.cast(true >= 0, tf.float32))
        # The labeled keys and their indices for the bank write travel with
        # the gradients (one collective).
        gathered = self.apply_loss(tape, loss, gather=[
            k, distribute.id_carrier(lab["index"], self.slot_of.shape[0])] if self.uses_bank else [])

        # State updates, identical on every replica.
        if self.da_len:
            self.da_queue.assign(queue)
            self.da_pointer.assign(pointer)
        if self.uses_bank:
            keys, index = gathered[0], tf.cast(gathered[1], tf.int64)
            slots = tf.gather(tf.convert_to_tensor(self.slot_of), index)
            tf.debugging.assert_non_negative(slots, "a labeled index is not in the bank")
            self.bank.assign(memory_bank.bank_write(bank, slots, keys, self.bank_momentum))
        if self.teacher_net is not None:
            self.momentum_update(self._teacher_pairs, self.teacher_momentum)
        return self.train_results()

    def get_config(self):
        cfg = {**super().get_config(), "proj_dims": self.proj_dims,
               "temperature": self.temperature, "alpha": self.alpha,
               "threshold": self.threshold, "lambda_u": self.lambda_u,
               "lambda_in": self.lambda_in, "da_len": self.da_len,
               "bank_momentum": self.bank_momentum, "teacher": self.teacher,
               "teacher_momentum": self.teacher_momentum, "warmup_steps": self.warmup_steps,
               "hard_labels": self.hard_labels}
        if self.uses_bank:
            cfg.update(labeled_ids=self.labeled_ids.tolist(),
                       labeled_labels=self.bank_labels.numpy().tolist(), num_train=self.num_train)
        return cfg


@keras.saving.register_keras_serializable(package="tfssl")
class FixMatch(SimMatch):
    """FixMatch: SimMatch with the instance branch off (``lambda_in = 0``, no
    aggregation, so no bank and no projector), no distribution alignment, and
    hard argmax pseudo-labels above the threshold:
    ``L_u = 1/B_u sum_i 1[max p_i >= tau] H(onehot(argmax p_i), softmax(logits^s_i))``.
    """

    needs_labeled_ids = False

    def __init__(self, encoder: keras.Model, num_classes: int, threshold: float = 0.95,
                 lambda_u: float = 1.0, teacher: str = "online",
                 teacher_momentum: float = 0.999, ema_decay: Optional[float] = None, **kwargs):
        for fixed in ("lambda_in", "alpha", "da_len", "hard_labels", "labeled_ids",
                      "labeled_labels", "num_train", "proj_dims", "bank_momentum",
                      "temperature", "warmup_steps"):
            kwargs.pop(fixed, None)
        super().__init__(encoder, num_classes, threshold=threshold, lambda_u=lambda_u,
                         lambda_in=0.0, alpha=1.0, da_len=0, hard_labels=True, teacher=teacher,
                         teacher_momentum=teacher_momentum, ema_decay=ema_decay, **kwargs)

    @classmethod
    def views(cls, opts: Dict, **unused):
        """Labeled ``weak``; unlabeled ``weak`` and ``strong`` = weak +
        RandAugment + Cutout at every size (FixMatch's own; at ImageNet size the
        crop is the random-resized one of ``opts``, as USB's ImageNet strong
        view, not SimMatch's MoCo v2 views)."""
        return ({"weak": augment.weak(**opts)},
                {"weak": augment.weak(**opts), "strong": augment.strong(**opts)})

    @classmethod
    def from_args(cls, encoder, source, labeled_ids=None, **kwargs):
        return cls(encoder=encoder, num_classes=source.num_classes, **kwargs)

    def get_config(self):
        return {k: v for k, v in super().get_config().items()
                if k in ("encoder", "num_classes", "ema_decay", "name", "threshold", "lambda_u",
                         "teacher", "teacher_momentum")}
