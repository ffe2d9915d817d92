"""A two-node Ray cluster on this machine, loopback only (``ray.cluster_utils.Cluster``,
notes §8.1): a 2-worker FaceFormer job submitted to the head's dashboard trains with one
worker in each raylet (a custom resource per node forces it), evaluates and registers, with
``train.storage_path`` on storage both nodes see.

The job is submitted without ``--working-dir``: two raylets on one host share a session
directory, and one node's runtime-env agent can delete the other's unpacked package (§8.1).
Separate hosts do not share it; jobs/README.md ("On several nodes") has the recipe.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from talkmesh.dev.localstack import free_ports
from talkmesh.ops import tracking

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SLOT = "trainer_slot"  # one per node: a worker needs one, so the two workers land on different nodes


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second node, one CPU and one ``trainer_slot`` each, both on 127.0.0.1;
    yields (dashboard URL, {node id: "head" | "second"})."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.cluster_utils import Cluster

    from talkmesh.dev.localstack import _refresh_ray_config

    temp = tempfile.mkdtemp(prefix="tm2n-", dir="/tmp")  # short: Ray's socket paths live under it
    # A token of this cluster's own: its nodes, the job driver (which inherits their
    # environment) and this process's job client read it; ~/.ray/auth_token may belong to
    # another cluster of the session, and this process may have cached another stack's token.
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "token")
    mp.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    mp.delenv("RAY_AUTH_TOKEN", raising=False)
    _refresh_ray_config()
    dash_port, gcs_port, *agent_ports = free_ports(8)
    # Each node's agents on ports of their own: the defaults clash with other Rays on this machine.
    keys = ("dashboard_agent_listen_port", "metrics_export_port", "runtime_env_agent_port")
    head_agents = dict(zip(keys, agent_ports[:3], strict=True))
    second_agents = dict(zip(keys, agent_ports[3:], strict=True))
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "resources": {SLOT: 1},
                "node_ip_address": "127.0.0.1",
                "gcs_server_port": gcs_port,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dash_port,
                "temp_dir": temp,
                **head_agents,
            },
        )
        # Cluster writes its address to /tmp/ray/ray_current_cluster (whatever the temp dir), where
        # every process on this machine that looks for "the" local Ray would find it, processes of
        # the session's cluster included: removed. The job supervisor finds the address it hands
        # the driver (RAY_ADDRESS) in <its node's temp dir>/ray_current_cluster, and with no file
        # there it takes any GCS process it finds on the machine; with other clusters running
        # (the other test worker's) that was sometimes another cluster, whose token the driver
        # lacks ("InvalidAuthToken"). So the address goes into this cluster's temp dir.
        from ray._common.utils import reset_ray_address
        from ray._private.utils import write_ray_address

        reset_ray_address()
        write_ray_address(cluster.gcs_address, temp)
        second = cluster.add_node(num_cpus=1, resources={SLOT: 1}, node_ip_address="127.0.0.1", **second_agents)
        cluster.wait_for_nodes()
        names = {cluster.head_node.node_id: "head", second.node_id: "second"}
        yield f"http://127.0.0.1:{dash_port}", names
    finally:
        if cluster is not None:
            cluster.shutdown()
        mp.undo()
        _refresh_ray_config()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_two_worker_job_spans_both_nodes_and_registers(two_nodes, tmp_path):
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    url, names = two_nodes
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "shared-storage"  # what both nodes see (here: the same disk; on hosts: NFS or s3://)
    sid = f"tm-2nodes-{os.getpid()}"
    entry = [sys.executable, str(REPO / "jobs" / "faceformer.py"), "--preset", "small", "--num-workers", "2",
             "train.epochs=2", "train.limit_train_batches=4", "train.limit_eval_sequences=4", "train.preview=false",
             "train.system_metrics=false", "train.torch_threads=1", f"train.worker_resources.{SLOT}=1",
             f"train.storage_path={storage}"]  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": uri, "TALKMESH_CACHE": os.environ["TALKMESH_CACHE"], "HF_HUB_OFFLINE": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip
    client = JobSubmissionClient(url)
    t0 = time.perf_counter()
    deadline = time.monotonic() + 120
    while True:  # the head's job agent comes up a little after the dashboard
        try:
            client.submit_job(entrypoint=" ".join(entry), submission_id=sid, runtime_env={"env_vars": env})
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    deadline = time.monotonic() + 900
    while (status := client.get_job_status(sid)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {sid} still {status} after 900 s"
        time.sleep(0.5)
    job_s = time.perf_counter() - t0
    logs = client.get_job_logs(sid)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    assert "registered talkmesh-faceformer version" in logs

    run_id = tracking.find_run("talkmesh-faceformer", f"faceformer-{sid}", uri=uri)
    assert run_id is not None
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["talkmesh.num_workers"] == "2"
    assert "test/test-A/lve" in run.data.metrics
    # The ranks ran in different raylets: node ids (Ray Train names nodes by IP, the same here).
    nodes = run.data.tags["talkmesh.worker_nodes"].split(",")
    assert len(nodes) == 2 and set(nodes) == set(names), (nodes, names)
    assert tracking.get_alias_version("faceformer", "champion", uri=uri) is not None
    assert sorted(p.name for p in (storage / f"faceformer-{sid}").glob("epoch-*")) == ["epoch-0000", "epoch-0001"]
    print(f"\n2-node job: rank 0 on the {names[nodes[0]]} node, rank 1 on the {names[nodes[1]]} node; {job_s:.1f} s")
