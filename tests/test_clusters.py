"""clusters/: the launcher YAMLs, the KubeRay manifests and the README validate, and schedule the fixed commands.

Fast (no Ray started, no zoo, no Kubernetes API server): the KubeRay objects are checked against the KubeRay
v1.7.0 CRD schemas (tests/data/kuberay/) with unknown keys rejected, the core Kubernetes objects with
kubernetes-validate in strict mode, the launcher YAMLs against Ray's own cluster-config schema.
Each validator is also shown to reject a broken copy, so a pass means something.
"""

from __future__ import annotations

import copy
import json
import os
import re
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from cluster_entrypoints import (
    LEADERBOARD,
    MOUNT,
    STUDY,
    crontab_command,
    entrypoints,
    job_submit_command,
    mapped,
    readme_block,
)
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
CRDS = Path(__file__).resolve().parent / "data" / "kuberay"

#: the Kubernetes version whose schemas kubernetes-validate checks core objects against; every
#: kubernetes-validate release this project allows (>= 1.30) ships it
K8S_VERSION = "1.30.0"
#: KubeRay kind -> its CRD's v1 schema file
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.v1.json",
    "RayJob": "ray.io_rayjobs.v1.json",
    "RayCronJob": "ray.io_raycronjobs.v1.json",
}
KUBERAY_FILES = ["raycluster.yaml", "rayjob-study.yaml", "raycronjob-leaderboard.yaml"]
CORE_FILES = ["pvc.yaml", "cronjob-leaderboard.yaml"]
LAUNCHER_FILES = ["local.yaml", "aws.yaml"]
GPU = "nvidia.com/gpu"


def load(relpath: str) -> dict:
    with open(CLUSTERS / relpath) as f:
        return yaml.safe_load(f)


# ------------------------------------------------------------------------------- KubeRay: CRD schemas


def strict_schema(node):
    """A CRD's OpenAPI v3 schema as a JSON Schema that the `jsonschema` package applies as the API server would,
    and stricter on keys: `x-kubernetes-int-or-string` -> integer or string, `nullable` -> null allowed,
    `x-kubernetes-preserve-unknown-fields` -> any keys, and wherever the schema lists `properties` (without
    preserving unknown fields or saying `additionalProperties`) unknown keys are rejected, where the API server
    would silently prune them — that is how a misspelt key gets caught."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = strict_schema(json.loads((CRDS / CRD_FILES[kind]).read_text()))
    # OpenAPI v3.0 schemas are close to JSON Schema draft 4-7; draft 7's meta-schema checks ~20x faster than 2020-12's
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict) -> list[str]:
    """Every schema violation of a KubeRay object, as `$.path.to.field: message`."""
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return sorted(f"{e.json_path}: {e.message}" for e in errors)


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_object_matches_its_crd(name):
    obj = load(f"kuberay/{name}")
    assert obj["apiVersion"] == "ray.io/v1"
    assert crd_errors(obj) == []


def test_crd_validator_rejects_a_misspelt_key():
    rayjob = load("kuberay/rayjob-study.yaml")
    rayjob["spec"]["shutdownAfterJobFinish"] = rayjob["spec"].pop("shutdownAfterJobFinishes")
    (error,) = crd_errors(rayjob)
    assert error.startswith("$.spec: ") and "'shutdownAfterJobFinish' was unexpected" in error


def test_crd_validator_rejects_a_misspelt_key_deep_in_a_pod_template():
    cluster = load("kuberay/raycluster.yaml")
    mount = cluster["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    mount["mountpath"] = mount.pop("mountPath")
    errors = crd_errors(cluster)
    path = "$.spec.workerGroupSpecs[1].template.spec.containers[0].volumeMounts[0]"
    assert any(e.startswith(path + ": ") and "'mountPath' is a required property" in e for e in errors), errors
    assert any(e.startswith(path + ": ") and "'mountpath' was unexpected" in e for e in errors), errors


def test_crd_validator_rejects_a_wrong_type():
    cronjob = load("kuberay/raycronjob-leaderboard.yaml")
    cronjob["spec"]["jobTemplate"]["backoffLimit"] = "one"
    assert crd_errors(cronjob) == ["$.spec.jobTemplate.backoffLimit: 'one' is not of type 'integer'"]


def test_crd_validator_rejects_a_missing_required_field():
    rayjob = load("kuberay/rayjob-study.yaml")
    del rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert crd_errors(rayjob) == ["$.spec.rayClusterSpec.workerGroupSpecs[0]: 'groupName' is a required property"]


def test_int_or_string_quantities_take_integers_and_strings_only():
    cluster = load("kuberay/raycluster.yaml")
    limits = cluster["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert isinstance(limits[GPU], int) and isinstance(limits["cpu"], str)  # both forms are in the file, and pass
    limits[GPU] = [1]
    (error,) = crd_errors(cluster)
    assert error.startswith("$.spec.workerGroupSpecs[1].template.spec.containers[0].resources.limits['nvidia.com/gpu']")


def test_strict_schema_keeps_open_what_the_crd_leaves_open():
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
                "open": {"type": "object", "properties": {"a": {}}, "x-kubernetes-preserve-unknown-fields": True},
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
                "maybe": {"type": "string", "nullable": True},
            },
        }
    )
    validator = jsonschema.Draft7Validator(schema)
    assert validator.is_valid({"open": {"b": 1}, "map": {"b": "c"}, "maybe": None})
    assert not validator.is_valid({"closed": {"b": "c"}})
    assert not validator.is_valid({"map": {"b": 1}})
    assert not validator.is_valid({"unknown": 1})


# ------------------------------------------------------------------------- core Kubernetes objects


def k8s_validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def pod_templates(obj: dict) -> dict[str, dict]:
    """Every pod template of a KubeRay object or a CronJob, by where it is."""
    if obj["kind"] == "CronJob":
        return {"job": obj["spec"]["jobTemplate"]["spec"]["template"]}
    spec = {
        "RayCluster": lambda s: s,
        "RayJob": lambda s: s["rayClusterSpec"],
        "RayCronJob": lambda s: s["jobTemplate"]["rayClusterSpec"],
    }[obj["kind"]](obj["spec"])
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates |= {group["groupName"]: group["template"] for group in spec["workerGroupSpecs"]}
    return templates


def as_pod_template(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


@pytest.mark.parametrize("name", CORE_FILES)
def test_core_kubernetes_object_validates_strictly(name):
    k8s_validate(load(f"kuberay/{name}"))


@pytest.mark.parametrize("name", KUBERAY_FILES + ["cronjob-leaderboard.yaml"])
def test_pod_templates_validate_strictly(name):
    for where, template in pod_templates(load(f"kuberay/{name}")).items():
        k8s_validate(as_pod_template(template, where))


def test_kubernetes_validate_rejects_unknown_keys_and_wrong_types():
    cronjob = load("kuberay/cronjob-leaderboard.yaml")
    cronjob["spec"]["concurrencyPolicyy"] = cronjob["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError, match="'concurrencyPolicyy' was unexpected"):
        k8s_validate(cronjob)
    pvc = load("kuberay/pvc.yaml")
    pvc["spec"]["accessModes"] = "ReadWriteMany"  # a string, not a list
    with pytest.raises(kubernetes_validate.ValidationError) as raised:
        k8s_validate(pvc)
    assert list(raised.value.absolute_path) == ["spec", "accessModes"]
    template = pod_templates(load("kuberay/raycluster.yaml"))["head"]
    template["spec"]["containers"][0]["volumeMount"] = template["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError, match="'volumeMount' was unexpected"):
        k8s_validate(as_pod_template(template, "head"))


# --------------------------------------------------------------------------------------- launcher YAMLs


@cache
def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def ray_validate(config: dict) -> None:
    """Validate a cluster-launcher config as written, then as `ray up` sees it (Ray's defaults filled in)."""
    jsonschema.validate(config, ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_matches_rays_schema(name):
    ray_validate(load(f"ray/{name}"))


@pytest.mark.parametrize(
    "break_it, path",
    [
        (lambda c: c.update(max_worker=4), []),  # a misspelt top-level key
        (lambda c: c.update(idle_timeout_minutes="ten"), ["idle_timeout_minutes"]),
        (
            lambda c: c["available_node_types"]["worker.gpu"].update(min_workers="0"),
            ["available_node_types", "worker.gpu", "min_workers"],
        ),
        (lambda c: c["provider"].pop("type"), ["provider"]),
    ],
    ids=["unknown-key", "wrong-type", "wrong-type-in-node-type", "missing-required"],
)
def test_rays_schema_rejects_broken_configs(break_it, path):
    config = load("ray/aws.yaml")
    break_it(config)
    with pytest.raises(jsonschema.ValidationError) as raised:
        ray_validate(config)
    assert list(raised.value.absolute_path) == path


def test_launcher_yamls_mount_the_share_install_mergescale_and_start_the_dashboard():
    for name in LAUNCHER_FILES:
        config = load(f"ray/{name}")
        init = " ".join(config["initialization_commands"])
        assert re.search(r"mount .* /mnt/mergescale\b", init), name
        assert any(re.search(r'pip install .*"mergescale\[gpu\]', c) for c in config["setup_commands"]), name
        head = " ".join(config["head_start_ray_commands"])
        assert "ray start --head" in head and "--dashboard-host 0.0.0.0" in head, name
        assert all("MERGESCALE_CACHE=/mnt/mergescale/cache" in c for c in config["head_start_ray_commands"][1:])
    aws = load("ray/aws.yaml")
    gpu = aws["available_node_types"]["worker.gpu"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] < gpu["max_workers"]
    assert aws["available_node_types"][aws["head_node_type"]]["resources"].get("GPU", 0) == 0


# ------------------------------------------------------------------------------- what the manifests say


def volume_of_claim(template: dict, claim: str) -> str | None:
    for volume in template["spec"].get("volumes", []):
        if volume.get("persistentVolumeClaim", {}).get("claimName") == claim:
            return volume["name"]
    return None


def test_every_ray_pod_mounts_the_shared_claim():
    pvc = load("kuberay/pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = pvc["metadata"]["name"]
    seen = []
    for name in KUBERAY_FILES:
        for where, template in pod_templates(load(f"kuberay/{name}")).items():
            volume = volume_of_claim(template, claim)
            assert volume, f"{name} {where}: no volume of the claim {claim}"
            for container in template["spec"]["containers"]:
                mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
                assert mounts.get(volume) == MOUNT, f"{name} {where} {container['name']}: not mounted at {MOUNT}"
            seen.append((name, where))
    assert len(seen) == 3 + 2 + 2  # RayCluster: head, cpu, gpu; RayJob and RayCronJob: head, gpu


def test_gpu_groups_request_gpus_and_tolerate_the_gpu_taint_and_cpu_pods_do_not():
    for name in KUBERAY_FILES:
        templates = pod_templates(load(f"kuberay/{name}"))
        for where, template in templates.items():
            (ray_container,) = template["spec"]["containers"]
            resources = ray_container["resources"]
            if where == "gpu":
                assert resources["limits"][GPU] >= 1 and resources["requests"][GPU] == resources["limits"][GPU]
                assert any(t["key"] == GPU for t in template["spec"].get("tolerations", [])), name
            else:
                assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {})
        assert "gpu" in templates, name
    assert set(pod_templates(load("kuberay/raycluster.yaml"))) == {"head", "cpu", "gpu"}


def test_heads_serve_the_dashboard_and_every_image_and_ray_version_agree():
    images, versions = set(), set()
    for name in KUBERAY_FILES:
        obj = load(f"kuberay/{name}")
        spec = {"RayCluster": obj["spec"], "RayJob": obj["spec"].get("rayClusterSpec")}.get(obj["kind"])
        spec = spec or obj["spec"]["jobTemplate"]["rayClusterSpec"]
        versions.add(spec["rayVersion"])
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0", name
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert {"name": "dashboard", "containerPort": 8265} in head["ports"], name
        for template in pod_templates(obj).values():
            images |= {c["image"] for c in template["spec"]["containers"]}
    cronjob = load("kuberay/cronjob-leaderboard.yaml")
    images |= {c["image"] for c in pod_templates(cronjob)["job"]["spec"]["containers"]}
    assert len(images) == 1, images
    assert versions == {ray.__version__}, f"rayVersion {versions} but the project runs Ray {ray.__version__}"
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert re.search(rf"^ARG BASE=rayproject/ray:{re.escape(ray.__version__)}-py311", dockerfile, re.M)


def test_rayjob_ends_its_cluster_and_is_bounded():
    spec = load("kuberay/rayjob-study.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 1
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["MERGESCALE_CACHE"] == f"{MOUNT}/cache"


def test_raycronjob_runs_its_shell_command_line_on_the_head():
    template = load("kuberay/raycronjob-leaderboard.yaml")["spec"]["jobTemplate"]
    assert template["shutdownAfterJobFinishes"] is True and template["activeDeadlineSeconds"] < 24 * 3600
    # K8sJobMode would paste the entrypoint into the submitter pod's shell line, running `&& publish` there
    assert "&&" in template["entrypoint"] and template["submissionMode"] == "HTTPMode"


def test_cronjob_submits_to_the_rayclusters_head_service_and_never_overlaps():
    cluster_name = load("kuberay/raycluster.yaml")["metadata"]["name"]
    cronjob = load("kuberay/cronjob-leaderboard.yaml")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = pod_templates(cronjob)["job"]["spec"]["containers"]
    words = container["command"] + container.get("args", [])
    assert words[: words.index("--")] == ["ray", "job", "submit", "--address", f"http://{cluster_name}-head-svc:8265"]
    assert "--no-wait" not in words  # it follows the logs, so the pod fails when the Ray job fails


# ------------------------------------------------------------------------------------------ entrypoints


def test_entrypoints_are_the_fixed_commands():
    assert entrypoints() == {
        "clusters/kuberay/rayjob-study.yaml": STUDY,
        "clusters/kuberay/raycronjob-leaderboard.yaml": LEADERBOARD,
        "clusters/kuberay/cronjob-leaderboard.yaml": LEADERBOARD,
        "clusters/README.md crontab": LEADERBOARD,
        "clusters/README.md ray job submit": LEADERBOARD,
    }


def test_entrypoint_parsers_reject_what_they_cannot_read():
    with pytest.raises(ValueError, match="found 0"):
        readme_block("```\nray job submit -- x\n```\n", "ray job submit")
    with pytest.raises(ValueError, match="sh -c"):
        crontab_command("0 2 * * * mergescale leaderboard run /mnt/mergescale/leaderboard\n")
    with pytest.raises(ValueError, match="found 2"):
        crontab_command("0 2 * * * sh -c 'a'\n0 3 * * * sh -c 'b'\n")
    with pytest.raises(ValueError, match="no `--`"):
        job_submit_command("ray job submit --address http://h:8265 mergescale study run x")
    # unquoted, the shell would cut the command at `&&`: the entrypoint then lacks the publish half
    with pytest.raises(ValueError, match="unquoted shell operator '&&'"):
        job_submit_command("ray job submit -- a b && c")
    assert job_submit_command("ray job submit --address http://h:8265 \\\n  -- sh -c 'a b && c'") == "a b && c"
    # `&&` as a word of its own reaches the head quoted (Ray joins the words with shlex.join): no longer equal
    assert job_submit_command("ray job submit -- a b '&&' c") == "a b '&&' c" != "a b && c"


def test_mapped_replaces_the_mount(tmp_path):
    command = mapped(LEADERBOARD, tmp_path)
    assert MOUNT not in command
    assert command == LEADERBOARD.replace("/mnt/mergescale", str(tmp_path))
    with pytest.raises(ValueError, match="quoting"):
        mapped(STUDY, "/tmp/a dir")


# ------------------------------------------------------------------------------------------ every file


def cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTERS.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", cluster_files(), ids=lambda p: os.fspath(p.relative_to(CLUSTERS)))
def test_every_file_parses_and_starts_with_a_comment_block(path):
    lines = path.read_text().splitlines()
    if path.suffix in (".yaml", ".yml"):
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(documents) == 1 and isinstance(documents[0], dict)
        assert all(line.startswith("#") for line in lines[:3]), "starts without a comment block"
    elif path.name == "Dockerfile":
        assert all(line.startswith("#") for line in lines[:3]), "starts without a comment block"
        assert any(line.startswith("FROM ") for line in lines)
    elif path.suffix == ".md":
        assert lines[0] == "<!--" or lines[0].startswith("#")
    else:
        pytest.fail(f"unexpected file {path.relative_to(ROOT)}: add a check for it here")


def test_the_files_are_all_there():
    names = {os.fspath(p.relative_to(CLUSTERS)) for p in cluster_files()}
    assert names >= {
        "README.md",
        "Dockerfile",
        "ray/local.yaml",
        "ray/aws.yaml",
        "kuberay/pvc.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-study.yaml",
        "kuberay/raycronjob-leaderboard.yaml",
        "kuberay/cronjob-leaderboard.yaml",
    }
