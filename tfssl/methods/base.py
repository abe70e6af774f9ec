"""SSLModel: what every tfssl method shares.

A method subclasses ``SSLModel`` and writes its algorithm in ``train_step``.
The base gives it:

* ``apply_loss``: per-replica loss scaling (loss / num_replicas, since Keras 3
  SUMS replica gradients in a custom ``train_step``), mixed-precision loss
  scaling, and the optimizer step; on more than one replica the gradients,
  the trackers' sums and small tensors to gather travel in one collective.
* ``tracker(name)``: Keras ``Mean`` metrics, whose results are global-batch
  values under a strategy. Update them before ``apply_loss`` (an update after
  it in the same step is an error).
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
import inspect
import threading
import types
from typing import Dict, List, Optional, Tuple

import keras
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import reduce_per_replica

from tfssl import augment, distribute


# What one replica's trace of a train step hands on: by id(model), the graph
# and the global tracker means ``apply_loss`` computed with the gradients
# ("logs": ``train_results`` returns them, the packed multi-worker logs need
# no collective for them); by id(tracker), the graph in which the tracker must
# not be updated any more ("closed"). Per thread: MirroredStrategy traces each
# replica's step in a thread of its own.
_STEP = threading.local()

# Optimizers (by id) whose gradients ``apply_loss`` has summed over the
# replicas, while their update is traced: a count, not a thread-local flag,
# because a LossScaleOptimizer under a merge-call strategy applies the inner
# update through ``call_for_each_replica`` from the cross-replica context, in
# threads of its own (TF's mirrored_run).
_PRESUMMED: Dict[int, int] = {}
_PRESUMMED_LOCK = threading.Lock()


def _step_state():
    if not hasattr(_STEP, "logs"):
        _STEP.logs, _STEP.closed = {}, {}
    return _STEP


def _graph():
    """The graph being traced (entries of ``_STEP`` are only valid in it)."""
    return tf.compat.v1.get_default_graph()


@contextlib.contextmanager
def _gradients_summed(optimizer):
    """While the optimizer traces its update, its own cross-replica sum of the
    gradients is the identity (``apply_loss`` summed them already).

    Upstream behaviour (Keras 3.8-3.15, TF backend,
    ``TFOptimizer._backend_update_step``): the update starts with
    ``_all_reduce_sum_gradients``, an all-reduce SUM of the gradients over the
    replicas in replica context. Each optimizer (and a LossScaleOptimizer's
    inner one) gets an instance attribute that skips it while any replica is
    inside this context. If a Keras upgrade renames it, the sum would run
    twice (an R-times larger update): tests/test_distributed.py and every
    method's 2-replica test fail.
    """
    chain = [optimizer]
    while getattr(chain[-1], "inner_optimizer", None) is not None:
        chain.append(chain[-1].inner_optimizer)
    for o in chain:
        if not hasattr(type(o), "_all_reduce_sum_gradients"):
            raise RuntimeError(
                f"{type(o).__name__} has no _all_reduce_sum_gradients: this Keras version "
                f"({keras.__version__}) applies gradients differently from the 3.8-3.15 "
                "that tfssl.methods.base supports under a strategy")
        if "_all_reduce_sum_gradients" not in vars(o):
            def skip(grads_and_vars, original=o._all_reduce_sum_gradients, key=id(o)):
                if _PRESUMMED.get(key, 0):
                    return list(grads_and_vars)
                return original(grads_and_vars)
            o._all_reduce_sum_gradients = skip
    with _PRESUMMED_LOCK:
        for o in chain:
            _PRESUMMED[id(o)] = _PRESUMMED.get(id(o), 0) + 1
    try:
        yield
    finally:
        with _PRESUMMED_LOCK:
            for o in chain:
                _PRESUMMED[id(o)] -= 1
                if not _PRESUMMED[id(o)]:
                    del _PRESUMMED[id(o)]


class Tracker(keras.metrics.Mean):
    """The ``keras.metrics.Mean`` of ``SSLModel.tracker``: one that refuses an
    update after ``apply_loss`` in the same traced step (on more than one
    replica its value for this step was summed with the gradients, so a later
    update would be left out of the step's logs)."""

    def update_state(self, *args, **kwargs):
        if _step_state().closed.get(id(self)) is _graph() and not tf.executing_eagerly():
            raise RuntimeError(
                f"tracker {self.name!r} updated after apply_loss in the same train_step: "
                "update the trackers before apply_loss (it sums their totals with the "
                "gradients on more than one replica)")
        return super().update_state(*args, **kwargs)


# The key under which a multi-worker step returns all its scalar logs at once.
_PACKED_LOGS = "_tfssl_packed_logs"
# What fit/evaluate pass the train/test function (train_on_batch passes a generator).
_ITERATORS = (tf.data.Iterator, tf.distribute.DistributedIterator)


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

    def fit(self, *args, **kwargs):
        """``keras.Model.fit``. With ``compile(steps_per_execution=N)``, N > 1,
        each call of the train function runs up to N steps in one graph, and
        an epoch still runs exactly ``steps_per_epoch`` steps (the epoch's last
        call runs the rest; see ``_make_function``)."""
        bound = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
        args = bound.arguments
        steps, x = args.get("steps_per_epoch"), args.get("x")
        if steps is None and isinstance(x, tf.data.Dataset) and int(x.cardinality()) >= 0:
            steps = int(x.cardinality())
        # (A namespace, not a dict: Keras would track a dict attribute as a copy.)
        self._epoch_position = position = types.SimpleNamespace(steps=steps, begin=0)

        class StepPosition(keras.callbacks.Callback):
            # Keras calls on_train_batch_begin(first step of the call) just
            # before each call of the train function.
            def on_train_batch_begin(self, batch, logs=None):
                position.begin = batch

        callbacks = args.get("callbacks") or []
        if isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks.callbacks.append(StepPosition())
        else:
            callbacks = list(callbacks) + [StepPosition()]
        args["callbacks"] = callbacks
        args.pop("self")
        self._build_optimizer()
        return super().fit(**args)

    def _build_optimizer(self):
        """Creates the optimizer's slot variables before the first step.

        Keras builds the optimizer in its symbolic build, which it skips for a
        built model when no strategy was set; the first ``apply`` then creates
        the slots inside the traced step, and ``tf.function`` traces the whole
        train step a second time (about half of a short run's start-up on a
        ResNet)."""
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def _make_function(self, step_function):
        """The train/test function Keras calls once per ``steps_per_execution``
        steps of ``fit``/``evaluate``.

        Two upstream behaviours (Keras 3.8-3.15, ``TensorFlowTrainer``) are
        replaced here; tests/test_multi_worker.py fails if a Keras upgrade
        changes them:

        * after every step, under a multi-worker collective strategy, each
          returned log is reduced with its own ``strategy.reduce("MEAN", v,
          axis=0)`` (``reduce_per_replica``). For the scalars every step
          returns that fails ("Invalid reduction dimension 0"), and for a
          tensor it costs two collectives (the sum, then the count along the
          axis). Under multi-worker the step's scalar logs are packed into
          one [1, n] tensor, summed over the replicas by one all-reduce inside
          the step and divided by their number (the mean Keras takes), and
          unpacked before callbacks see them.
        * with ``steps_per_execution`` N > 1, Keras's in-graph loop over
          ``iterator.get_next_as_optional()`` fails under the multi-worker
          strategy (an InvalidArgumentError at a ``while/cond`` placeholder)
          and, on an endless dataset, runs N steps in the last call of an
          epoch whatever ``steps_per_epoch`` says. Here the train function
          runs ``min(N, steps left in the epoch)`` steps in a
          ``tf.while_loop`` and reduces only the last step's logs; the test
          function makes up to N one-step calls.
        """
        multi_worker = distribute.is_multi_worker(self.distribute_strategy)
        if self.run_eagerly or (self.steps_per_execution == 1 and not multi_worker):
            if not multi_worker:
                return super()._make_function(step_function)
            step, unpack = self._packed_logs(step_function, in_step=False)
            function = super()._make_function(step)
            return lambda iterator: unpack(function(iterator))
        step, unpack = self._packed_logs(step_function, in_step=True) if multi_worker else (
            step_function, lambda logs: logs)
        strategy = self.distribute_strategy
        # One step on every replica (XLA-compiled if the model is), traced once
        # and called both inside the loop and for the last step. As Keras's
        # own functions, these are not autograph-converted: the step is traced
        # as written (converting a method's whole call tree cost seconds).
        @tf.autograph.experimental.do_not_convert
        def replica_step(data):
            return strategy.run(step, args=(data,))

        run_step = tf.function(replica_step, reduce_retracing=True, jit_compile=self.jit_compile)

        @tf.autograph.experimental.do_not_convert
        def one_step(data):
            logs = run_step(data)
            if not isinstance(logs, dict) or _PACKED_LOGS not in logs:
                return reduce_per_replica(logs, strategy, "auto")
            # Already the mean over all replicas (in the step), the same on each.
            out = reduce_per_replica({k: v for k, v in logs.items() if k != _PACKED_LOGS},
                                     strategy, "auto")
            out[_PACKED_LOGS] = strategy.experimental_local_results(logs[_PACKED_LOGS])[0]
            return out

        single_steps = self._single_steps_function(one_step, unpack)
        if step_function != self.train_step or self.steps_per_execution == 1:
            return single_steps

        @tf.function(autograph=False)
        def steps_in_graph(iterator, n):
            # Steps 1 .. n-1 keep only their effects (variables); step n's logs
            # are returned.
            def body(i):
                run_step(iterator.get_next())
                return i + 1
            tf.while_loop(lambda i: i < n - 1, body, [tf.constant(0)])
            return one_step(iterator.get_next())

        def function(iterator):
            if not isinstance(iterator, _ITERATORS):
                return single_steps(iterator)  # train_on_batch's generator
            n = self.steps_per_execution
            position = getattr(self, "_epoch_position", None)
            if position is not None and position.steps:
                n = min(n, position.steps - position.begin)
            return unpack(steps_in_graph(iterator, tf.constant(n, tf.int32)))

        return function

    def _single_steps_function(self, one_step, unpack):
        """Up to ``steps_per_execution`` one-step calls: the last call's logs,
        or StopIteration when the data ended before the first."""
        on_iterator = tf.function(lambda iterator: one_step(iterator.get_next()), autograph=False)
        on_data = tf.function(one_step, autograph=False)

        def function(iterator):
            is_tf = isinstance(iterator, _ITERATORS)
            logs = None
            for _ in range(self.steps_per_execution):
                try:
                    logs = on_iterator(iterator) if is_tf else on_data(next(iterator))
                except (StopIteration, tf.errors.OutOfRangeError):
                    break
            if logs is None:
                raise StopIteration
            return unpack(logs)

        return function

    def _packed_logs(self, step_function, in_step: bool):
        """(step, unpack): ``step`` returns ``step_function``'s scalar logs as
        one [1, n] tensor under ``_PACKED_LOGS``, already averaged over all
        replicas (one all-reduce) if ``in_step``; ``unpack`` restores the dict."""
        keys = {}  # names of the logs in the order the step returns them (set at trace)

        def packed_step(data):
            logs = step_function(data)
            if not isinstance(logs, dict):
                return logs
            keys["all"] = list(logs)
            keys["packed"] = [k for k, v in logs.items() if tf.is_tensor(v) and v.shape.rank == 0]
            out = {k: v for k, v in logs.items() if k not in keys["packed"]}
            # Logs that are apply_loss's global means (summed over all replicas
            # with the gradients) need no collective; the others share one.
            graph, fused = _step_state().logs.pop(id(self), (None, {}))
            done = {k for k, v in fused.items() if graph is _graph() and logs.get(k) is v}
            if keys["packed"]:
                values = [tf.cast(logs[k], tf.float32) for k in keys["packed"]]
                todo = [i for i, k in enumerate(keys["packed"]) if k not in done]
                if in_step and todo:
                    ctx = tf.distribute.get_replica_context()
                    means = tf.unstack(ctx.all_reduce("SUM", tf.stack([values[i] for i in todo]))
                                       / ctx.num_replicas_in_sync)
                    for i, v in zip(todo, means):
                        values[i] = v
                out[_PACKED_LOGS] = tf.reshape(tf.stack(values), [1, -1])
            return out

        def unpack(logs):
            if not isinstance(logs, dict) or _PACKED_LOGS not in logs:
                return logs
            values = dict(zip(keys["packed"], tf.unstack(tf.reshape(logs[_PACKED_LOGS], [-1]))))
            return {k: values[k] if k in values else logs[k] for k in keys["all"]}

        return packed_step, unpack

    def get_metrics_result(self):
        """``{name: value}`` of ``self.metrics`` (what ``fit`` logs per epoch).

        Upstream behaviour (Keras 3.8-3.15, ``Trainer.get_metrics_result``):
        each metric's ``result()`` reads its sync-on-read variables, and under
        a multi-worker strategy every read is its own eager cross-worker
        all-reduce (2 per ``Mean``; 16 per epoch for a supervised model, about
        3 ms each over loopback). Under multi-worker the ``total`` and
        ``count`` of every ``keras.metrics.Mean`` (trackers, accuracies) are
        summed over all replicas in one collective and divided here; other
        metrics keep Keras's path.
        """
        strategy = self.distribute_strategy
        means, parts = self._multi_worker_means()
        if not means:
            return super().get_metrics_result()
        sums = strategy.experimental_local_results(self._summed_over_replicas(parts))[0].numpy()
        out, k = {}, 0
        for m in self.metrics:
            if m in means:
                total, count = sums[k], sums[k + 1]
                out[m.name] = total / count if count else 0.0 * total
                k += 2
            else:
                result = m.result()
                out.update(result if isinstance(result, dict) else {m.name: result})
        return out

    def reset_metrics(self):
        """Resets ``self.metrics`` (Keras calls this before every epoch and
        evaluation).

        Upstream behaviour (Keras 3.8-3.15, ``Trainer.reset_metrics`` and
        ``Mean.reset_state``): each ``assign(0)`` of a metric's sync-on-read
        variable in cross-replica context also reads the variable back, and
        under a multi-worker strategy that read is an eager cross-worker
        all-reduce (8 per epoch for a supervised model, 30-60 ms over
        loopback, measured). Under multi-worker the ``total`` and ``count``
        of every ``keras.metrics.Mean`` are zeroed on each replica instead, in
        one function call with no collective; other metrics keep Keras's path.
        """
        means, parts = self._multi_worker_means()
        if not means:
            return super().reset_metrics()

        def zero(vs):
            for v in vs:
                v.assign(tf.zeros(v.shape, v.dtype))

        self._on_replicas("zero", parts, zero)
        for m in self.metrics:
            if m not in means:
                m.reset_state()

    def _multi_worker_means(self):
        """(the ``keras.metrics.Mean`` metrics, their [total, count, ...]
        variables) under a multi-worker strategy, else ([], []): what the
        multi-worker paths of ``get_metrics_result`` and ``reset_metrics`` handle."""
        if not distribute.is_multi_worker(self.distribute_strategy):
            return [], []
        means = [m for m in self.metrics if isinstance(m, keras.metrics.Mean)]
        return means, [v for m in means for v in (m.total, m.count)]

    def _summed_over_replicas(self, variables):
        """[len(variables)] float32: each (scalar) variable summed over all
        replicas of all workers, in one all-reduce."""
        def summed(vs):
            x = tf.stack([tf.cast(tf.reshape(v, []), tf.float32) for v in vs])
            return tf.distribute.get_replica_context().all_reduce("SUM", x)

        return self._on_replicas("sum", variables, summed)

    def _on_replicas(self, name: str, variables, local):
        """``local(variables)`` on every replica (``strategy.run``), in a
        ``tf.function`` cached under ``name`` and the variables' identities.

        The variables are captured, not passed: a sync-on-read variable passed
        to a ``tf.function`` is read in cross-replica context on the way in,
        an eager all-reduce per variable under multi-worker (measured: 20 of
        them, about 3 ms each, at every epoch end). Inside ``strategy.run``
        each replica reads and writes its local value."""
        cache = getattr(self, "_replica_functions", None)
        if cache is None:
            # (A namespace, not a dict: Keras would track a dict attribute.)
            cache = self._replica_functions = types.SimpleNamespace(functions={})
        key = (name,) + tuple(id(v) for v in variables)
        if key not in cache.functions:
            strategy, vs = self.distribute_strategy, list(variables)
            cache.functions[key] = tf.function(lambda: strategy.run(lambda: local(vs)),
                                               autograph=False)
        return cache.functions[key]()

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

    def momentum_copy(self, source: keras.Model, name: Optional[str] = None):
        """A copy of ``source`` (same architecture and weights) that the
        optimizer never updates: a momentum key encoder or an EMA teacher.

        The copy stays ``trainable`` in the Keras sense, so that its forward
        with ``training=True`` normalises with the batch's statistics and
        updates its own BN moving statistics, as the official code's momentum
        and EMA networks do (PyTorch modules in train mode). Keras's
        ``trainable = False`` would instead put every BatchNormalization of the
        copy in inference mode, on moving statistics that nothing updates. Its
        weights are left out of ``trainable_weights`` (so out of the
        optimizer's variables and of ``apply_loss``'s default) and listed in
        ``non_trainable_weights``.

        Returns:
          (copy, pairs): the copy, and ``[(copy_weight, source_weight)]`` over
          the source's trainable weights (what a momentum update averages:
          parameters only, not BN statistics).
        """
        copy = keras.models.clone_model(source)
        if name is not None:
            copy.name = name
        copy.set_weights(source.get_weights())
        if not hasattr(self, "_momentum_ids"):
            self._momentum_ids = set()
        self._momentum_ids.update(id(v) for v in copy.trainable_weights)
        return copy, list(zip(copy.trainable_weights, source.trainable_weights))

    @staticmethod
    def momentum_update(pairs, m: float):
        """``t <- m t + (1 - m) s`` for each (t, s) of ``momentum_copy``'s pairs."""
        for t, s in pairs:
            t.assign(m * t + (1.0 - m) * tf.convert_to_tensor(s))

    def _split_momentum(self, trainable, non_trainable):
        """(trainable less the ``momentum_copy`` parameters, non-trainable plus them)."""
        excluded = getattr(self, "_momentum_ids", None)
        if not excluded:
            return list(trainable), list(non_trainable)
        return ([v for v in trainable if id(v) not in excluded],
                list(non_trainable) + [v for v in trainable if id(v) in excluded])

    @property
    def trainable_weights(self):
        """Keras's trainable weights less those of the ``momentum_copy`` networks."""
        return self._split_momentum(super().trainable_weights, ())[0]

    @property
    def trainable_variables(self):
        """What the optimizer updates: as Keras's, less the ``momentum_copy`` networks."""
        return self._split_momentum(super().trainable_variables, ())[0]

    @property
    def non_trainable_weights(self):
        """Keras's non-trainable weights plus the ``momentum_copy`` networks' parameters."""
        return self._split_momentum(super().trainable_weights, super().non_trainable_weights)[1]

    @property
    def non_trainable_variables(self):
        return self._split_momentum(super().trainable_variables,
                                    super().non_trainable_variables)[1]

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
        """A Keras Mean metric reported in ``fit`` logs as ``name``: update it in
        ``train_step`` before ``apply_loss``, and return ``train_results()``."""
        m = Tracker(name=name)
        setattr(self, f"_tracker_{name}", m)
        self._train_trackers.append(m)
        return m

    @property
    def metrics(self):
        return list(self._train_trackers) + list(self._eval_trackers)

    def train_results(self) -> Dict[str, tf.Tensor]:
        """``{name: value}`` of the train trackers: the running means over the
        epoch so far, of the global batch. On more than one replica those that
        ``apply_loss`` summed with the gradients (trackers updated before it)
        come from there, with no collective of their own."""
        state = _step_state()
        graph, fused = state.logs.get(id(self), (None, {}))
        fused = fused if graph is _graph() else {}
        for m in self._train_trackers:
            state.closed.pop(id(m), None)
        return {m.name: fused[m.name] if m.name in fused else m.result()
                for m in self._train_trackers}

    # -------------------------------------------------------------- training
    def apply_loss(self, tape: tf.GradientTape, loss: tf.Tensor, variables=None, gather=()):
        """One optimizer step on ``loss`` (this replica's mean loss).

        The loss is divided by the number of replicas before differentiation:
        Keras 3 sums the replicas' gradients, so the update equals the
        single-device update on the global batch.

        On more than one replica, everything the step needs from the others
        after its backward pass travels in ONE collective (per dtype): the
        gradients, the totals and counts of the train trackers (so update them
        BEFORE calling this, which a ``Tracker`` enforces: ``train_results``
        then reports this step's global-batch values without a collective of
        its own), and the tensors in ``gather``. The optimizer's own gradient
        all-reduce is skipped (``_gradients_summed``). Over loopback TCP each
        collective is a 1-2 ms round trip on the critical path of a 10 ms step.

        Args:
          tape: the tape that recorded ``loss``.
          loss: scalar, this replica's mean loss.
          variables: what to update (default: all trainable variables).
          gather: small tensors [n_i, ...] wanted on every replica after the
            step (keys to enqueue), see ``distribute.sum_and_gather``.
        Returns:
          ``[all_gather(t) for t in gather]``: [R * n_i, ...] in replica order.
        """
        variables = self.trainable_variables if variables is None else variables
        # Seeding backprop with s / R equals differentiating loss * s / R (the
        # replica scaling and any mixed-precision loss scale s) without having
        # to build that product inside the tape.
        seed = distribute.scale_loss(self.optimizer.scale_loss(tf.ones_like(loss)))
        grads = tape.gradient(loss, variables, output_gradients=seed)
        ctx = tf.distribute.get_replica_context()
        for m in self._train_trackers:  # (see Tracker: updates end here)
            _step_state().closed[id(m)] = _graph()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            self.optimizer.apply(grads, variables)
            gathered = [tf.stop_gradient(tf.convert_to_tensor(t)) for t in gather]
        else:
            means = [m for m in self._train_trackers if isinstance(m, keras.metrics.Mean)]
            # Each replica's own (sync-on-read) totals and counts.
            parts = tf.stack([tf.cast(tf.convert_to_tensor(v), tf.float32)
                              for m in means for v in (m.total, m.count)]) if means else None
            present = [i for i, g in enumerate(grads) if g is not None]
            summed, gathered = distribute.sum_and_gather(
                [tf.convert_to_tensor(grads[i]) for i in present]
                + ([parts] if means else []), gather)
            if means:
                sums = summed.pop()
                _step_state().logs[id(self)] = (_graph(), {
                    m.name: tf.math.divide_no_nan(sums[2 * j], sums[2 * j + 1])
                    for j, m in enumerate(means)})
            grads = list(grads)
            for i, g in zip(present, summed):
                grads[i] = g
            with _gradients_summed(self.optimizer):
                self.optimizer.apply(grads, variables)
        if self._ema_pairs:
            self.update_ema()
        return gathered

    @staticmethod
    def unpack(data):
        """The element dict of a batch.

        A dict is returned as it is. Keras hands ``train_on_batch`` /
        ``evaluate`` / NumPy batches over as ``(x, y, sample_weight)`` tuples:
        a dict ``x`` is returned as it is, and an image tensor ``x`` with labels
        ``y`` becomes ``{"image": x, "label": y}`` (what ``test_step`` reads).

        Raises:
          ValueError: a ``sample_weight`` was given (no method weighs samples).
        """
        if not isinstance(data, (tuple, list)):
            return data
        x = data[0]
        y = data[1] if len(data) > 1 else None
        if len(data) > 2 and data[2] is not None:
            raise ValueError("tfssl methods do not take sample_weight / class_weight.")
        if y is None or isinstance(x, dict):
            return x
        return {"image": x, "label": y}

    def features(self, images, training=False):
        return self.encoder(images, training=training)

    def call(self, images, training=False):
        """Logits [B, C] for methods with a classifier, else features [B, D]."""
        h = self.encoder(images, training=training)
        if self.head is None:
            return h
        return self.head(h)

    def test_step(self, data):
        """Top-1 accuracy and CE of the classifier on ``{"image", "label"}``
        batches (or ``(images, labels)``)."""
        if self.head is None:
            raise ValueError(self._no_classifier_message())
        data = self.unpack(data)
        if not isinstance(data, dict) or "image" not in data or "label" not in data:
            raise ValueError(
                f"{type(self).__name__}.evaluate needs labeled images: batches of "
                "{'image': float [B, H, W, C] in [0, 1], 'label': int [B]}, or "
                "evaluate(x=images, y=labels).")
        logits = tf.cast(self(data["image"], training=False), tf.float32)
        y = data["label"]
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        self.eval_loss.update_state(loss)
        self.eval_top1.update_state(y, logits)
        return {m.name: m.result() for m in self._eval_trackers}

    # ---------------------------------------------------- Keras conventions
    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, metrics=None,
                weighted_metrics=None, **kwargs):
        """``keras.Model.compile`` with the method's own loss: its
        ``train_step`` is the algorithm, and ``evaluate`` reports the
        classifier's ``loss`` and ``top1`` (or kNN top-1, see ``evaluate``).

        Raises:
          ValueError: ``loss``, ``loss_weights``, ``metrics`` or
            ``weighted_metrics`` were given; the method would ignore them.
        """
        given = sorted(k for k, v in dict(loss=loss, loss_weights=loss_weights, metrics=metrics,
                                          weighted_metrics=weighted_metrics).items()
                       if v is not None)
        if given:
            raise ValueError(
                f"{type(self).__name__}.compile: {', '.join(given)} would be ignored: a tfssl "
                "method's loss is its train_step, and evaluate() reports the classifier's loss "
                "and top1 (or kNN top-1 with evaluate(..., reference=labeled)). Pass only the "
                "optimizer (and Keras's other compile arguments).")
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        """What ``keras.saving.load_model`` calls: compiles with the saved
        optimizer (and other compile arguments) and builds the optimizer's
        variables, so that the saved slots load into them."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        self._build_optimizer()

    def _no_classifier_message(self) -> str:
        return (f"{type(self).__name__} has no classifier head to evaluate: pass a labeled "
                "reference set, model.evaluate(test, reference=labeled) (kNN top-1 of the "
                "encoder's features; both datasets of {'image', 'label'} batches or (images, "
                "labels) arrays), or use tfssl.evaluation (knn_accuracy, "
                "linear_probe_accuracy, snn_accuracy for PAWS).")

    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None,
                 steps=None, callbacks=None, return_dict=False, reference=None, knn_k=200,
                 knn_t=0.1, **kwargs):
        """``keras.Model.evaluate``, for every method.

        A method with a classifier head reports its cross-entropy ``loss`` and
        ``top1`` as Keras does. ``reference`` (labeled images) adds the
        encoder's weighted kNN top-1 (``knn_top1``, k ``knn_k``, temperature
        ``knn_t``, cosine similarity; ``tfssl.evaluation.knn_accuracy``), and
        is what a method without a classifier (ASCL, MoCo, SeLa, PAWS) needs.

        Args:
          x, y: the test set: a dataset of ``{"image", "label"}`` batches, or
            images float [N, H, W, C] in [0, 1] with labels int [N].
          reference: the labeled reference set, in either form.
          batch_size: for array inputs (default 32).
          Others: as ``keras.Model.evaluate``.
        Returns:
          As ``keras.Model.evaluate``: a scalar or list, or ``{name: value}``
          with ``return_dict``.
        Raises:
          ValueError: no classifier and no ``reference``.
        """
        if self.head is None and reference is None:
            raise ValueError(self._no_classifier_message())
        results = {}
        if self.head is not None:
            results = super().evaluate(x=x, y=y, batch_size=batch_size, verbose=verbose,
                                       sample_weight=sample_weight, steps=steps,
                                       callbacks=callbacks, return_dict=True, **kwargs)
        if reference is not None:
            from tfssl.evaluation import knn

            test, ref = _labeled_dataset(x, y, batch_size), _labeled_dataset(reference, None,
                                                                              batch_size)
            if steps is not None:
                test = test.take(steps)
            num_classes = self.num_classes or 1 + int(max(
                int(tf.reduce_max(b["label"])) for b in ref))
            with self.ema_applied() if self.evaluate_with_ema else contextlib.nullcontext():
                results["knn_top1"] = knn.knn_accuracy(self.encoder, ref, test, num_classes,
                                                       k=knn_k, t=knn_t)
        if return_dict:
            return results
        values = list(results.values())
        return values[0] if len(values) == 1 else values

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None,
               **kwargs):
        """``keras.Model.export``: a SavedModel whose ``serve`` endpoint is
        ``call`` (float images [B, H, W, C] in [0, 1] -> logits [B, C] for
        methods with a classifier, else features [B, D]) and whose
        ``features`` endpoint is the encoder's features [B, D], both in
        inference mode, with the EMA weights when the method evaluates with
        them. Only the encoder and the classifier are written (no queue,
        bank or label table). ``tfssl.export.export_model`` writes the uint8,
        any-size serving models of ``scripts/train.py``.

        Other formats (``onnx``, ``openvino``) go to Keras's export with
        ``input_signature`` defaulting to the images' signature.
        """
        if input_signature is None:
            input_signature = [tf.TensorSpec((None,) + self.image_shape, tf.float32,
                                             name="images")]
        if format != "tf_saved_model":
            return super().export(filepath, format=format, verbose=verbose,
                                  input_signature=input_signature, **kwargs)
        if kwargs:
            raise ValueError(f"unexpected export arguments for tf_saved_model: {sorted(kwargs)}")
        archive = keras.export.ExportArchive()
        archive.track(self.encoder)
        if self.head is not None:
            archive.track(self.head)
        archive.add_endpoint("serve", lambda images: self.call(images, training=False),
                             input_signature=input_signature)
        archive.add_endpoint("features", lambda images: self.encoder(images, training=False),
                             input_signature=input_signature)
        with self.ema_applied() if self.evaluate_with_ema else contextlib.nullcontext():
            archive.write_out(filepath, verbose=True if verbose is None else verbose)

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


def _labeled_dataset(x, y=None, batch_size=None) -> tf.data.Dataset:
    """``{"image", "label"}`` batches from a dataset of them, a ``(images,
    labels)`` pair, or ``x`` images with ``y`` labels (arrays)."""
    if isinstance(x, tf.data.Dataset):
        return x
    if y is None and isinstance(x, (tuple, list)) and len(x) == 2:
        x, y = x
    if y is None:
        raise ValueError("labeled images are needed: a dataset of {'image', 'label'} batches "
                         "or (images, labels) arrays.")
    return tf.data.Dataset.from_tensor_slices(
        {"image": tf.convert_to_tensor(x, tf.float32),
         "label": tf.convert_to_tensor(y, tf.int64)}).batch(batch_size or 32)
