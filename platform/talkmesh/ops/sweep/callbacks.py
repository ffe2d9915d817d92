"""Ray-side parts of a sweep: the epoch-counted Tune report, and a placement-group work-around.

:class:`EpochTuneReportCallback` is Ray Train's ``TuneReportCallback`` plus ``epochs_done``
(rank 0's ``epoch`` + 1): ASHA counts in it, so a trial whose Train run resumed from a
checkpoint (a Tune retry, a restored sweep) is compared at its true epoch.

Work-around for https://github.com/ray-project/ray/issues/54305 ("[Ray Tune + Train V2]
Broken resource sharing among Tune trials"): when ASHA stops a trial, Tune kills the trial
actor and with it the Train controller it owns, before the controller removes its workers'
placement group. Ray cleans up a group only once both its creator actor and creator job (the
sweep driver) are dead (https://github.com/ray-project/ray/issues/65881, open), so the CPUs
stay reserved and later trials wait ("worker group startup timed out"). #54305 was closed by
Train's ``PlacementGroupCleaner`` (https://github.com/ray-project/ray/pull/58515), which tests
the controller's liveness through the State API, i.e. only where a dashboard runs; without
one the group still leaked (observed on ray 2.60.0). So each trial's Train run records its
group ids and controller actor id (:class:`PlacementGroupRecorder`, an internal Train
callback API) and the sweep driver removes the groups of finished trials once their
controller is dead (:class:`PlacementGroupReaper`, liveness from the GCS actor table). Used
only while :func:`placement_group_workaround_needed` (the Ray version) says so.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import ray
from packaging.version import Version
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from talkmesh.ops.sweep.config import EPOCHS_DONE

try:  # internal Ray Train API (2.60); a Ray where it moved is past the work-around's versions
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
except ImportError:  # pragma: no cover
    WorkerGroupCallback = object  # type: ignore[assignment,misc]

__all__ = [
    "PG_LEAK_LAST_SEEN",
    "EpochTuneReportCallback",
    "PlacementGroupReaper",
    "PlacementGroupRecorder",
    "placement_group_workaround_needed",
    "remove_recorded",
]

# Newest Ray (major, minor) on which the leak of ray-project/ray#54305 was seen without a
# dashboard. Newer Rays run without the work-around; raise this after re-checking one that
# still leaks (ASHA stops a trial on a cluster started with include_dashboard=False).
PG_LEAK_LAST_SEEN = (2, 60)


def placement_group_workaround_needed(ray_version: str | None = None) -> bool:
    """Whether this Ray (or ``ray_version``) is one on which stopped trials leak placement groups."""
    return Version(ray_version or ray.__version__).release[:2] <= PG_LEAK_LAST_SEEN


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
    """Whether the GCS lists ``actor_id`` as DEAD (or not at all); needs no dashboard."""
    from ray._private.state import actors

    info = actors(actor_id=actor_id)
    return not info or info.get("State") == "DEAD"


def remove_recorded(path: Path, force: bool = False) -> tuple[int, int]:
    """Remove the placement groups listed in ``path`` whose controller is dead (every one
    still there with ``force``). Returns (removed now, still held by a live controller)."""
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if not path.is_file():
        return 0, 0
    removed = live = 0
    for parts in (line.split() for line in path.read_text().splitlines()):
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
    """Tune callback (sweep driver): frees the recorded placement groups of trials Tune has
    finished (completed, stopped or failed) once their Train controller is dead, checking every
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

    def _reap(self, force: bool = False) -> None:
        for trial_id in sorted(self._pending):
            removed, live = remove_recorded(Path(self.directory) / f"{self.sweep_name}-{trial_id}.txt", force=force)
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
