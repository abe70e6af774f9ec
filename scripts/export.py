#!/usr/bin/env python
"""Export a finished run's encoder and classifier as serving SavedModels.

    python scripts/export.py --workdir=runs/digits --export_dir=saved_models/digits

Training already exports at its end; use this to export again elsewhere.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "A finished run's workdir (holds summary.json).")
flags.DEFINE_string("export_dir", None, "Where to write (default saved_models/<run>).")
flags.mark_flag_as_required("workdir")
F = flags.FLAGS


def main(argv):
    logging.set_verbosity(logging.WARNING)
    from tfssl.train import export_run

    try:
        paths = export_run(F.workdir, F.export_dir)
    except ValueError as e:
        raise app.UsageError(str(e))
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    app.run(main)
