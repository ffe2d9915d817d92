"""Shared test set-up: offline hub, loopback Ray, a private cache directory, and one
loopback-only local Ray cluster (2 CPUs) shared by every test of the session that asks for it."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports transformers/ray: no downloads, loopback only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Serve's proxy is killed after 3 health checks that each time out (10 s by default); on a
# 2-core machine kept busy by the other test worker a check can take longer than that.
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generated corpora and feature caches go to a per-session temp dir, never ~/.cache."""
    monkeypatch.setenv("TALKMESH_CACHE", str(tmp_path_factory.getbasetemp() / "talkmesh-cache"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray bound to 127.0.0.1 with 2 CPUs (and 2 ``TRAIN_DRIVER`` slots for Tune trial
    drivers), started once per test session."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            resources={"TRAIN_DRIVER": 2},  # sweeps: trial drivers hold this, not a CPU (notes §3)
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=True,
        )
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny models run fastest on one thread, and a busy 2-CPU machine makes two threads
    spin-wait (10x+ slower); the previous setting is restored afterwards. Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Test files that start Ray (the session's ``ray_cluster`` or a head of their own).
RAY_FILES = frozenset({"test_job_submit.py", "test_service_tenancy.py", "test_serving.py", "test_serving_options.py",
                       "test_sweep.py", "test_train_ray.py"})


# Files that take longest start first (the Makefile passes --no-loadscope-reorder, so xdist
# keeps this order; each worker also takes a second file up front): the Ray group in
# ``make test``; in ``make test-learning`` the two long learning files, then the short ones.
LONG_FIRST = ("ray", "test_dualtalker.py", "test_deeptalk_learning.py", "test_adamesh_learning.py",
              "test_faceformer_learning.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stable reorder of the collected tests by :data:`LONG_FIRST` (other files after them)."""

    def rank(item: pytest.Item) -> int:
        name = "ray" if item.path.name in RAY_FILES else item.path.name
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``-n N --dist loadfile`` (the Makefile's targets) with the Ray files as one file: each
    test file runs on one worker (its module-scoped trainings run once), and all the Ray
    files run on the same worker, so at most one local Ray runs at a time."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileOrRayScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:  # the scope a test belongs to: its file, or "ray"
            path = super()._split_scope(nodeid)
            return "ray" if Path(path).name in RAY_FILES else path

    return FileOrRayScheduling(config, log)
