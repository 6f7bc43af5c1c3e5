"""k8s/: what can be checked without a cluster.

Every kustomization under k8s/ is rendered with ``kubectl kustomize`` and every object is validated against
the Kubernetes schemas of a current release (kubernetes-validate, strict: unknown fields fail like
``kubectl apply --validate=strict``) and RayJob/RayCluster against the KubeRay CRDs in ../shared/schemas/kuberay
(their served version's openAPIV3Schema, made strict the way the API server prunes unknown fields). Policy
checks run over every pod the manifests can create; the stage commands are parsed by the real CLI and their
configs resolved; the MLflow server runs with the manifest's command and environment; the training RayJob
is the one the KFP launcher ships.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.k8s.kuberay_rules import validate_rayjob
from tests.k8s.objects import (IMAGE_REPO, K8S, NAMESPACE, REPO, SHARED, all_objects, configmaps,
                               find, kustomizations, pod_templates, render, standalone_documents)

STAGES = ("cache", "train", "evaluate", "pairs", "reflow")
# Each stage-jobs kustomization and the platform kustomization whose ConfigMaps its pods read.
JOBS_PLATFORM = {"jobs": "base", "overlays/cpu/jobs": "overlays/cpu", "overlays/gpu/jobs": "overlays/gpu"}
# What the URIs of earlier stages' outputs look like when a user puts them into loomcfm-inputs.
INPUTS = {"dataset_uri": "s3://loomcfm/loomcfm/datasets/digits-0123456789ab",
          "checkpoint_uri": "s3://loomcfm/loomcfm/runs/digits-0123456789ab/checkpoints/step-00000400.pt",
          "pairs_uri": "s3://loomcfm/loomcfm/datasets/digits-pairs-ba9876543210"}
# RBAC: all the pipeline's launcher may do (loomcfm_core/kube/launcher.py creates, adopts, watches and deletes
# RayJobs; loomcfm_core/kube/logs.py lists the submitter pods and reads their logs).
ALLOWED_RULES = {("ray.io", "rayjobs"): {"create", "get", "list", "watch", "patch", "delete"},
                 ("", "pods"): {"get", "list"},
                 ("", "pods/log"): {"get"}, ("", "events"): {"list"}, ("", "secrets"): {"get"},
                 ("", "configmaps"): {"get"}}
# What `loomcfm cluster check` reads outside the namespace (ClusterRole loomcfm-preflight): read-only, by name
# wherever the verb allows it (list cannot be restricted by name).
PREFLIGHT_RULES = {("apiextensions.k8s.io", "customresourcedefinitions", "get"): {"rayjobs.ray.io", "rayclusters.ray.io"},
                   ("apps", "deployments", "get"): {"kuberay-operator"},
                   ("", "namespaces", "get"): {"loomcfm", "kubeflow"}, ("", "nodes", "list"): set()}
NAMED_ONLY = {("", "secrets"): {"loomcfm-s3", "loomcfm-mlflow"}, ("", "configmaps"): {"loomcfm-env", "loomcfm-config"}}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
CREDENTIAL_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|KEY_ID|PRIVATE_KEY|CREDENTIAL)", re.I)


def test_every_kustomization_renders():
    names = kustomizations()
    assert {"base", "jobs", "overlays/cpu", "overlays/gpu", "overlays/cpu/jobs", "overlays/gpu/jobs"} <= set(names)
    assert set(JOBS_PLATFORM) == {n for n in names if n.endswith("jobs")}, \
        "a new stage-jobs kustomization needs its platform in JOBS_PLATFORM"
    for name in names:
        objs = render(name)
        assert objs, f"k8s/{name} renders nothing"
        for obj in objs:
            assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
            if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):  # cluster-scoped
                assert obj["metadata"].get("namespace") == NAMESPACE, f"k8s/{name}: {obj['kind']} " \
                    f"{obj['metadata']['name']} is not in namespace {NAMESPACE}"


# ---- schemas ------------------------------------------------------------------------------------------------

def shared_dir() -> Path:
    if not (SHARED / "schemas" / "kuberay").is_dir():
        pytest.fail(f"the KubeRay CRD schemas are missing: expected {SHARED}/schemas/kuberay/ (the repository at "
                    f"<X>/main needs the shared folder beside it at <X>/shared)")
    return SHARED


def _strict(schema):
    """Unknown fields fail: the API server prunes them from a structural schema and `kubectl apply` rejects
    them with strict field validation, so a typo in a manifest must not pass here."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Validator:
    path = shared_dir() / "schemas" / "kuberay" / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.safe_load(path.read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind, path
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert version["served"] and version["storage"], f"{path}: ray.io/v1 is not the served storage version"
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def k8s_errors(obj: dict) -> list[str]:
    """Errors against the built-in schemas of the newest release kubernetes-validate ships, strict."""
    try:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def crd_errors(obj: dict) -> list[str]:
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_objects_match_kubernetes_schemas():
    checked = set()
    for where, obj in all_objects():
        if obj["apiVersion"].startswith("ray.io/"):
            continue
        errors = k8s_errors(obj)
        assert not errors, f"{where}: {obj['kind']} {obj['metadata']['name']}: {errors}"
        checked.add(obj["kind"])
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service",
            "PersistentVolumeClaim", "Job", "StatefulSet", "NetworkPolicy"} <= checked


def test_ray_objects_match_kuberay_crds():
    ray_jobs = 0
    for where, obj in all_objects():
        if not obj["apiVersion"].startswith("ray.io/"):
            continue
        assert obj["apiVersion"] == "ray.io/v1" and obj["kind"] in ("RayJob", "RayCluster"), (where, obj["kind"])
        errors = crd_errors(obj)
        assert not errors, f"{where}: {obj['kind']} {obj['metadata']['name']}: {errors}"
        # The CRD embeds the pod template schema of its own release; check the pods against the current one too.
        for part, template in pod_templates(obj):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}
            errors = k8s_errors(wrapped)
            assert not errors, f"{where}: {obj['metadata']['name']} {part}: {errors}"
        ray_jobs += obj["kind"] == "RayJob"
    assert ray_jobs >= 6  # train and reflow in jobs/, both overlays and the standalone files


def test_validators_reject_what_a_cluster_would():
    job = copy.deepcopy(find(render("jobs"), "RayJob", "loomcfm-train")[0])
    assert not crd_errors(job)
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(typo))
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "one"
    assert crd_errors(wrong_type)
    deployment = copy.deepcopy(find(render("base"), "Deployment", "mlflow")[0])
    assert not k8s_errors(deployment)
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert k8s_errors(deployment)


# ---- policy -------------------------------------------------------------------------------------------------

def parse_quantity(value) -> float:
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and (match.group(2) in units or not match.group(2)), f"not a quantity: {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def image_problems(image: str) -> list[str]:
    name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
    if not name or "/" in tag:
        return [f"image {image} has no tag"]
    if tag == "latest":
        return [f"image {image} uses :latest"]
    return []


def pod_violations(template: dict) -> list[str]:
    """What the "restricted" Pod Security Standard and this project's rules forbid, for one pod template."""
    spec, out = template["spec"], []
    pod_sc = spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            out.append(f"{flag} is set")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']} of type {kinds - RESTRICTED_VOLUMES}")
    if spec.get("automountServiceAccountToken") is not False:
        out.append("the service account token is mounted (automountServiceAccountToken is not false)")
    if pod_sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        out.append("no RuntimeDefault seccomp profile")
    for container in spec.get("initContainers", []) + spec["containers"]:
        name, sc = container["name"], container.get("securityContext", {})
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f"{name}: runs as uid 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            out.append(f"{name}: capabilities are not all dropped")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities")
        resources = container.get("resources", {})
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(section, {}):
                    out.append(f"{name}: no {resource} {section[:-1]}")
        for resource, request in resources.get("requests", {}).items():
            limit = resources.get("limits", {}).get(resource)
            if limit is not None and parse_quantity(request) > parse_quantity(limit):
                out.append(f"{name}: {resource} request {request} above its limit {limit}")
        gpus = {k: v for k, v in resources.get("requests", {}).items() if k == "nvidia.com/gpu"}
        if gpus and resources.get("limits", {}).get("nvidia.com/gpu") != gpus["nvidia.com/gpu"]:
            out.append(f"{name}: nvidia.com/gpu request without the same limit")
        out += [f"{name}: {p}" for p in image_problems(container.get("image", ""))]
        for env in container.get("env", []):
            if CREDENTIAL_NAME.search(env["name"]) and "value" in env:
                out.append(f"{name}: credential {env['name']} is a literal value, not a secretKeyRef")
    return out


def every_pod() -> list[tuple[str, dict]]:
    return [(f"{where}: {obj['kind']} {obj['metadata']['name']} {part}", template)
            for where, obj in all_objects() for part, template in pod_templates(obj)]


def test_every_pod_is_restricted_and_sized():
    pods = every_pod()
    assert len(pods) >= 30
    problems = [f"{where}: {p}" for where, template in pods for p in pod_violations(template)]
    assert not problems, "\n".join(problems)


def test_policy_catches_violations():
    good = copy.deepcopy(find(render("jobs"), "Job", "loomcfm-cache")[0]["spec"]["template"])
    assert pod_violations(good) == []
    bad = copy.deepcopy(good)
    container = bad["spec"]["containers"][0]
    del container["securityContext"]["allowPrivilegeEscalation"]
    container["image"] = f"{IMAGE_REPO}:latest"
    del container["resources"]["limits"]
    bad["spec"]["securityContext"]["runAsNonRoot"] = False
    container["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x" * 40})
    bad["spec"]["volumes"] = [{"name": "host", "hostPath": {"path": "/"}}]
    found = "\n".join(pod_violations(bad))
    for expected in ("allowPrivilegeEscalation", ":latest", "no cpu limit", "no memory limit", "runAsNonRoot",
                     "credential AWS_SECRET_ACCESS_KEY", "hostPath"):
        assert expected in found, (expected, found)


def repository_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (everything a commit could carry)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        return [REPO / p for p in out.split("\0") if p and (REPO / p).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file outside tool folders
        skip = {".git", ".venv", "loomcfm-data", "loomcfm-runs", "__pycache__", ".pytest_cache", ".hypothesis"}
        return [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)
                and not any(part.endswith(".egg-info") for part in p.relative_to(REPO).parts)]


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\b(ghp|gho|ghs|ghu)_[A-Za-z0-9]{36}\b|\bgithub_pat_[A-Za-z0-9_]{40,}"),
    "Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "secret assigned a literal": re.compile(
        r"(?i)\b(aws_secret_access_key|secret_key|secretkey|password|passwd|api_key|apikey)\b[\"']?\s*[:=]\s*"
        r"[\"']?(?![<$({])(?P<value>[A-Za-z0-9/+=_\-]{16,})"),
}


def looks_secret(match: re.Match) -> bool:
    """A literal that looks like key material: mixed classes of characters, not a NAME_LIKE_THIS reference
    (`secretKey: AWS_SECRET_ACCESS_KEY` names a key, it holds none)."""
    value = match.groupdict().get("value")
    if value is None:
        return True
    classes = [any(c.islower() for c in value), any(c.isupper() for c in value), any(c.isdigit() for c in value),
               any(c in "/+=" for c in value)]
    return sum(classes) >= 3


def test_no_literal_credentials_anywhere():
    problems = []
    files = repository_files()
    assert any(p.name == "Dockerfile" for p in files) and len(files) > 20
    for path in files:
        if path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for what, pattern in SECRET_PATTERNS.items():
            for match in filter(looks_secret, pattern.finditer(text)):
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not problems, "\n".join(problems)
    # The manifests carry no Secret, and the one example file holds placeholders only and is applied by nothing.
    for where, obj in all_objects():
        assert obj["kind"] != "Secret", f"{where}: a Secret is committed in a manifest"
    examples = {"s3-credentials.example.yaml": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                "mlflow-credentials.example.yaml": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                                    "MLFLOW_FLASK_SERVER_SECRET_KEY"},
                "postgres-credentials.example.yaml": {"POSTGRES_PASSWORD"}}
    assert {p.name for p in K8S.rglob("*.example.yaml")} == set(examples)
    for filename, keys in examples.items():
        example = K8S / "base" / filename
        secret = yaml.safe_load(example.read_text())
        assert secret["kind"] == "Secret" and set(secret["stringData"]) == keys, filename
        assert all(re.fullmatch(r"<[a-z-]+>", v) for v in secret["stringData"].values()), secret["stringData"]
        for path in K8S.rglob("kustomization.yaml"):
            kustomization = yaml.safe_load(path.read_text())
            listed = [str(e) for key in ("resources", "components", "patches", "patchesStrategicMerge")
                      for e in kustomization.get(key, [])]
            assert not any(example.name in e for e in listed), f"{path} applies the example Secret"


def test_secret_scan_catches_credentials():
    samples = {"AWS access key id": "key = AKIA" + "ABCDEFGHIJKLMNOP",
               "private key": "-----BEGIN RSA " + "PRIVATE KEY-----",
               "secret assigned a literal": "AWS_SECRET_ACCESS_KEY" + ': "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"'}
    for what, sample in samples.items():
        assert looks_secret(SECRET_PATTERNS[what].search(sample)), what
    literal = SECRET_PATTERNS["secret assigned a literal"]
    assert not literal.search('AWS_SECRET_ACCESS_KEY: "<your-secret-access-key>"')
    assert not looks_secret(literal.search("secretKey: AWS_SECRET_ACCESS_KEY"))


def test_rbac_is_least_privilege():
    for name in kustomizations():
        objs = render(name)
        for cluster_role in find(objs, "ClusterRole"):
            granted_by_name = {(g, r, v): set(rule.get("resourceNames", [])) for rule in cluster_role["rules"]
                               for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
            assert cluster_role["metadata"]["name"] == "loomcfm-preflight" and granted_by_name == PREFLIGHT_RULES, \
                f"k8s/{name}: cluster-wide RBAC beyond the preflight's reads: {granted_by_name}"
        for binding in find(objs, "ClusterRoleBinding"):
            assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                          "name": "loomcfm-preflight"}, binding
        for role in find(objs, "Role"):
            granted: dict[tuple[str, str], set[str]] = {}
            for rule in role["rules"]:
                assert not rule.get("nonResourceURLs"), role
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        assert "*" not in (group, resource) and "*" not in rule["verbs"], f"k8s/{name}: wildcard"
                        granted.setdefault((group, resource), set()).update(rule["verbs"])
                        if (group, resource) in NAMED_ONLY:
                            assert set(rule.get("resourceNames", [])) == NAMED_ONLY[(group, resource)], rule
            assert granted == ALLOWED_RULES, f"k8s/{name}: Role {role['metadata']['name']} grants {granted}"
        roles = {r["metadata"]["name"] for r in find(objs, "Role")}
        for binding in find(objs, "RoleBinding"):
            assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] in roles, binding
            for subject in binding["subjects"]:
                assert subject["kind"] == "ServiceAccount", f"k8s/{name}: binds a {subject['kind']}"
                assert subject["name"] != "loomcfm-workload", "the workload identity must have no API access"
        for account in find(objs, "ServiceAccount", "loomcfm-workload"):
            assert account.get("automountServiceAccountToken") is False
    assert find(render("base"), "RoleBinding"), "the pipeline's RoleBinding is missing"
    for where, obj in all_objects():
        for part, template in pod_templates(obj):
            assert template["spec"].get("serviceAccountName") == "loomcfm-workload", \
                f"{where}: {obj['metadata']['name']} {part} runs as another service account"


def test_mlflow_is_cluster_internal():
    for where, obj in all_objects():
        assert obj["kind"] not in ("Ingress", "Route", "HTTPRoute", "Gateway", "IngressRoute"), f"{where}: {obj['kind']}"
        if obj["kind"] == "Service":
            spec = obj["spec"]
            assert spec.get("type", "ClusterIP") == "ClusterIP", f"{where}: Service {obj['metadata']['name']} " \
                f"is exposed outside the cluster ({spec['type']})"
            assert not spec.get("externalIPs") and not any("nodePort" in p for p in spec["ports"]), where
    for name in ("base", "overlays/cpu", "overlays/gpu"):
        objs = render(name)
        (service,), (deployment,) = find(objs, "Service", "mlflow"), find(objs, "Deployment", "mlflow")
        cfg = resolved_platform_config(objs)
        assert cfg.tracking.uri == f"http://mlflow.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--backend-store-uri=postgresql+psycopg2://mlflow@postgres.{NAMESPACE}.svc:5432/mlflow" in args
        assert "--serve-artifacts" in args and "--app-name=basic-auth" in args


def test_platform_overlays_start_no_stage():
    """`kubectl apply -k k8s/overlays/<x>` sets the platform up; stages are applied one at a time."""
    for name in ("base", "overlays/cpu", "overlays/gpu"):
        stages = [o for o in render(name) if o["kind"] in ("Job", "RayJob")
                  and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") in STAGES]
        assert not stages, f"k8s/{name} would start {[o['metadata']['name'] for o in stages]}"


def test_each_stage_label_selects_one_object():
    for name in JOBS_PLATFORM:
        objs = render(name)
        for stage in STAGES:
            picked = [o for o in objs if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == stage]
            assert len(picked) == 1, f"k8s/{name} -l app.kubernetes.io/component={stage} selects {len(picked)}"
            assert picked[0]["kind"] == ("RayJob" if stage in ("train", "reflow") else "Job")


# ---- configs and stage commands -----------------------------------------------------------------------------

def resolved_platform_config(objs, overrides: list[str] | None = None):
    from loomcfm_core.config import load_config_text

    return load_config_text(configmaps(objs)["loomcfm-config"]["config.yaml"], overrides or [])


class MissingInput(Exception):
    pass


def container_env(container: dict, maps: dict[str, dict]) -> dict[str, str]:
    """The environment the kubelet would give the container (secrets as stand-ins)."""
    env = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref, f"envFrom other than a ConfigMap: {source}"
        if ref["name"] not in maps:
            raise MissingInput(f"ConfigMap {ref['name']}")
        env.update(maps[ref["name"]])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        source = entry["valueFrom"]
        if "secretKeyRef" in source:
            env[entry["name"]] = f"<{source['secretKeyRef']['name']}/{source['secretKeyRef']['key']}>"
            continue
        ref = source["configMapKeyRef"]
        value = maps.get(ref["name"], {}).get(ref["key"])
        if value is None:
            if not ref.get("optional"):
                raise MissingInput(f"ConfigMap {ref['name']} key {ref['key']}")
            continue
        env[entry["name"]] = value
    return env


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """$(VAR) references in command and args, as the kubelet expands them (unknown ones stay as written)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def shell_argv(entrypoint: str, env: dict[str, str]) -> list[str]:
    """The words bash makes of a RayJob entrypoint (KubeRay's submitter runs it through bash)."""
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    proc = subprocess.run(["bash", "-c", f"set -- {entrypoint}; printf '%s\\0' \"$@\""], env={**clean, **env},
                          capture_output=True, text=True, timeout=10)
    if proc.returncode:
        raise MissingInput(proc.stderr.strip())
    return proc.stdout.split("\0")[:-1]


def cli_run(argv: list[str], env: dict[str, str], monkeypatch):
    """Parse a `loomcfm ...` command with the real CLI and resolve its config as the container would."""
    from loomcfm_core.cli import build_parser, resolve_config

    assert argv[0] == "loomcfm", argv
    args = build_parser().parse_args(argv[1:])
    monkeypatch.setenv("LOOMCFM_CONFIG_YAML", env["LOOMCFM_CONFIG_YAML"])
    return args, resolve_config(args.config, args.overrides)


def head_and_workers(job: dict):
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    return head, cluster["workerGroupSpecs"]


@pytest.mark.parametrize("name", sorted(JOBS_PLATFORM))
def test_stage_jobs_run_the_cli_with_the_configmap_config(name, monkeypatch):
    platform = render(JOBS_PLATFORM[name])
    maps = {**configmaps(platform), "loomcfm-inputs": INPUTS}
    base_cfg = resolved_platform_config(platform)
    for job in find(render(name), "Job"):
        stage = job["metadata"]["labels"]["app.kubernetes.io/component"]
        container = job["spec"]["template"]["spec"]["containers"][0]
        env = container_env(container, maps)
        assert env["LOOMCFM_CONFIG_YAML"] == maps["loomcfm-config"]["config.yaml"]
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(env)
        argv = [kubelet_expand(a, env) for a in container["command"] + container.get("args", [])]
        assert not any("$(" in a for a in argv), argv
        args, cfg = cli_run(argv, env, monkeypatch)
        assert args.command == stage
        assert cfg == base_cfg, f"k8s/{name}: the {stage} Job changes the config"
        if stage in ("evaluate", "pairs"):
            assert args.ckpt == INPUTS["checkpoint_uri"]
        if stage == "evaluate":
            assert args.dataset == INPUTS["dataset_uri"]
        if stage in ("evaluate", "pairs"):
            with pytest.raises(MissingInput, match="loomcfm-inputs"):
                container_env(container, configmaps(platform))


@pytest.mark.parametrize("name", sorted(JOBS_PLATFORM))
def test_rayjobs_train_on_their_own_cluster(name, monkeypatch):
    from loomcfm_core.reflow import reflow_config

    platform = render(JOBS_PLATFORM[name])
    maps = {**configmaps(platform), "loomcfm-inputs": INPUTS}
    base_cfg = resolved_platform_config(platform)
    assert base_cfg.storage.root.startswith("s3://"), "checkpoints must outlive the pods for a retry to resume"
    jobs = {j["metadata"]["labels"]["app.kubernetes.io/component"]: j for j in find(render(name), "RayJob")}
    assert set(jobs) == {"train", "reflow"}
    for stage, job in jobs.items():
        spec = job["spec"]
        assert validate_rayjob(job) is None, f"k8s/{name}: KubeRay would not run {stage}: {validate_rayjob(job)}"
        assert "--set ray." not in spec["entrypoint"], "ray.* come from the config (one place with the worker group)"
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 1 and spec["submissionMode"] == "K8sJobMode"
        head, groups = head_and_workers(job)
        assert head["name"] == "ray-head"
        assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
        head_env = container_env(head, maps)
        assert head_env["LOOMCFM_CONFIG_YAML"] == maps["loomcfm-config"]["config.yaml"]
        for group in groups:
            worker = group["template"]["spec"]["containers"][0]
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(container_env(worker, maps))
            assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
        submitter_env = container_env(spec["submitterPodTemplate"]["spec"]["containers"][0], maps)
        argv = shell_argv(spec["entrypoint"], submitter_env)
        assert argv[:2] == ["loomcfm", "train"]
        args, cfg = cli_run(argv, head_env, monkeypatch)
        assert args.wait, "a retry (a new cluster) waits for the failed attempt's lease on the run folder"
        # The driver joins this cluster and asks for exactly the worker group's resources.
        limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups]
        assert cfg.ray.address == "auto"
        assert cfg.ray.num_workers == sum(g["replicas"] for g in groups)
        gpus = [int(lim.get("nvidia.com/gpu", 0)) for lim in limits]
        assert cfg.ray.use_gpu == all(gpus) and (all(gpus) or not any(gpus)), (cfg.ray, limits)
        assert all(cfg.ray.cpus_per_worker <= parse_quantity(lim["cpu"]) for lim in limits), (cfg.ray, limits)
        if any(gpus):
            template = groups[0]["template"]["spec"]
            assert any(t.get("key") == "nvidia.com/gpu" for t in template.get("tolerations", []))
            assert template.get("nodeSelector"), "GPU workers need a node selector"
        trained = cfg.model_dump(exclude={"ray"})
        if stage == "train":
            assert args.dataset == INPUTS["dataset_uri"]
            assert trained == base_cfg.model_dump(exclude={"ray"}), "the train entrypoint changes training settings"
        else:
            assert args.dataset == INPUTS["pairs_uri"]
            expected = reflow_config(base_cfg, INPUTS["pairs_uri"], INPUTS["checkpoint_uri"])
            assert trained == expected.model_dump(exclude={"ray"}), \
                f"k8s/{name}: the reflow entrypoint does not match reflow_config of the overlay's config"
            inputs_without_pairs = {**maps, "loomcfm-inputs": {"checkpoint_uri": INPUTS["checkpoint_uri"]}}
            env = container_env(spec["submitterPodTemplate"]["spec"]["containers"][0], inputs_without_pairs)
            with pytest.raises(MissingInput, match="set pairs_uri in the ConfigMap loomcfm-inputs"):
                shell_argv(spec["entrypoint"], env)
    # Without loomcfm-inputs the train job still runs: it caches (or finds) the dataset itself.
    submitter = jobs["train"]["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    argv = shell_argv(jobs["train"]["spec"]["entrypoint"], container_env(submitter, configmaps(platform)))
    args, _ = cli_run(argv, container_env(head_and_workers(jobs["train"])[0], maps), monkeypatch)
    assert not args.dataset


def test_platform_configs_resolve():
    for name in ("base", "overlays/cpu", "overlays/gpu"):
        objs = render(name)
        cfg = resolved_platform_config(objs)
        assert cfg.storage.root.startswith("s3://") and cfg.tracking.uri
        env = configmaps(objs)["loomcfm-env"]
        assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
        buckets = {cfg.storage.root.split("/")[2], env["MLFLOW_ARTIFACTS_DESTINATION"].split("/")[2]}
        for job in find(objs, "Job", "s3-buckets"):  # the S3 server must get every bucket the config uses
            assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://s3.loomcfm.svc:9000"
            assert buckets <= set(job["spec"]["template"]["spec"]["containers"][0]["args"][1:])
    assert resolved_platform_config(render("overlays/cpu")).name == "digits"
    assert resolved_platform_config(render("overlays/gpu")).name == "cifar10"


def test_train_rayjob_has_one_source():
    """kubectl and the KFP launcher run the same training RayJob: the k8s/ file is a byte copy of the template
    the package ships (kustomize reads nothing outside k8s/, so it cannot point at the package's file)."""
    from loomcfm_core.kube import rayjob as kube

    packaged = REPO / "loomcfm_core" / "templates" / kube.TEMPLATE
    assert (K8S / "jobs" / "train-rayjob.yaml").read_bytes() == packaged.read_bytes(), \
        "k8s/jobs/train-rayjob.yaml differs from loomcfm_core/templates/train-rayjob.yaml, its source: edit the " \
        "packaged file and `cp loomcfm_core/templates/train-rayjob.yaml k8s/jobs/`"
    assert kube.load_template() == standalone_documents()["jobs/train-rayjob.yaml"][0]
    rendered = find(render("jobs"), "RayJob", "loomcfm-train")[0]
    assert rendered == kube.load_template(), "the jobs kustomization applies the template unchanged"


def test_train_template_is_what_the_kfp_launcher_expects():
    from loomcfm_core.config import load_config_text
    from loomcfm_core.kube.rayjob import RunIdentity, build_rayjob, cluster_config, load_template

    docs = standalone_documents()["jobs/train-rayjob.yaml"]
    assert len(docs) == 1 and docs[0]["kind"] == "RayJob", "the KFP launcher loads one plain RayJob document"
    job = docs[0]
    assert not crd_errors(job) and validate_rayjob(job) is None
    assert job["spec"]["entrypoint"].startswith("loomcfm train") and "ray." not in job["spec"]["entrypoint"]
    head, groups = head_and_workers(job)
    assert head["name"] == "ray-head" and len(groups) == 1
    assert any(e["name"] == "LOOMCFM_CONFIG_YAML" for e in head["env"])
    cfg = load_config_text("extends: digits\nstorage: {root: s3://loomcfm/loomcfm}\n")
    for keep in ("false", "true"):
        run_cfg = load_config_text(cfg.to_yaml(), [f"kube.keep_cluster={keep}"])
        built = build_rayjob(load_template(), run_cfg, RunIdentity("s3://loomcfm/loomcfm/runs/digits-0a1b2c3d"),
                             ["--dataset", INPUTS["dataset_uri"]])
        errors = crd_errors(built)
        assert not errors, errors
        assert validate_rayjob(built) is None
        head, _ = head_and_workers(built)
        assert [e["value"] for e in head["env"] if e["name"] == "LOOMCFM_CONFIG_YAML"] == \
            [cluster_config(run_cfg).to_yaml()]


# ---- the S3 bucket Job as the manifests start it (the MLflow server: test_platform_services.py) --------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_bucket_job(objs, endpoint: str) -> subprocess.CompletedProcess:
    container = find(objs, "Job", "s3-buckets")[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][0] == "python"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
           "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    return subprocess.run([sys.executable, *container["command"][1:], *container["args"]], env=env,
                          capture_output=True, text=True, timeout=60)


def test_s3_bucket_job_creates_the_buckets(moto_server):
    import boto3

    objs = render("overlays/cpu")
    for _ in range(2):  # rerunning it is harmless
        proc = _run_bucket_job(objs, moto_server)
        assert proc.returncode == 0, proc.stderr
    s3 = boto3.client("s3", endpoint_url=moto_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    assert "loomcfm" in {b["Name"] for b in s3.list_buckets()["Buckets"]}
