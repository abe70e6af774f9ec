"""Training cases for ``tfssl.testing.assert_workers_match``: each function
returns ``(build_model, dataset_of_global_batches[, callbacks])`` and is loaded
by file path in fresh worker processes, so it must be self-contained and
deterministic. One case per landed method; add yours when a method lands."""

import keras
import numpy as np
import tensorflow as tf

from tfssl import methods, models


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, [n, 8, 8, 1]).astype("float32"),
            rng.integers(0, 10, [n]).astype("int64"))


def _encoder():
    return models.encoder(models.small_cnn((8, 8, 1), width=8, norm="sync_batch"), (0.5,), (0.25,))


def supervised():
    x, y = _images(24)
    data = tf.data.Dataset.from_tensor_slices(
        {"labeled": {"weak": x, "label": y, "index": np.arange(24)}}).batch(8)

    def build():
        m = methods.Supervised(_encoder(), 10, ema_decay=0.9)
        m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-3))
        return m

    return build, data


def sela():
    """SeLa with its relabelling callback: the feature pass is sharded over the
    workers and gathered by index, then Sinkhorn runs on the whole dataset."""
    from tfssl.methods.sela import Relabel

    x, _ = _images(49, seed=1)
    idx = np.arange(49)
    data = tf.data.Dataset.from_tensor_slices(
        {"unlabeled": {"view": x[:48], "index": idx[:48]}}).batch(8)

    def feats(input_context=None):
        # Per worker, its share of the 49 images (25 and 24: the last step
        # has an image on one worker only), batched per replica.
        d, bs = tf.data.Dataset.from_tensor_slices({"image": x, "index": idx}), 16
        if input_context is not None:
            d = d.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
            bs = input_context.get_per_replica_batch_size(bs)
        return d.batch(bs)

    def build():
        m = methods.SeLa(_encoder(), num_train=49, num_clusters=4, num_heads=2)
        m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        return m

    def callbacks():
        return [Relabel(feats, [0, 16], global_batch=8, verbose=False)]

    return build, data, callbacks


def mixmatch():
    """MixMatch's MixUp partners are drawn over the global batch (all-gathered
    across workers); one concatenated forward with SyncBN."""
    x, y = _images(24, seed=2)
    u, _ = _images(48, seed=3)
    data = tf.data.Dataset.from_tensor_slices({
        "labeled": {"weak": x, "label": y, "index": np.arange(24)},
        "unlabeled": {"aug0": u[:24], "aug1": u[24:], "label": y, "index": np.arange(24)},
    }).batch(8)

    def build():
        m = methods.MixMatch(_encoder(), 10, interleave=False, lambda_u=10.0, rampup_images=16,
                             ema_decay=0.9)
        m.compile(optimizer=keras.optimizers.Adam(0.01))
        return m

    return build, data


def simmatch():
    """SimMatch: the labeled bank is written from every worker's labeled rows
    (gathered), the DA queue averages over the global batch."""
    rng = np.random.default_rng(4)
    ids = np.arange(0, 32, 2)
    x = rng.uniform(0, 1, [48, 8, 8, 1]).astype("float32")
    lab = np.resize(ids, 24)
    u = rng.integers(0, 48, 24)
    data = tf.data.Dataset.from_tensor_slices({
        "labeled": {"weak": x[lab], "label": lab % 10, "index": lab},
        "unlabeled": {"weak": x[u], "strong": np.clip(x[u] * 1.2, 0, 1), "label": u % 10,
                      "index": u}}).batch(8)

    def build():
        m = methods.SimMatch(_encoder(), 10, labeled_ids=ids, labeled_labels=ids % 10,
                             num_train=48, threshold=0.5, warmup_steps=0, proj_dims=(16, 8),
                             da_len=4)
        m.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        return m

    return build, data


def ascl():
    """ASCL: the queue takes the keys (and diagnostic labels) of every worker's
    rows, at the same pointer on every worker."""
    x, y = _images(24, seed=5)
    data = tf.data.Dataset.from_tensor_slices({"unlabeled": {
        "query": x, "key": np.clip(x * 1.1, 0, 1), "label": y, "index": np.arange(24)}}).batch(8)

    def build():
        m = methods.ASCL(_encoder(), queue_size=16, proj_dims=(16, 8), momentum=0.9)
        m.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        return m

    return build, data


def ascl_steps_per_execution():
    """The ASCL case with 2 steps per call of the train function: the steps'
    collectives (gradients, queue gathers) inside a tf.while_loop, and an epoch
    of 3 steps as calls of 2 + 1."""
    build, data = ascl()

    def build_n():
        m = build()
        m.compile(optimizer=m.optimizer, steps_per_execution=2)
        return m

    return build_n, data


def paws():
    """PAWS: supports all-gathered across workers with gradient (custom
    backward), ME-MAX's mean over the global batch, a multi-crop forward, LARS."""
    from tfssl import data, optimizers

    rng = np.random.default_rng(6)
    x = rng.uniform(0, 1, [30, 8, 8, 1]).astype("float32")
    y = np.arange(30) % 5
    pos = np.concatenate([p.numpy() for p in data.support_indices(y, 4, 2, seed=6).take(3)])
    u = rng.integers(0, 30, 12)
    sup = tf.data.Dataset.from_tensor_slices(
        {"view_0": x[pos], "view_1": np.clip(x[pos] * 0.9, 0, 1), "label": y[pos]}).batch(8)
    unl = tf.data.Dataset.from_tensor_slices(
        {"global_0": x[u], "global_1": np.clip(x[u] * 1.1, 0, 1), "local_0": x[u][:, :6, :6],
         "label": y[u]}).batch(4)
    dataset = tf.data.Dataset.zip({"labeled": sup, "unlabeled": unl})

    def build():
        # tau and T softer than the defaults (0.1, 0.25), which amplify float
        # differences between hosts' kernels; what distribution gets wrong
        # (gathers, loss scaling) does not depend on them.
        m = methods.PAWS(_encoder(), num_classes=5, classes_per_batch=4, imgs_per_class=2,
                         proj_hidden=16, proj_dim=8, finetune_epochs=0,
                         temperature=0.5, sharpen_t=0.5)
        m.compile(optimizer=optimizers.LARS(0.05, weight_decay=1e-4, trust_coefficient=0.02))
        return m

    return build, dataset
