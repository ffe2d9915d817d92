"""Train FaceFormer (specs/faceformer.md), evaluate the test splits, register talkmesh-faceformer.

    python jobs/faceformer.py                                   # small preset, synthetic corpus
    python jobs/faceformer.py --preset vocaset data.root=/data/vocaset --num-workers 4 --gpu
    ray job submit --working-dir . -- python jobs/faceformer.py --preset small train.epochs=3

Presets: configs/faceformer/{small,vocaset,biwi}.yaml; trailing key=value are dotted overrides.
"""

import sys

from talkmesh.ops.jobs import main

if __name__ == "__main__":
    sys.exit(main("faceformer"))
