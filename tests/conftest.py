"""Test session setup: oneDNN on, and the CPU split into 2 logical devices
before TensorFlow initialises, so MirroredStrategy tests run without a GPU."""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfssl import distribute  # noqa: E402

distribute.configure_cpu_devices(2)
