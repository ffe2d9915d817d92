"""Train DualTalker (specs/dualtalker.md, a reconstruction), evaluate the test splits, register
talkmesh-dualtalker.

    python jobs/dualtalker.py                                   # small preset, synthetic corpus
    python jobs/dualtalker.py model.loss_weights.feat_pred=0 model.loss_weights.ctc_pred=0   # no dual regulariser
    python jobs/dualtalker.py --preset vocaset data.root=/data/vocaset --num-workers 1 --gpu
    ray job submit --working-dir . -- python jobs/dualtalker.py --preset small train.epochs=3

Presets: configs/dualtalker/{small,vocaset,biwi}.yaml; trailing key=value are dotted overrides.
"""

import sys

from talkmesh.ops.jobs import main

if __name__ == "__main__":
    sys.exit(main("dualtalker"))
