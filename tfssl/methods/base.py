"""SSLModel: what every tfssl method shares.

A method subclasses ``SSLModel`` and writes its algorithm in ``train_step``.
The base gives it:

* ``apply_loss``: per-replica loss scaling (loss / num_replicas, since Keras 3
  SUMS replica gradients in a custom ``train_step``), mixed-precision loss
  scaling, and the optimizer step.
* ``tracker(name)``: Keras ``Mean`` metrics, whose results are global-batch
  values under a strategy (their variables are aggregated on read).
* ``state_variable``: non-trainable variables (queues, banks, pointers,
  pseudo-labels) that checkpoint, restore, and are written with identical
  values on every replica.
* an optional EMA of the weights (``ema_decay``), used for evaluation and export
  through ``with model.ema_applied(): ...``.
* ``classifier_model()`` / ``encoder`` for export, and a ``test_step`` that
  reports top-1 accuracy for methods with a classifier.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import keras
import tensorflow as tf

from tfssl import augment, distribute


# The key under which a multi-worker step returns all its scalar logs at once.
_PACKED_LOGS = "_tfssl_packed_logs"


class SSLModel(keras.Model):
    """Base class of tfssl methods.

    Class attribute ``include_labeled_in_unlabeled``: the method's default for
    whether the unlabeled stream also holds the labeled images (True for most
    methods; MixMatch's official split excludes them).

    Args:
      encoder: a built Keras model mapping images in [0, 1], [B, H, W, C], to
        features [B, D] (see ``tfssl.models.encoder``).
      num_classes: C for methods with a linear classifier on the features
        (None for purely self-supervised methods).
      ema_decay: if set, keep an EMA (decay m) of the trainable weights of the
        encoder and classifier, ``w_ema <- m * w_ema + (1 - m) * w`` after each
        step, for evaluation and export. BN moving statistics are not averaged.
    """

    include_labeled_in_unlabeled = True

    def __init__(self, encoder: keras.Model, num_classes: Optional[int] = None,
                 ema_decay: Optional[float] = None, **kwargs):
        super().__init__(**kwargs)
        if not encoder.built:
            raise ValueError("encoder must be a built Keras model (images -> features).")
        self.encoder = encoder
        self.num_classes = num_classes
        self.image_shape = tuple(encoder.input_shape[1:])
        self.feature_dim = int(encoder.output_shape[-1])
        self.ema_decay = ema_decay
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")
        self.head = None
        if num_classes is not None:
            if num_classes < 2:
                raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
            self.head = keras.layers.Dense(num_classes, name="classifier")
            self.head.build((None, self.feature_dim))
        self._train_trackers: List[keras.metrics.Metric] = []
        self._eval_trackers: List[keras.metrics.Metric] = []
        if num_classes is not None:
            self.eval_loss = keras.metrics.Mean(name="loss")
            self.eval_top1 = keras.metrics.SparseCategoricalAccuracy(name="top1")
            self._eval_trackers = [self.eval_loss, self.eval_top1]
        self._ema_pairs = []
        # Sub-layers are built here (encoder given built, head built above);
        # subclasses build theirs in __init__ too, so fit() never needs a
        # symbolic build from a batch.
        self.built = True

    def _make_function(self, step_function):
        # Upstream behaviour (Keras 3.8-3.15, TensorFlowTrainer._make_function
        # and reduce_per_replica): after every train/test step, under a
        # multi-worker collective strategy, each returned log is reduced with
        # its own strategy.reduce("MEAN", v, axis=0). For the scalars every
        # step returns that fails ("Invalid reduction dimension 0"), and it
        # would cost one cross-worker collective per log and step. Under
        # multi-worker the step's scalar logs (tracker results) are packed
        # into one [1, n] tensor, reduced once (the mean over the workers, as
        # Keras does for each log) and unpacked into the usual dict before
        # callbacks see them. Only multi-worker runs are touched;
        # tests/test_multi_worker.py fails if a Keras upgrade changes this
        # behaviour.
        if not distribute.is_multi_worker(self.distribute_strategy):
            return super()._make_function(step_function)
        keys = {}  # names of the logs in the order the step returns them (set at trace)

        def packed_step(data):
            logs = step_function(data)
            if not isinstance(logs, dict):
                return logs
            keys["all"] = list(logs)
            keys["packed"] = [k for k, v in logs.items() if tf.is_tensor(v) and v.shape.rank == 0]
            out = {k: v for k, v in logs.items() if k not in keys["packed"]}
            if keys["packed"]:
                out[_PACKED_LOGS] = tf.reshape(
                    tf.stack([tf.cast(logs[k], tf.float32) for k in keys["packed"]]), [1, -1])
            return out

        function = super()._make_function(packed_step)

        def unpacking_function(iterator):
            logs = function(iterator)
            if not isinstance(logs, dict) or _PACKED_LOGS not in logs:
                return logs
            values = dict(zip(keys["packed"], tf.unstack(tf.reshape(logs[_PACKED_LOGS], [-1]))))
            return {k: values[k] if k in values else logs[k] for k in keys["all"]}

        return unpacking_function

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Upstream behaviour (Keras 3.8-3.15, TensorFlowTrainer._maybe_symbolic_build):
        # before the first step Keras takes the first per-replica batch and
        # reduces it across replicas with an eager cross-replica MEAN; under
        # MultiWorkerMirroredStrategy that collective fails. Our models are
        # built in __init__; the symbolic build only needs a batch's
        # structure, so under multi-worker this worker's local first batch is
        # used, consumed from the iterator exactly as upstream does.
        if iterator is not None and distribute.is_multi_worker(self.distribute_strategy):
            local = self.distribute_strategy.experimental_local_results
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tf.nest.map_structure(
                    lambda v: local(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v,
                    batch)
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    # ------------------------------------------------------- construction
    @classmethod
    def views(cls, opts: Dict, **method_args) -> Tuple[Dict, Optional[Dict]]:
        """The method's (labeled, unlabeled) views, given the dataset's weak-view
        options (``tfssl.train.view_options``) and the method's own arguments
        (those that choose views are read, the rest ignored). Default: labeled
        weak only."""
        return {"weak": augment.weak(**opts)}, None

    @classmethod
    def from_args(cls, encoder: keras.Model, source, **kwargs) -> "SSLModel":
        """Builds the method for ``source`` (a ``tfssl.data.Source``) from plain
        keyword arguments (what ``scripts/train.py`` collects from its flags)."""
        return cls(encoder=encoder, num_classes=source.num_classes, **kwargs)

    @classmethod
    def support_sampling(cls, replicas: int, **method_args) -> Optional[Dict]:
        """Arguments of a class-stratified labeled sampler
        (``tfssl.data.support_stream``) when the method needs one (PAWS), else
        None (the labeled stream is shuffled batches)."""
        return None

    def training_callbacks(self, ctx: Dict) -> list:
        """Callbacks the method needs during ``fit`` (e.g. SeLa's relabelling).

        ``ctx`` has ``source``, ``labeled_ids``, ``epochs``, ``steps_per_epoch``,
        ``batch_size`` and ``unlabeled_batch_size`` (global), the
        ``labeled_views`` / ``unlabeled_views`` dicts, and (from
        ``scripts/train.py``) ``bank`` / ``test`` evaluation datasets,
        ``eval_every``, ``seed``, ``deterministic`` and the dataset's weak-view
        ``view_options``."""
        return []

    def final_evaluation(self, ctx: Dict) -> Dict[str, float]:
        """Method-specific metrics for ``summary.json`` after training (PAWS:
        soft-NN and fine-tuned accuracy); ``ctx`` as for ``training_callbacks``."""
        return {}

    def serving_head(self, labeled=None) -> Optional[Tuple[keras.Model, bool]]:
        """What the classifier export puts on the encoder's features:
        ``(model, gives_probabilities)``, or None for no classifier export.
        Default: the linear head (logits). ``labeled`` is the labeled
        evaluation dataset, for non-parametric classifiers (PAWS)."""
        if self.head is None:
            return None
        return self.head, False

    @property
    def evaluate_with_ema(self) -> bool:
        """Whether evaluation and export use the EMA weights."""
        return bool(self._ema_pairs)

    # ----------------------------------------------------------------- state
    def state_variable(self, name: str, shape, dtype="float32", initializer="zeros"):
        """A non-trainable variable for algorithm state (queue, bank, pointer).

        It is saved by checkpoints/BackupAndRestore. Under a strategy it is
        mirrored and assigned from the first replica, so the method must write
        values that are identical on every replica (gather first).
        """
        return self.add_weight(name=name, shape=shape, dtype=dtype, initializer=initializer,
                               trainable=False, aggregation="only_first_replica")

    def init_ema(self):
        """Creates the EMA copies of the encoder/classifier trainable weights.
        Call at the end of a subclass ``__init__`` (after all heads exist)."""
        if self.ema_decay is None or self._ema_pairs:
            return
        sources = list(self.encoder.trainable_variables)
        if self.head is not None:
            sources += list(self.head.trainable_variables)
        pairs = []
        for i, v in enumerate(sources):
            e = self.state_variable(f"ema_{i}", v.shape, v.dtype)
            e.assign(v)
            pairs.append((e, v))
        self._ema_pairs = pairs

    def update_ema(self):
        """w_ema <- m * w_ema + (1 - m) * w (call after the optimizer step)."""
        m = self.ema_decay
        for e, v in self._ema_pairs:
            e.assign(m * e + (1.0 - m) * tf.convert_to_tensor(v))

    @contextlib.contextmanager
    def ema_applied(self):
        """Temporarily loads the EMA weights into the model (no-op without EMA)."""
        if not self._ema_pairs:
            yield
            return
        saved = [tf.identity(tf.convert_to_tensor(v)) for _, v in self._ema_pairs]
        for e, v in self._ema_pairs:
            v.assign(e)
        try:
            yield
        finally:
            for (_, v), s in zip(self._ema_pairs, saved):
                v.assign(s)

    # --------------------------------------------------------------- metrics
    def tracker(self, name: str) -> keras.metrics.Mean:
        """A Keras Mean metric reported in ``fit`` logs as ``name``."""
        m = keras.metrics.Mean(name=name)
        setattr(self, f"_tracker_{name}", m)
        self._train_trackers.append(m)
        return m

    @property
    def metrics(self):
        return list(self._train_trackers) + list(self._eval_trackers)

    def train_results(self) -> Dict[str, tf.Tensor]:
        return {m.name: m.result() for m in self._train_trackers}

    # -------------------------------------------------------------- training
    def apply_loss(self, tape: tf.GradientTape, loss: tf.Tensor, variables=None):
        """One optimizer step on ``loss`` (this replica's mean loss).

        The loss is divided by the number of replicas before differentiation:
        Keras 3 sums the replicas' gradients, so the update equals the
        single-device update on the global batch.
        """
        variables = self.trainable_variables if variables is None else variables
        # Seeding backprop with s / R equals differentiating loss * s / R (the
        # replica scaling and any mixed-precision loss scale s) without having
        # to build that product inside the tape.
        seed = distribute.scale_loss(self.optimizer.scale_loss(tf.ones_like(loss)))
        grads = tape.gradient(loss, variables, output_gradients=seed)
        self.optimizer.apply(grads, variables)
        if self._ema_pairs:
            self.update_ema()

    @staticmethod
    def unpack(data):
        """The element dict of a batch (``train_on_batch``/``evaluate`` wrap it
        as ``(x, y, sample_weight)``)."""
        if isinstance(data, (tuple, list)):
            return data[0]
        return data

    def features(self, images, training=False):
        return self.encoder(images, training=training)

    def call(self, images, training=False):
        """Logits [B, C] for methods with a classifier, else features [B, D]."""
        h = self.encoder(images, training=training)
        if self.head is None:
            return h
        return self.head(h)

    def test_step(self, data):
        """Top-1 accuracy and CE of the classifier on ``{"image", "label"}`` batches."""
        if self.head is None:
            return {}
        data = self.unpack(data)
        logits = tf.cast(self(data["image"], training=False), tf.float32)
        y = data["label"]
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        self.eval_loss.update_state(loss)
        self.eval_top1.update_state(y, logits)
        return {m.name: m.result() for m in self._eval_trackers}

    # ---------------------------------------------------------------- export
    def classifier_model(self) -> keras.Model:
        """images [B, H, W, C] in [0, 1] -> class probabilities [B, C]."""
        if self.head is None:
            raise ValueError(f"{type(self).__name__} has no classifier head.")
        inp = keras.Input(shape=self.image_shape)
        probs = keras.layers.Softmax(dtype="float32")(self.head(self.encoder(inp)))
        return keras.Model(inp, probs, name="classifier")

    def get_config(self):
        return {"encoder": keras.saving.serialize_keras_object(self.encoder),
                "num_classes": self.num_classes, "ema_decay": self.ema_decay,
                "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)
