"""LARS (You et al., 2017) as a Keras 3 optimizer, usable by every method
(``--optimizer=lars``), and the warm-up + cosine schedule it is used with."""

from __future__ import annotations

from typing import Iterable, Optional

import keras
from keras import ops

# Variables whose name is one of these skip the LARS adaptation and the weight
# decay: biases and normalisation parameters (PAWS, SimCLR, BYOL).
DEFAULT_EXCLUDE = ("bias", "gamma", "beta")


@keras.saving.register_keras_serializable(package="tfssl")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise adaptive rate scaling over SGD with (heavy-ball) momentum.

    For each variable ``w`` with gradient ``g`` that is not excluded:

        g' = (g + wd w) * eta ||w|| / (||g|| + wd ||w|| + eps)   if ||w|| > 0 and ||g|| > 0
        g' = g + wd w                                            otherwise

    and for excluded variables (biases, BN ``gamma``/``beta``) ``g' = g`` (no
    adaptation, no weight decay). Then, as PyTorch's SGD that the official PAWS
    code wraps:

        v <- mu v + g'          w <- w - lr v          (nesterov: w <- w - lr (g' + mu v))

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
            ratio = ops.where(ops.logical_and(w_norm > 0, g_norm > 0), ratio,
                              ops.ones_like(ratio))
            g = ops.multiply(ops.add(g, wd * w), ratio)
        v = self.momentums[self._get_variable_index(variable)]
        mu = ops.cast(self.momentum, variable.dtype)
        self.assign(v, ops.add(ops.multiply(v, mu), g))
        step = ops.add(g, ops.multiply(v, mu)) if self.nesterov else v
        self.assign_sub(variable, ops.multiply(step, lr))

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.lars_weight_decay,
                      trust_coefficient=self.trust_coefficient, eps=self.eps,
                      nesterov=self.nesterov, exclude=list(self.exclude))
        return config


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
