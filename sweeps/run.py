"""Run a Ray Tune sweep: ``python sweeps/run.py sweeps/faceformer.yaml [--num-samples N] [key=value ...]``.

Trailing ``key=value`` arguments are fixed overrides of every trial (``train.epochs=2``).
Under ``ray job submit`` it attaches to the job's cluster (which must offer ``TRAIN_DRIVER``
slots: ``ray start --head --resources='{"TRAIN_DRIVER": 2}'``); run directly, it starts a
local Ray bound to 127.0.0.1. All logic lives in :mod:`talkmesh.ops.sweep`.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback Ray; before ray is imported
    from talkmesh.ops.sweep import main

    sys.exit(main(sys.argv[1:]))
