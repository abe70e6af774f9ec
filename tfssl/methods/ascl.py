"""ASCL (Feng & Patras, ICPR 2022): MoCo v2 with adaptive soft labels, its Hard /
AHCL variants, plain MoCo v2, and the negative-free BYOL form."""

from __future__ import annotations

from typing import Dict, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfssl import augment, distribute
from tfssl.methods.base import SSLModel
from tfssl.models import heads
from tfssl.ops import memory_bank, targets

KINDS = ("ascl", "ahcl", "hard", "moco")


@keras.saving.register_keras_serializable(package="tfssl")
class ASCL(SSLModel):
    """Momentum contrast with soft relabelling (self-supervised: no label enters
    the loss).

    Data: ``{"unlabeled": {"query": [B, H, W, C], "key": [B, ...], "label": [B]}}``
    (``label``, -1 where unknown, only feeds the neighbour-purity diagnostic).

    One step:
      1. ``q = normalize(g_q(f_q(x_query)))``; ``k = sg(normalize(g_k(f_k(x_key))))``
         with the momentum encoder (keys shuffled within the batch around it, so
         split/ghost BN groups of keys differ from those of queries).
      2. ``d_j = softmax_j(k . queue_j / T2)``; ``c = 1 - H(d) / log n``.
      3. Soft labels over ``[q.k, q.queue]`` (``targets.ascl_soft_labels``:
         ascl / ahcl / hard / moco, K neighbours).
      4. ``L = mean_i sum_j -y_ij log softmax([q.k, q.queue] / T1)_ij`` (one
         direction, not symmetrised).
      5. Momentum update of (f_k, g_k); the keys of the GLOBAL batch (all-gathered)
         are enqueued at the ring pointer, with their diagnostic labels.

    Batch norm: ``norm="ghost_batch"`` (8 groups) reproduces the official
    single-device split BN; under a strategy, per-replica BN or SyncBN
    (``sync_batch``) replaces the official shuffle-BN: keys are shuffled only
    within each replica's batch (cross-replica shuffling would need the images of
    every replica), which with SyncBN is equivalent.

    Args:
      encoder: images -> features (the backbone f_q).
      queue_size: n keys (4096 CIFAR, 65536 ImageNet); must divide by the global batch.
      kind: ascl | ahcl | hard | moco (moco: K is ignored).
      num_neighbours: K (1; 5 for CIFAR-100).
      proj_dims: projector g widths (2048, 128), no BN.
      t1: temperature of the contrastive logits (0.1).
      t2: temperature of the teacher distribution over the queue (0.05).
      momentum: m of the key encoder (0.99 CIFAR, 0.999 ImageNet).
    """

    def __init__(self, encoder: keras.Model, queue_size: int = 4096, kind: str = "ascl",
                 num_neighbours: int = 1, proj_dims: Sequence[int] = (2048, 128),
                 t1: float = 0.1, t2: float = 0.05, momentum: float = 0.99,
                 seed: int = 0, **kwargs):
        kwargs.pop("num_classes", None)
        super().__init__(encoder, num_classes=None, **kwargs)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
        if queue_size < 1 or num_neighbours < 0 or num_neighbours > queue_size:
            raise ValueError("queue_size must be >= 1 and 0 <= num_neighbours <= queue_size.")
        if not (t1 > 0 and t2 > 0 and 0 <= momentum < 1):
            raise ValueError("t1, t2 must be > 0 and momentum in [0, 1).")
        self.queue_size, self.kind, self.num_neighbours = queue_size, kind, num_neighbours
        self.proj_dims, self.t1, self.t2 = tuple(proj_dims), t1, t2
        self.momentum, self.seed = momentum, seed
        self.projector = heads.mlp(self.proj_dims, self.feature_dim, name="projector")
        # Momentum copies run in train mode (batch statistics), as the official
        # key encoder does; the optimizer never sees them.
        self.key_encoder, pairs_f = self.momentum_copy(self.encoder)
        self.key_projector, pairs_g = self.momentum_copy(self.projector)
        self._momentum_pairs = pairs_f + pairs_g
        d = self.proj_dims[-1]
        init = np.random.default_rng(seed).normal(size=(queue_size, d)).astype("float32")
        self.queue = self.state_variable("queue", (queue_size, d))
        self.queue.assign(init / np.linalg.norm(init, axis=1, keepdims=True))
        self.queue_labels = self.state_variable("queue_labels", (queue_size,), "int64")
        self.queue_labels.assign(-np.ones(queue_size, np.int64))
        self.queue_pointer = self.state_variable("queue_pointer", (), "int64")
        for name in ("loss", "mean_c", "mean_max_d", "purity"):
            setattr(self, f"m_{name}", self.tracker(name))

    # ------------------------------------------------------------- plumbing
    @classmethod
    def views(cls, opts: Dict, crop_min_scale: float = 0.2, key_view: str = "weak",
              blur_p: float = 0.5, **unused):
        """Unlabeled ``query`` (strong: random-resized crop (crop_min_scale=0.2, 1),
        flip, colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2, Gaussian
        blur of sigma in [0.1, 2] px with p=``blur_p``, 0.5 as the official
        ``get_strong_augment``) and ``key``: weak (the official
        ``get_weak_augment``: random-resized crop (crop_min_scale, 1) + flip)
        or, with ``key_view="strong"``, a second independent draw of the
        query's recipe (MoCo v2's symmetric views). The labeled stream is not
        used: ASCL is self-supervised."""
        if not 0 < crop_min_scale <= 1:
            raise ValueError(f"crop_min_scale must be in (0, 1], got {crop_min_scale}.")
        if not 0 <= blur_p <= 1:
            raise ValueError(f"blur_p must be in [0, 1], got {blur_p}.")
        if key_view not in ("weak", "strong"):
            raise ValueError(f"key_view must be 'weak' or 'strong', got {key_view!r}.")
        size, channels, flip = opts["size"], opts["channels"], opts.get("flip", True)

        def strong():
            return augment.moco_v2(size, channels, scale=(crop_min_scale, 1.0), flip=flip,
                                   blur_p=blur_p)
        key = strong() if key_view == "strong" else augment.weak(
            size, channels, flip=flip, resized_crop_scale=(crop_min_scale, 1.0))
        return {"weak": augment.weak(**opts)}, {"query": strong(), "key": key}

    @classmethod
    def from_args(cls, encoder, source, crop_min_scale=None, key_view=None, blur_p=None,
                  **kwargs):
        """``crop_min_scale``, ``key_view`` and ``blur_p`` only shape the views
        (see ``views``)."""
        if "proj_dims" in kwargs:
            kwargs["proj_dims"] = tuple(int(d) for d in kwargs["proj_dims"])
        return cls(encoder=encoder, **kwargs)

    def training_callbacks(self, ctx) -> list:
        self.check_global_batch(int(ctx["unlabeled_batch_size"]))
        return []

    def check_global_batch(self, global_batch: int) -> None:
        """The ring buffer takes whole global batches: queue_size % global batch == 0."""
        if global_batch <= 0 or self.queue_size % global_batch:
            raise ValueError(f"the queue size {self.queue_size} does not divide by the global "
                             f"batch {global_batch}: choose a queue size that is a multiple "
                             "of the (global) unlabeled batch size.")

    def _project(self, encoder, projector, x, training=True):
        return tf.math.l2_normalize(tf.cast(projector(encoder(x, training=training)),
                                            tf.float32), axis=-1)

    def _keys(self, x, shuffle=True):
        """Momentum-encoder keys, with the batch shuffled around the encoder
        (``shuffle``; the official BYOL form does not shuffle)."""
        if not shuffle:
            return tf.stop_gradient(self._project(self.key_encoder, self.key_projector, x))
        n = tf.shape(x)[0]
        step = tf.cast(self.optimizer.iterations, tf.int64)
        perm = tf.argsort(tf.random.stateless_uniform([n], tf.stack([np.int64(self.seed), step])))
        k = self._project(self.key_encoder, self.key_projector, tf.gather(x, perm))
        return tf.stop_gradient(tf.scatter_nd(perm[:, None], k, tf.shape(k)))

    def _update_key_encoder(self):
        self.momentum_update(self._momentum_pairs, self.momentum)

    @staticmethod
    def _gather_keys(k, labels):
        """(keys [N, D], labels [N]) of the global batch, gathered together:
        labels are class ids or -1, which the queue keeps through float32."""
        return distribute.all_gather_with_ids(k, labels, num_ids=2 ** 24)

    def _enqueue(self, keys, all_labels):
        """Pushes the global batch's keys [N, D] and labels [N] (int64, -1 where
        unknown) into the queue."""
        if keys.shape[0] is not None:
            self.check_global_batch(int(keys.shape[0]))
        queue, pointer = memory_bank.queue_push(tf.convert_to_tensor(self.queue),
                                                tf.convert_to_tensor(self.queue_pointer), keys)
        lab, _ = memory_bank.queue_push(tf.cast(tf.convert_to_tensor(self.queue_labels)[:, None],
                                                tf.float32),
                                        tf.convert_to_tensor(self.queue_pointer),
                                        tf.cast(all_labels[:, None], tf.float32))
        self.queue.assign(queue)
        self.queue_labels.assign(tf.cast(lab[:, 0], tf.int64))
        self.queue_pointer.assign(pointer)

    # ----------------------------------------------------------------- step
    def train_step(self, data):
        unl = self.unpack(data)["unlabeled"]
        labels = tf.cast(unl["label"], tf.int64) if "label" in unl else -tf.ones(
            tf.shape(unl["key"])[:1], tf.int64)
        k = self._keys(unl["key"])
        queue = tf.convert_to_tensor(self.queue)
        d = tf.nn.softmax(tf.matmul(k, queue, transpose_b=True) / self.t2, axis=-1)
        y = tf.stop_gradient(targets.ascl_soft_labels(d, self.kind, self.num_neighbours))
        with tf.GradientTape() as tape:
            q = self._project(self.encoder, self.projector, unl["query"])
            l_pos = tf.reduce_sum(q * k, axis=-1, keepdims=True)
            l_neg = tf.matmul(q, queue, transpose_b=True)
            logits = tf.concat([l_pos, l_neg], axis=1) / self.t1
            loss = tf.reduce_mean(targets.soft_cross_entropy(y, logits))
        self._diagnostics(loss, d, labels)
        # The keys to enqueue travel with the gradients (one collective).
        keys, ids = self.apply_loss(tape, loss, gather=[k, distribute.id_carrier(labels, 2 ** 24)])
        self._update_key_encoder()
        self._enqueue(keys, tf.cast(ids, tf.int64))
        return self.train_results()

    def _diagnostics(self, loss, d, labels, neighbour_labels=None):
        """Mean c, mean max d, and purity: how often the top neighbour (the
        argmax of d) has the sample's true class, where both are known."""
        self.m_loss.update_state(loss)
        self.m_mean_c.update_state(targets.entropy_confidence(d))
        self.m_mean_max_d.update_state(tf.reduce_max(d, -1))
        if neighbour_labels is None:
            top = tf.gather(tf.convert_to_tensor(self.queue_labels), tf.argmax(d, -1))
        else:
            top = tf.gather(neighbour_labels, tf.argmax(d, -1), batch_dims=1)
        known = tf.cast((labels >= 0) & (top >= 0), tf.float32)
        self.m_purity.update_state(tf.cast(tf.equal(top, labels), tf.float32), sample_weight=known)

    def get_config(self):
        return {**super().get_config(), "queue_size": self.queue_size, "kind": self.kind,
                "num_neighbours": self.num_neighbours, "proj_dims": self.proj_dims,
                "t1": self.t1, "t2": self.t2, "momentum": self.momentum, "seed": self.seed}


@keras.saving.register_keras_serializable(package="tfssl")
class MoCo(ASCL):
    """MoCo v2: ``ASCL(kind="moco")``, the one-hot target on the positive key."""

    def __init__(self, encoder: keras.Model, **kwargs):
        kwargs["kind"] = "moco"
        super().__init__(encoder, **kwargs)


@keras.saving.register_keras_serializable(package="tfssl")
class ASCLBYOL(ASCL):
    """ASCL's negative-free (BYOL) form: no queue of negatives. An online predictor
    ``Dense(512) -> BN -> ReLU -> Dense(128)`` maps the projector's output
    (unnormalised, as the official code) to p = normalize(pred(g(f(x_query))));
    keys ``k = sg(normalize(g_k(f_k(x_key))))`` (no batch shuffle, as the
    official BYOL form). With ``kind="ascl"`` the soft labels are built over the
    keys of the other samples of the global batch
    (``d_j = softmax_{j != i}(k_i . k_j / T2)``, then the ascl rule); every other
    kind is plain BYOL (the official code uses neighbours only for ``ascl``:
    y = 1 on the sample's own key). The loss is the soft-weighted BYOL regression
    ``L = mean_i sum_j y_ij ||p_i - k_j||^2`` over ``j in {i} + others``
    (= 2 - 2 sum_j y_ij p_i . k_j for unit vectors; y_i0 on the sample's own
    key). The official code returns the per-sample loss; its mean is ours.

    The predictor's BN is synchronised (global-batch statistics under a
    strategy). The queue variables exist (unused by the loss) so that diagnostics and the
    state layout match ASCL; ``queue_size`` defaults to the batch multiple 256.
    """

    def __init__(self, encoder: keras.Model, pred_hidden: int = 512, queue_size: int = 256,
                 **kwargs):
        super().__init__(encoder, queue_size=queue_size, **kwargs)
        self.pred_hidden = pred_hidden
        self.predictor = heads.mlp((pred_hidden, self.proj_dims[-1]), self.proj_dims[-1],
                                   batch_norm=True, synchronized=True, name="predictor")

    def train_step(self, data):
        unl = self.unpack(data)["unlabeled"]
        labels = tf.cast(unl["label"], tf.int64) if "label" in unl else -tf.ones(
            tf.shape(unl["key"])[:1], tf.int64)
        k = self._keys(unl["key"], shuffle=False)
        gathered = self._gather_keys(k, labels)
        keys = gathered[0]  # [N, D], the global batch
        n = tf.shape(keys)[0]
        replica = tf.distribute.get_replica_context()
        r = replica.replica_id_in_sync_group if replica is not None else 0
        own = r * tf.shape(k)[0] + tf.range(tf.shape(k)[0])  # rows of this replica's keys
        sim = tf.matmul(k, keys, transpose_b=True) / self.t2
        sim = tf.where(tf.one_hot(own, n) > 0, -1e9, sim)  # others only
        d_all = tf.nn.softmax(sim, axis=-1)
        # Drop each row's own column: [B, N - 1] over the others.
        others = tf.reshape(tf.boolean_mask(
            tf.broadcast_to(tf.range(n)[None], tf.shape(sim)),
            tf.one_hot(own, n) < 1), [-1, n - 1])
        d = tf.gather(d_all, others, batch_dims=1)
        # Only kind "ascl" uses neighbours in the official BYOL form.
        y = tf.stop_gradient(targets.ascl_soft_labels(
            d, "ascl" if self.kind == "ascl" else "moco", self.num_neighbours))
        cand = tf.concat([k[:, None], tf.gather(keys, others)], axis=1)  # [B, N, D]
        with tf.GradientTape() as tape:
            g = tf.cast(self.projector(self.encoder(unl["query"], training=True)), tf.float32)
            p = tf.math.l2_normalize(tf.cast(self.predictor(g, training=True), tf.float32), -1)
            dist = tf.reduce_sum(tf.square(p[:, None] - cand), axis=-1)  # [B, N]
            loss = tf.reduce_mean(tf.reduce_sum(y * dist, axis=-1))
        self._diagnostics(loss, d, labels, tf.gather(gathered[1], others))
        self.apply_loss(tape, loss)
        self._update_key_encoder()
        self._enqueue(*gathered)
        return self.train_results()

    def get_config(self):
        return {**super().get_config(), "pred_hidden": self.pred_hidden}
