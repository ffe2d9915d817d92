"""Train DEEPTalk (specs/deeptalk.md) stage by stage, evaluate the test splits, register talkmesh-deeptalk.

    python jobs/deeptalk.py                                     # small preset, synthetic corpus (FLAME flavour)
    python jobs/deeptalk.py --preset mead data.root=/data/mead data.flame_model=/models/generic_model.pkl --gpu
    python jobs/deeptalk.py --stage stage2 --init-from runs:/<stage1 run id>/checkpoints/epoch-0007
    ray job submit --working-dir . -- python jobs/deeptalk.py

The stages (fer -> dee -> vq -> stage1 -> stage2) run in order as child runs of one MLflow
parent run, each starting from the previous stage's selected checkpoint; ``--stage NAME
--init-from URI`` re-runs one stage alone on an earlier run's artifacts. The test splits are
scored with the shared metrics and DEEPTalk's own (emotion retrieval, ``emo_acc``,
``sample_diversity``). Presets: configs/deeptalk/{small,mead}.yaml; trailing key=value are
dotted overrides (``model.vq.top_codes=32``, ``model.generator.loss_weights.emo=1e-3``).
"""

import sys

from talkmesh.ops.jobs import main

if __name__ == "__main__":
    sys.exit(main("deeptalk"))
