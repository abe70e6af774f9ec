"""Every flags/*.cfg parses with scripts/train.py's flags into a valid TrainConfig."""

import glob
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "flags", "*.cfg")))


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("_tfssl_train_script",
                                                  os.path.join(ROOT, "scripts", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_flagfile_parses_and_validates(train_script, path, monkeypatch):
    from tfssl import methods

    monkeypatch.chdir(ROOT)  # nested --flagfile paths are relative to the repo root
    flags = train_script.F
    flags.unparse_flags()
    flags(["train.py", f"--flagfile={path}"])
    try:
        cfg = train_script.config_from_flags()
        assert cfg.method in methods.available()
        cfg.validate()
    finally:
        flags.unparse_flags()
