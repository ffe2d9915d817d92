"""jobs/kuberay/rayjob.yaml (an example for users on Kubernetes; no cluster here) holds
together: a RayJob whose entry point is one of the project's jobs with a valid command line
and config, whose checkpoints go to the volume every Pod mounts, and whose workers get the
GPUs the command asks for."""

from __future__ import annotations

import shlex
from pathlib import Path

from talkmesh.config import yaml_load
from talkmesh.ops.jobs import find_preset, parse_args
from talkmesh.train.config import load_experiment

REPO = Path(__file__).resolve().parents[1]


def test_the_rayjob_example_runs_a_real_job_on_shared_storage():
    doc = yaml_load((REPO / "jobs" / "kuberay" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    python, script, *argv = shlex.split(doc["spec"]["entrypoint"])
    assert python == "python" and (REPO / script).is_file(), script
    request = parse_args(Path(script).stem, argv)
    exp = load_experiment(find_preset(request.method, request.preset), request.all_overrides(),
                          base={"method": request.method})  # fmt: skip
    cluster = doc["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # every Pod mounts the shared claim where checkpoints and data live
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        assert mounts == {"/shared"} and claims == {"talkmesh-shared"}, pod
    assert exp.train.storage_path.startswith("/shared/") and exp.data.root.startswith("/shared/")
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in cluster["workerGroupSpecs"])  # fmt: skip
    assert exp.train.use_gpu and exp.train.num_workers == gpus
