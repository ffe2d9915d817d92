"""Train Mimic (specs/mimic.md), evaluate the test splits, register talkmesh-mimic.

    python jobs/mimic.py                                        # small preset, synthetic corpus
    python jobs/mimic.py model.constraints=false                # ablation: the four constraints off
    python jobs/mimic.py --preset hdtf data.root=/data/3D-HDTF --num-workers 1 --gpu
    ray job submit --working-dir . -- python jobs/mimic.py --preset small train.epochs=3

Presets: configs/mimic/{small,hdtf,vocaset,biwi}.yaml; trailing key=value are dotted overrides.
"""

import sys

from talkmesh.ops.jobs import main

if __name__ == "__main__":
    sys.exit(main("mimic"))
