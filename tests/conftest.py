"""Test session setup: oneDNN on, and the CPU split into 2 logical devices
before TensorFlow initialises, so MirroredStrategy tests run without a GPU."""

import importlib.util
import os
import sys

import pytest

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfssl import distribute  # noqa: E402

distribute.configure_cpu_devices(2)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def train_script():
    """scripts/train.py as a module (its absl flags, ``config_from_flags``).

    Loaded once per session: absl refuses to define the same flag twice, so every
    test that needs the script's flags shares this one module.
    """
    name = "_tfssl_train_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts",
                                                                         "train.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
