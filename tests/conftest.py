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
# The same for the proxy's readiness check at start (5 s by default): a proxy process that took
# 16 s to start on a busy machine failed it 3 times, was killed, and took the session's Serve with it.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

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


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    """Ray Serve's HTTP proxy on a free loopback port, started once per session. Each test
    module deploys its applications (``serve.run``, distinct names) and deletes them when it
    is done (``serve.delete``): restarting Serve for every module raced the old proxy's
    shutdown on a busy machine and left the new proxy dead."""
    from ray import serve

    from talkmesh.dev.localstack import free_ports

    port = free_ports(1)[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


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


# Test files that use the session's ``ray_cluster`` (one worker runs them all, one after the
# other). The files that start clusters of their own (own ports, own temp dirs) form a second
# group that runs on the other worker meanwhile: the Ray group alone takes longer than all the
# other files together, and at most two Rays run at a time.
OWN_CLUSTER_FILES = frozenset({"test_job_submit.py", "test_multinode.py"})
RAY_FILES = frozenset({
    "test_service_failover.py", "test_service_fuzz.py", "test_service_load.py",
    "test_service_observe.py", "test_service_tenancy.py",
    "test_serving.py", "test_serving_options.py", "test_sweep.py", "test_sweep_resume.py", "test_train_ray.py",
    "test_web_page.py",
})


def _group(file_name: str) -> str | None:
    """The scheduling group of a test file ("ray", "own-cluster"), or None (the file alone)."""
    if file_name in RAY_FILES:
        return "ray"
    return "own-cluster" if file_name in OWN_CLUSTER_FILES else None


# Files that take longest start first (the Makefile passes --no-loadscope-reorder, so xdist
# keeps this order; a worker takes its next file once at most 2 of its tests are pending). In
# ``make test-learning`` (idle 2-core figures) DualTalker's reader checks (about 15 min) and
# its ablation (about 12 min) start on the two workers, then DEEPTalk (11 min), the Ray group
# (the sweep tests, 6 min) and the shorter files. In ``make test`` the learning files hold a
# few quick tests or none, so the Ray group and the files with clusters of their own still
# start at once, one on each worker.
LONG_FIRST = ("test_dualtalker.py", "test_dualtalker_ablation.py", "test_deeptalk_learning.py", "ray", "own-cluster",
              "test_mimic_learning.py", "test_adamesh_learning.py", "test_faceformer_learning.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stable reorder of the collected tests by :data:`LONG_FIRST` (other files after them)."""

    def rank(item: pytest.Item) -> int:
        name = _group(item.path.name) or item.path.name
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)
    # A spec ablation not reliably met here (marker "ablation", `make test-ablations`) is a
    # non-strict xfail for a failed assertion only: its figures print, any other error fails.
    for item in items:
        mark = item.get_closest_marker("ablation")
        if mark is not None:
            item.add_marker(pytest.mark.xfail(strict=False, raises=AssertionError, reason=mark.kwargs["reason"]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``-n N --dist loadfile`` (the Makefile's targets) with each group as one file: each
    test file runs on one worker (its module-scoped trainings run once), all the files that
    use the session's Ray run on the same worker (Ray starts once), and so do the files that
    start clusters of their own."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileOrRayScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:  # the scope a test belongs to: its file, or its group
            path = super()._split_scope(nodeid)
            return _group(Path(path).name) or path

    return FileOrRayScheduling(config, log)
