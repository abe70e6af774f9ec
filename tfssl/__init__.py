"""tfssl: semi- and self-supervised image representation learning on Keras 3.

Modules:
  tfssl.data        dataset sources, SSL splits, multi-view tf.data pipelines
  tfssl.augment     weak / strong / SimCLR colour / multi-crop views
  tfssl.models      backbones and heads
  tfssl.methods     one keras.Model subclass per method, with a registry
  tfssl.ops         pure tensor math, XLA-compilable
  tfssl.evaluation  kNN monitor, linear probe
  tfssl.export      serving SavedModels
  tfssl.optimizers  PyTorch-form SGD / Adam (coupled L2), LARS, schedules
  tfssl.distribute  strategies and cross-replica helpers
"""

__version__ = "0.1.0"

from tfssl import augment, data, distribute, evaluation, export, methods, models, optimizers  # noqa: E402,F401
