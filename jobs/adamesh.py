"""Train AdaMesh (specs/adamesh.md) stage by stage, evaluate the test splits, register talkmesh-adamesh.

    python jobs/adamesh.py                                      # small preset, synthetic corpus (FLAME flavour)
    python jobs/adamesh.py --preset mead data.root=/data/mead data.flame_model=/models/generic_model.pkl --gpu
    python jobs/adamesh.py --stage pose_index --init-from runs:/<run id>/checkpoints/epoch-0011
    ray job submit --working-dir . -- python jobs/adamesh.py

The stages (expression -> pose_vq -> posegpt -> pose_index) run in order as child runs of
one MLflow parent run, each starting from the previous stage's selected checkpoint;
``--stage NAME --init-from URI`` re-runs one stage alone on an earlier run's artifacts.
Presets: configs/adamesh/{small,mead}.yaml; trailing key=value are dotted overrides.
"""

import sys

from talkmesh.ops.jobs import main

if __name__ == "__main__":
    sys.exit(main("adamesh"))
