"""Ray-side helpers of :mod:`talkmesh.ops.sweep`: epoch-counted Tune reports, and freeing the
placement groups of stopped trials.

:class:`EpochTuneReportCallback` is Ray Train's ``TuneReportCallback`` (rank 0's metrics of
every report go to Tune) that also sets ``epochs_done`` from the loop's ``epoch``: ASHA counts
in it, so a trial whose Train run resumed from a checkpoint (a Tune retry, a restored sweep)
is compared at its true epoch, not at the number of reports since it restarted.

Why: when ASHA stops a trial, Tune terminates the trial's actor, which kills the Ray Train
controller it owns before that controller can remove its workers' placement group. A
placement group made by a non-detached actor lives as long as the *job* (the sweep
driver), so the CPUs stay reserved and later trials wait forever ("worker group startup
timed out"). Ray Train's own ``PlacementGroupCleaner`` frees it only where the State API
answers (a dashboard, and a single Ray instance on the host): not on a cluster started
without the dashboard (the test fixture) nor on a machine that runs several clusters.

So each trial's Train run records its placement group ids with its controller's actor id
(:class:`PlacementGroupRecorder`, a Ray Train worker-group callback: internal API of Ray
2.60, guarded) in ``<dir>/<run name>.txt``, and the sweep driver removes the recorded groups
of trials Tune has finished once their controller is dead (:class:`PlacementGroupReaper`, a
Tune callback; liveness from the GCS actor table, which needs no dashboard). A group whose
controller is alive is left alone: a finishing run removes its own, and removing it under a
live controller would fail that run.

Imports Ray at import time: import this module only where a sweep runs.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from ray import tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.integration.ray_train import TuneReportCallback

from talkmesh.ops.sweep import EPOCHS_DONE

__all__ = ["EpochTuneReportCallback", "PlacementGroupReaper", "PlacementGroupRecorder", "remove_recorded"]


class EpochTuneReportCallback(TuneReportCallback):
    """``TuneReportCallback`` adding ``epochs_done`` = rank 0's ``epoch`` + 1 (runs in the
    Ray Train controller; construct it inside the Tune trial)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and isinstance(metrics[0].get("epoch"), (int, float)):
            metrics = [{**metrics[0], EPOCHS_DONE: int(metrics[0]["epoch"]) + 1}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


class PlacementGroupRecorder(WorkerGroupCallback):
    """Appends ``<placement group id> <controller actor id>`` to ``path`` for each worker
    group the run starts (runs in the Ray Train controller)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_worker_group_start(self, worker_group: Any) -> None:
        import ray

        try:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            controller = ray.get_runtime_context().get_actor_id()
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(f"{pg.id.hex()} {controller}\n")
        except Exception as e:  # noqa: BLE001 - an internal Ray API; never fail training over it
            warnings.warn(
                f"placement group of this Train run not recorded ({e}); a stopped trial may hold its CPUs", stacklevel=2
            )


def _actor_dead(actor_id: str) -> bool:
    """Whether the GCS lists ``actor_id`` as DEAD (or not at all)."""
    from ray._private.state import actors

    info = actors(actor_id=actor_id)
    return not info or info.get("State") == "DEAD"


def remove_recorded(path: Path, force: bool = False) -> tuple[int, int]:
    """Remove the placement groups listed in ``path`` whose controller is dead (every one
    still there with ``force``). Returns (removed now, still held by a live controller)."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if not path.is_file():
        return 0, 0
    removed = live = 0
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(parts[0])))
        try:
            state = placement_group_table(pg).get("state")
            if not state or state == "REMOVED":
                continue
            if not force and len(parts) > 1 and not _actor_dead(parts[1]):
                live += 1
                continue
            remove_placement_group(pg)
            removed += 1
        except Exception as e:  # noqa: BLE001 - best effort: the controller may be removing it too
            warnings.warn(f"placement group {parts[0]} not removed: {e}", stacklevel=2)
    return removed, live


class PlacementGroupReaper(tune.Callback):
    """Tune callback (sweep driver): frees the placement groups of trials Tune has finished
    (completed, stopped or failed) once their Train controller is dead, checking every
    ``interval_s``; at the end of the experiment it waits up to ``final_wait_s`` for the
    controllers to die, then frees what is left."""

    def __init__(self, directory: str, sweep_name: str, interval_s: float = 2.0, final_wait_s: float = 30.0) -> None:
        self.directory = directory
        self.sweep_name = sweep_name
        self.interval_s = interval_s
        self.final_wait_s = final_wait_s
        self._pending: set[str] = set()
        self._last = 0.0
        self.removed = 0

    def _path(self, trial_id: str) -> Path:
        return Path(self.directory) / f"{self.sweep_name}-{trial_id}.txt"

    def _reap(self, force: bool = False) -> None:
        for trial_id in sorted(self._pending):
            removed, live = remove_recorded(self._path(trial_id), force=force)
            self.removed += removed
            if not live:
                self._pending.discard(trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._pending.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._pending.add(trial.trial_id)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if self._pending and now - self._last >= self.interval_s:
            self._last = now
            self._reap()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._pending.update(t.trial_id for t in trials)
        deadline = time.monotonic() + self.final_wait_s
        self._reap()
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.5)
            self._reap()
        self._reap(force=True)
