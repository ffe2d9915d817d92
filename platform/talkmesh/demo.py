"""`make demo`: what a newcomer runs first.

Until the training job lands, the demo generates the synthetic corpus (default preset)
through the same command a user would run and prints its inspection summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

from talkmesh.cli import main as cli_main


def main(out: str = "outputs/synthetic-default") -> int:
    target = Path(out)
    if (target / "meta.json").is_file():
        print(f"synthetic corpus already at {target}; inspecting it")
        return cli_main(["data", "inspect", "--format", "synthetic", "--root", str(target)])
    return cli_main(["data", "synth", "--out", str(target), "--preset", "default", "--seed", "0"])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
