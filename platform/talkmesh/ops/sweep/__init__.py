"""Ray Tune sweeps: a search space over dotted overrides, one Ray Train run per trial.

    python sweeps/run.py sweeps/faceformer.yaml [--num-samples N] [--name NAME] [key=value ...]

    cfg = load_sweep("sweeps/faceformer.yaml", ["train.epochs=2"], num_samples=2)
    result = run_sweep(cfg)          # -> SweepResult (trials, best, registered version, promoted?)

The YAML format and what a sweep does: ``sweeps/README.md``. Modules, each importing only
package modules listed before it:

- :mod:`.config` - the strict :class:`SweepConfig`; every space key is checked against the
  method's ``ExperimentConfig`` before Ray starts. No Ray import.
- :mod:`.results` - trial summaries and the best trial from Tune's ``ResultGrid``; closing the
  MLflow runs of stopped trials; ``sweep_results.csv``; the text report.
- :mod:`.callbacks` - Ray side: epoch-counted Tune reports and the version-gated
  placement-group work-around. Imports Ray, so it is imported where a sweep runs.
- :mod:`.run` - :func:`run_sweep`: the ``Tuner`` around one ``run_training`` per trial, the
  MLflow parent run with a child run per trial, registration and the ``@champion`` rule,
  restore of a sweep run again under the same name; the command line.
"""

from talkmesh.ops.sweep.config import (
    EPOCHS_DONE,
    TRAIN_DRIVER,
    Distribution,
    SchedulerConfig,
    SearchConfig,
    SweepConfig,
    load_sweep,
)
from talkmesh.ops.sweep.results import SweepError, SweepResult, TrialSummary, format_summary
from talkmesh.ops.sweep.run import main, run_sweep

__all__ = [
    "EPOCHS_DONE",
    "TRAIN_DRIVER",
    "Distribution",
    "SchedulerConfig",
    "SearchConfig",
    "SweepConfig",
    "SweepError",
    "SweepResult",
    "TrialSummary",
    "format_summary",
    "load_sweep",
    "main",
    "run_sweep",
]
