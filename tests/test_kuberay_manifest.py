"""deployments/kuberay/rft.yaml (not run on Kubernetes here) agrees with itself and with rft: the Ray
version is the image's and the one rft is tested with, every pod sees the shared volume at one
path, the flow runs hold the cluster's token, the worker serves the pool deployments/prefect.yaml
names from the image's project directory, and the README's compute address is the head's service."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deployments" / "kuberay" / "rft.yaml"
DOCKERFILE = ROOT / "deployments" / "kuberay" / "Dockerfile"


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc}


def pods(docs: dict[str, dict]) -> dict[str, dict]:
    """Pod specs by role: the Ray head, each Ray worker group, the Prefect worker."""
    spec = docs["RayCluster"]["spec"]
    found = {"head": spec["headGroupSpec"]["template"]["spec"]}
    found |= {f"group {g['groupName']}": g["template"]["spec"] for g in spec["workerGroupSpecs"]}
    found["prefect worker"] = docs["Deployment"]["spec"]["template"]["spec"]
    return found


def env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def test_the_manifest_holds_the_volume_the_ray_cluster_and_the_worker_in_one_namespace():
    docs = documents()
    assert set(docs) == {"PersistentVolumeClaim", "RayCluster", "Deployment"}
    assert {doc["metadata"]["namespace"] for doc in docs.values()} == {"rft"}
    assert docs["RayCluster"]["apiVersion"] == "ray.io/v1"
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes


def test_ray_is_the_version_of_the_image_and_of_rft_s_tested_floor():
    docs = documents()
    ray_version = docs["RayCluster"]["spec"]["rayVersion"]
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", DOCKERFILE.read_text(), re.M)
    assert base and base.group(1) == ray_version
    assert (base.group(2), base.group(3)) == ("3", "11")  # the Python rft is tested with
    # The `ray` extra of pyproject.toml (tomllib is Python 3.11+; the project runs on 3.10 too).
    extra = re.search(r'^ray = \["ray\[train\]>=([\d.]+),', (ROOT / "pyproject.toml").read_text(), re.M)
    floor = extra.group(1)
    assert Version(ray_version) == Version(floor)
    images = {c["image"] for spec in pods(docs).values() for c in spec["containers"]}
    assert len(images) == 1  # one image: the Ray pods import the same rft the driver runs


def test_every_pod_sees_the_shared_volume_at_one_path():
    docs = documents()
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    for role, spec in pods(docs).items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        shared = [name for name, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
        assert len(shared) == 1, role
        (container,) = spec["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts[shared[0]] == "/srv/rft", role
    assert "/srv/rft/" in (ROOT / "README.md").read_text()  # where the README puts output_dir


def test_the_flow_runs_hold_the_cluster_s_token_and_reach_mlflow():
    docs = documents()
    auth = docs["RayCluster"]["spec"]["authOptions"]
    assert auth["mode"] == "token"
    (worker,) = pods(docs)["prefect worker"]["containers"]
    variables = env(worker)
    assert variables["RAY_AUTH_MODE"]["value"] == "token"
    assert variables["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}
    for role, spec in pods(docs).items():
        if role.startswith("group"):  # rank 0 runs there and logs to MLflow
            assert "MLFLOW_TRACKING_URI" in env(spec["containers"][0]), role
    assert "MLFLOW_TRACKING_URI" in variables and "PREFECT_API_URL" in variables


def test_the_worker_serves_the_deployments_pool_from_the_image_s_project_directory():
    docs = documents()
    (worker,) = pods(docs)["prefect worker"]["containers"]
    command = worker["command"]
    pool = command[command.index("--pool") + 1]
    prefect = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert pool == prefect["definitions"]["work_pools"]["process"]["name"]
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert worker["workingDir"] == workdir
    assert env(worker)["PREFECT_LOGGING_EXTRA_LOGGERS"]["value"] == "rft"  # stage progress in the task logs


def test_the_readme_s_compute_matches_the_cluster():
    docs = documents()
    meta, spec = docs["RayCluster"]["metadata"], docs["RayCluster"]["spec"]
    address = f"{meta['name']}-head-svc.{meta['namespace']}.svc.cluster.local:6379"
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"-p compute='(\{[^']*" + re.escape(address) + r"[^']*\})'", readme)
    assert example, f"no compute parameter naming {address} in the README"
    compute = yaml.safe_load(example.group(1))
    (group,) = spec["workerGroupSpecs"]
    assert compute["machines"] == group["replicas"] == group["minReplicas"]
    assert compute["processes"] == "auto"  # one per GPU of a worker pod
    assert int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # nothing trains on the head
    assert f"# its head's service: {meta['name']}-head-svc" in MANIFEST.read_text()
