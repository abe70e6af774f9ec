"""Every flags/*.cfg parses with scripts/train.py's flags into a valid TrainConfig."""

import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "flags", "*.cfg")))


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
