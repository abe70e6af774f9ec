"""Optimizers with the official codes' weight decay, usable by every method.

- ``SGD``: PyTorch's SGD (momentum, Nesterov) with its coupled L2 weight decay,
  ``g <- g + wd w`` before the momentum (SimMatch, ASCL, SeLa, USB; the same
  update as TF FixMatch's ``wd * sum(l2_loss(kernel))`` added to the loss).
- ``Adam``: Keras's Adam with the same coupled L2 (PyTorch's
  ``Adam(weight_decay=wd)``).
- ``LARS`` (You et al., 2017) as the official PAWS code wraps it around SGD.
- Schedules: ``warmup_cosine`` (warm-up + cosine to a final rate),
  ``PartialCosine`` (``lr cos(pi f k / K)``, USB / FixMatch's ``f = 7/16``) and
  ``step_decay`` (x ``factor`` at given epochs, SeLa's and SimMatch's step form).

Keras's own ``weight_decay`` argument is decoupled (``w <- w - lr wd w``,
applied apart from the gradient); at momentum 0.9 it is about 10x weaker than
the coupled form with the same ``wd``. ``tfssl.train`` builds either form
(``--weight_decay_form``).

The coupled decay is added inside ``update_step``, which Keras runs once per
variable on the gradient already summed over the replicas (in
``distribution.extended.update``), so under a ``tf.distribute`` strategy it is
added once, as on one device, and never summed over replicas.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import keras
from keras import ops

# Variables whose name is one of these skip the weight decay (and LARS's
# adaptation): biases and normalisation parameters (PAWS, SimCLR, BYOL, USB,
# TF FixMatch's kernels-only decay).
DEFAULT_EXCLUDE = ("bias", "gamma", "beta")

WEIGHT_DECAY_FORMS = ("coupled", "decoupled")


class _SavedExclusions:
    """Mixin: ``exclude`` (variable names that skip the weight decay, matched
    in ``variable.name``) is Keras's own ``exclude_from_weight_decay``
    selection, kept in the optimizer's config. Keras does not put that
    selection in its ``get_config``, so a model saved and loaded with
    ``keras.saving`` would otherwise decay its biases and BN parameters from
    the first step after the load."""

    def _set_exclusions(self, exclude: Iterable[str]) -> None:
        self.exclude = tuple(exclude)
        if self.exclude:
            self.exclude_from_weight_decay(var_names=list(self.exclude))

    def get_config(self):
        return {**super().get_config(), "exclude": list(self.exclude)}


class _DecoupledExclusions(_SavedExclusions):
    """``_SavedExclusions`` as a constructor argument of Keras's
    decoupled-decay optimizers."""

    def __init__(self, *args, exclude: Iterable[str] = DEFAULT_EXCLUDE, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_exclusions(exclude)


class _CoupledL2(_SavedExclusions):
    """Mixin: ``g <- g + wd w`` for each decayed variable, before the wrapped
    optimizer's update. Which variables decay is ``_SavedExclusions``'s
    selection, set to ``exclude`` at construction."""

    def _init_l2(self, weight_decay: float, exclude: Iterable[str]) -> None:
        if weight_decay is None or weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        self.l2_weight_decay = float(weight_decay)
        self._set_exclusions(exclude)

    def uses_weight_decay(self, variable) -> bool:
        """Whether ``variable`` gets the coupled decay (not a bias or BN parameter)."""
        return bool(self.l2_weight_decay) and self._use_weight_decay(variable)

    def _with_l2(self, gradient, variable):
        g = ops.cast(gradient, variable.dtype)
        if self.uses_weight_decay(variable):
            wd = ops.cast(self.l2_weight_decay, variable.dtype)
            g = ops.add(g, ops.multiply(ops.convert_to_tensor(variable), wd))
        return g

    def _l2_config(self, config):
        config.update(weight_decay=self.l2_weight_decay)
        return config


@keras.saving.register_keras_serializable(package="tfssl")
class SGD(_CoupledL2, keras.optimizers.Optimizer):
    """PyTorch's ``torch.optim.SGD`` (no dampening) as a Keras 3 optimizer.

    For each variable ``w`` with gradient ``g`` (summed over replicas):

        g' = g + wd w      (wd = 0 for excluded variables: biases, BN gamma/beta)
        v <- mu v + g'
        w <- w - lr v                 (nesterov: w <- w - lr (g' + mu v))

    The learning rate multiplies the step, not the momentum buffer (Keras's
    ``SGD`` keeps ``lr g`` in its buffer; the two differ while the rate
    changes). TF1's ``MomentumOptimizer`` (the official FixMatch) has this
    same form.

    Args:
      learning_rate: float or a ``keras.optimizers.schedules`` schedule.
      momentum: mu in [0, 1).
      nesterov: Nesterov momentum.
      weight_decay: wd of the coupled L2 decay (NOT Keras's decoupled one).
      exclude: variable names that skip the decay (matched in ``variable.name``).
    """

    def __init__(self, learning_rate=0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, exclude: Iterable[str] = DEFAULT_EXCLUDE,
                 name: str = "sgd", **kwargs):
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD momentum must be in [0, 1), got {momentum}.")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self._init_l2(weight_decay, exclude)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = (self.add_optimizer_variables(variables, "momentum")
                          if self.momentum else [])

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = self._with_l2(gradient, variable)
        if not self.momentum:
            self.assign_sub(variable, ops.multiply(g, lr))
            return
        v = self.momentums[self._get_variable_index(variable)]
        mu = ops.cast(self.momentum, variable.dtype)
        self.assign(v, ops.add(ops.multiply(v, mu), g))
        step = ops.add(g, ops.multiply(v, mu)) if self.nesterov else v
        self.assign_sub(variable, ops.multiply(step, lr))

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, nesterov=self.nesterov)
        return self._l2_config(config)


@keras.saving.register_keras_serializable(package="tfssl")
class Adam(_CoupledL2, keras.optimizers.Adam):
    """Keras's Adam on ``g + wd w`` (coupled L2 weight decay, as PyTorch's
    ``Adam(weight_decay=wd)``); biases and BN parameters excluded. Other
    arguments are ``keras.optimizers.Adam``'s."""

    def __init__(self, learning_rate=0.001, weight_decay: float = 0.0,
                 exclude: Iterable[str] = DEFAULT_EXCLUDE, name: str = "adam", **kwargs):
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self._init_l2(weight_decay, exclude)

    def update_step(self, gradient, variable, learning_rate):
        super().update_step(self._with_l2(gradient, variable), variable, learning_rate)

    def get_config(self):
        return self._l2_config(super().get_config())


@keras.saving.register_keras_serializable(package="tfssl")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise adaptive rate scaling over SGD with (heavy-ball) momentum, as
    the official PAWS code (suncet ``src/lars.py`` around its ``src/sgd.py``).

    For each variable ``w`` with gradient ``g`` that is not excluded:

        g' = (g + wd w) * eta ||w|| / (||g|| + wd ||w|| + eps)   if ||w|| > 0 and ||g|| > 0
        g' = g                                                   otherwise

    and for excluded variables (biases, BN ``gamma``/``beta``) ``g' = g`` (no
    adaptation, no weight decay). Then, as suncet's SGD, with the learning
    rate inside the momentum buffer:

        v <- mu v + lr g'       w <- w - v          (nesterov: w <- w - (lr g' + mu v))

    (equal to ``v <- mu v + g'; w <- w - lr v`` while the rate is constant; the
    two differ under the warm-up and cosine schedule).

    Args:
      learning_rate: float or a ``keras.optimizers.schedules`` schedule
        (``warmup_cosine`` below gives PAWS's).
      momentum: mu (0.9).
      weight_decay: wd, coupled as above (1e-6 PAWS ImageNet). It is NOT the
        decoupled decay of Keras's base optimizer.
      trust_coefficient: eta (0.001 in PAWS).
      eps: epsilon of the trust ratio.
      nesterov: Nesterov momentum (off in PAWS).
      exclude: variable names (``variable.name``, e.g. ``"bias"``) that skip
        adaptation and decay; see also ``exclude_from_lars``.
    """

    def __init__(self, learning_rate=0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False,
                 exclude: Iterable[str] = DEFAULT_EXCLUDE, name: str = "lars", **kwargs):
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}.")
        if weight_decay < 0 or trust_coefficient <= 0 or eps <= 0:
            raise ValueError("LARS needs weight_decay >= 0, trust_coefficient > 0, eps > 0.")
        self.momentum = float(momentum)
        self.lars_weight_decay = float(weight_decay)
        self.trust_coefficient = float(trust_coefficient)
        self.eps = float(eps)
        self.nesterov = bool(nesterov)
        self.exclude = tuple(exclude)
        self._excluded_ids = set()

    def exclude_from_lars(self, var_list: Optional[Iterable] = None,
                          var_names: Optional[Iterable[str]] = None) -> None:
        """Excludes more variables (objects, or names) from adaptation and decay.
        Call before the first step."""
        if self.built:
            raise ValueError("exclude_from_lars must be called before the optimizer is built.")
        for v in var_list or ():
            self._excluded_ids.add(id(v))
        self.exclude = self.exclude + tuple(var_names or ())

    def is_excluded(self, variable) -> bool:
        """Whether ``variable`` skips the trust ratio and the weight decay."""
        name = variable.name.split("/")[-1].split(":")[0]
        return id(variable) in self._excluded_ids or name in self.exclude

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        self._excluded_index = {self._var_key(v): self.is_excluded(v) for v in variables}

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        w = ops.convert_to_tensor(variable)
        if not self._excluded_index[self._var_key(variable)]:
            wd = self.lars_weight_decay
            w_norm = ops.sqrt(ops.sum(ops.square(w)))
            g_norm = ops.sqrt(ops.sum(ops.square(g)))
            ratio = self.trust_coefficient * w_norm / (g_norm + wd * w_norm + self.eps)
            adapt = ops.logical_and(w_norm > 0, g_norm > 0)
            g = ops.where(adapt, ops.multiply(ops.add(g, wd * w), ratio), g)
        v = self.momentums[self._get_variable_index(variable)]
        mu = ops.cast(self.momentum, variable.dtype)
        lr_g = ops.multiply(g, lr)
        self.assign(v, ops.add(ops.multiply(v, mu), lr_g))
        step = ops.add(lr_g, ops.multiply(v, mu)) if self.nesterov else v
        self.assign_sub(variable, step)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.lars_weight_decay,
                      trust_coefficient=self.trust_coefficient, eps=self.eps,
                      nesterov=self.nesterov, exclude=list(self.exclude))
        return config


@keras.saving.register_keras_serializable(package="tfssl")
class DecoupledSGD(_DecoupledExclusions, keras.optimizers.SGD):
    """``keras.optimizers.SGD`` (decoupled decay ``w <- w - lr wd w``) whose
    ``exclude`` names skip the decay and are saved with the optimizer."""


@keras.saving.register_keras_serializable(package="tfssl")
class DecoupledAdam(_DecoupledExclusions, keras.optimizers.Adam):
    """``keras.optimizers.Adam`` with decoupled decay; ``exclude`` as ``DecoupledSGD``."""


@keras.saving.register_keras_serializable(package="tfssl")
class AdamW(_DecoupledExclusions, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW``; ``exclude`` as ``DecoupledSGD``."""


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int = 0,
                  start_lr: float = 0.0, final_lr: float = 0.0):
    """Linear warm-up from ``start_lr`` to ``peak_lr`` over ``warmup_steps``, then a
    cosine decay to ``final_lr`` at ``total_steps`` (PAWS: 10 warm-up epochs)."""
    if total_steps < 1 or not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}.")
    decay = max(1, total_steps - warmup_steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=start_lr if warmup_steps else peak_lr, decay_steps=decay,
        alpha=final_lr / peak_lr if peak_lr else 0.0,
        warmup_target=peak_lr if warmup_steps else None, warmup_steps=warmup_steps)


@keras.saving.register_keras_serializable(package="tfssl")
class PartialCosine(keras.optimizers.schedules.LearningRateSchedule):
    """``lr_k = peak_lr cos(pi f (k - W) / (K - W))`` after a linear warm-up
    from ``start_lr`` over ``W`` steps, for optimizer step ``k`` of ``K``.

    With ``f = 7/16`` this is the schedule of FixMatch (``eta cos(7 pi k / 16 K)``)
    and of USB's ``get_cosine_schedule_with_warmup`` (its ``num_cycles``); it
    ends at ``cos(7 pi / 16) = 0.195`` of the peak, not at 0. Clipped at 0 for
    ``f > 1/2``, as USB's ``max(0, cos(...))``.

    Args:
      peak_lr: the rate after the warm-up, ``eta``.
      total_steps: ``K``, the optimizer steps of the run.
      fraction: ``f`` in (0, 1].
      warmup_steps: ``W`` (0: none).
      start_lr: the rate at step 0 of the warm-up.
    """

    def __init__(self, peak_lr: float, total_steps: int, fraction: float = 7 / 16,
                 warmup_steps: int = 0, start_lr: float = 0.0):
        if total_steps < 1 or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, "
                             f"{total_steps}.")
        if not 0 < fraction <= 1:
            raise ValueError(f"the cosine fraction must be in (0, 1], got {fraction}.")
        self.peak_lr, self.total_steps, self.fraction = float(peak_lr), int(total_steps), float(fraction)
        self.warmup_steps, self.start_lr = int(warmup_steps), float(start_lr)

    def __call__(self, step):
        k = ops.cast(step, "float32")
        w = float(self.warmup_steps)
        progress = ops.clip((k - w) / float(self.total_steps - self.warmup_steps), 0.0, 1.0)
        decay = self.peak_lr * ops.maximum(ops.cos(math.pi * self.fraction * progress), 0.0)
        if not self.warmup_steps:
            return decay
        warm = self.start_lr + (self.peak_lr - self.start_lr) * k / w
        return ops.where(k < w, warm, decay)

    def get_config(self):
        return dict(peak_lr=self.peak_lr, total_steps=self.total_steps, fraction=self.fraction,
                    warmup_steps=self.warmup_steps, start_lr=self.start_lr)


def step_decay(peak_lr: float, steps_per_epoch: int, epochs: Sequence[int],
               factor: float = 0.1):
    """``peak_lr factor^(number of e in epochs with epoch >= e)``, constant within
    an epoch: the rate of every step of epoch ``epoch`` (0-based) is fixed at the
    epoch's start, as ``adjust_learning_rate`` in self-label and SimMatch sets it.

    Args:
      peak_lr: the rate of epoch 0.
      steps_per_epoch: optimizer steps per epoch.
      epochs: the epochs (0-based, increasing) from which the rate is multiplied
        by ``factor`` once more (self-label CIFAR, 400 epochs: 240, 320;
        self-label ImageNet: 150, 300, 350).
      factor: the multiplier at each of ``epochs``.
    """
    epochs = [int(e) for e in epochs]
    if not epochs or any(e < 1 for e in epochs) or epochs != sorted(set(epochs)):
        raise ValueError(f"step epochs must be increasing positive integers, got {epochs}.")
    if not 0 < factor < 1 or steps_per_epoch < 1:
        raise ValueError(f"need 0 < factor < 1 and steps_per_epoch >= 1, got {factor}, "
                         f"{steps_per_epoch}.")
    # Keras's PiecewiseConstantDecay gives values[i] for boundaries[i-1] < k <= boundaries[i];
    # step k belongs to epoch k // steps_per_epoch, so epoch e starts after boundary e*spe - 1.
    boundaries = [e * steps_per_epoch - 1 for e in epochs]
    values = [peak_lr * factor ** i for i in range(len(epochs) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
