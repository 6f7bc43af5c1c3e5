"""The platform's services as k8s/ deploys them: MLflow with basic authentication on PostgreSQL, the S3 server,
who may reach them (NetworkPolicy), and the credentials every workload pod gets.

The MLflow test runs the Deployment's own command, environment and basic-auth ConfigMap against a real
PostgreSQL 16 (pgserver's build, started in a temporary folder) initialised as the StatefulSet's image would
be (its user and database, then the ConfigMap's first-start script), and a real moto S3 server for artifacts.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

from tests.conftest import _stop_group, free_port, wait_for_health
from tests.k8s.objects import K8S, NAMESPACE, configmaps, find, pod_templates, render
from tests.k8s.test_manifests import _run_bucket_job, container_env, kubelet_expand, resolved_platform_config

PLATFORMS = ("base", "overlays/cpu", "overlays/gpu")
KFP_NAMESPACE = "kubeflow"
SERVICES = {"mlflow": 5000, "s3": 9000, "postgres": 5432}
THIRD_PARTY = {"s3": "docker.io/chrislusf/seaweedfs", "postgres": "docker.io/library/postgres"}


# ---- NetworkPolicy --------------------------------------------------------------------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions with In/NotIn/Exists/DoesNotExist) against labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and present and labels[key] in values) \
                or (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def admitted(policies: list[dict], target: dict, source_namespace: str, source_labels: dict, port: int) -> bool:
    """Kubernetes NetworkPolicy semantics (networking.k8s.io/v1, ingress): a pod no policy selects admits
    everything; otherwise a connection needs one rule of one selecting policy whose peers and ports match.
    A peer with only namespaceSelector matches every pod of those namespaces, with only podSelector the
    policy's own namespace, with both their intersection; namespaces carry kubernetes.io/metadata.name."""
    labels = target["metadata"]["labels"]
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    namespace_labels = {"kubernetes.io/metadata.name": source_namespace}
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            for peer in rule.get("from", [{}]) or [{}]:
                in_namespace = (_selects(peer["namespaceSelector"], namespace_labels) if "namespaceSelector" in peer
                                else source_namespace == policy["metadata"]["namespace"])
                if in_namespace and _selects(peer.get("podSelector", {}), source_labels):
                    return True
    return False


@pytest.mark.parametrize("name", PLATFORMS)
def test_network_policy_admits_only_loomcfm_and_kfp(name):
    objs = render(name)
    policies = find(objs, "NetworkPolicy")
    workload = {"app.kubernetes.io/name": "loomcfm", "app.kubernetes.io/component": "train"}
    mlflow_pod = {"app.kubernetes.io/name": "mlflow"}
    targets = {o["metadata"]["name"]: o["spec"]["template"] for o in objs
               if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] in SERVICES}
    assert {"mlflow", "postgres"} <= set(targets) and ("s3" in targets) == (name == "overlays/cpu")
    for service, template in targets.items():
        port = SERVICES[service]
        assert not admitted(policies, template, "default", workload, port), (name, service)
        assert not admitted(policies, template, "team-b", mlflow_pod, port), (name, service)
        if service == "postgres":
            assert admitted(policies, template, NAMESPACE, mlflow_pod, port)
            assert not admitted(policies, template, NAMESPACE, workload, port), "only MLflow talks to PostgreSQL"
            assert not admitted(policies, template, KFP_NAMESPACE, workload, port)
        else:
            assert admitted(policies, template, NAMESPACE, workload, port), (name, service)
            assert admitted(policies, template, KFP_NAMESPACE, {"pipelines.kubeflow.org/v2_component": "true"}, port)
            assert not admitted(policies, template, NAMESPACE, workload, 22), "only the service's port"
    # the evaluator is not permissive by construction: without policies everything is admitted
    assert admitted([], targets["postgres"], "default", workload, 5432)


# ---- credentials, images, the cluster preset ------------------------------------------------------------------

def _workload_containers():
    """(where, container) of every stage Job and RayJob pod that runs loomcfm (reads loomcfm-env)."""
    from tests.k8s.objects import all_objects

    for where, obj in all_objects():
        if obj["kind"] not in ("Job", "RayJob") or obj["metadata"]["name"] == "s3-buckets":
            continue
        for part, template in pod_templates(obj):
            for container in template["spec"]["containers"]:
                if any(s.get("configMapRef", {}).get("name") == "loomcfm-env" for s in container.get("envFrom", [])):
                    yield f"{where} {obj['metadata']['name']} {part}", container


def test_mlflow_credentials_reach_every_job_and_rayjob_pod():
    seen = 0
    for where, container in _workload_containers():
        refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container.get("env", [])}
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert refs.get(key) == {"name": "loomcfm-mlflow", "key": key}, f"{where}: {key}"
        seen += 1
    assert seen >= 20  # cache/evaluate/pairs Jobs, RayJob heads and workers, in jobs/, both overlays, the files


def test_third_party_images_are_pinned_and_documented():
    readme = (K8S / "README.md").read_text()
    found = set()
    for name in PLATFORMS:
        for obj in render(name):
            for _, template in pod_templates(obj):
                for container in template["spec"]["containers"]:
                    if container["name"] not in THIRD_PARTY:
                        continue
                    image = container["image"]
                    repo, _, tag = image.split("@")[0].rpartition(":")
                    assert repo == THIRD_PARTY[container["name"]], image
                    assert re.fullmatch(r"[0-9]+(\.[0-9]+)+(-[a-z0-9]+)?", tag), f"{image}: not an exact version"
                    if "@" in image:
                        assert re.fullmatch(r"sha256:[0-9a-f]{64}", image.split("@")[1]), image
                    found.add(image)
    assert len(found) == 2, found
    for image in found:
        assert image.split("@")[0] in readme, f"k8s/README.md does not say where {image} comes from"
    assert "CVE-2025-62506" in readme and "digest" in readme


def test_postgres_statefulset_serves_the_mlflow_uri():
    objs = render("base")
    (statefulset,) = find(objs, "StatefulSet", "postgres")
    (service,) = find(objs, "Service", "postgres")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "loomcfm-postgres", "key": "POSTGRES_PASSWORD"}
    data = next(m for m in container["volumeMounts"] if m["name"] == "data")["mountPath"]
    assert env["PGDATA"]["value"].startswith(data + "/"), "initdb needs a folder below the volume root"
    assert [t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]] == ["data"]
    assert pod["securityContext"]["runAsUser"] == 999, "the Debian image's postgres user"
    assert service["spec"]["ports"][0]["port"] == 5432 and statefulset["spec"]["serviceName"] == "postgres"
    (mlflow,) = find(objs, "Deployment", "mlflow")
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    user, database = env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]
    assert f"--backend-store-uri=postgresql+psycopg2://{user}@postgres.{NAMESPACE}.svc:5432/{database}" in args
    ini = configmaps(objs)["mlflow-auth"]["basic_auth.ini"]
    auth_db = re.search(r"database_uri = postgresql\+psycopg2://mlflow@postgres\.loomcfm\.svc:5432/(\w+)", ini)
    assert auth_db and f"CREATE DATABASE {auth_db.group(1)} OWNER {user};" in \
        configmaps(objs)["postgres-initdb"]["mlflow-auth.sql"]


@pytest.mark.parametrize("name", PLATFORMS)
def test_cluster_preset_finds_the_platform(name, monkeypatch):
    """The KFP packages' default config, given this platform's loomcfm-env, stores and tracks where the
    platform's own config does."""
    from loomcfm_core.config import load_config_text

    objs = render(name)
    for key, value in configmaps(objs)["loomcfm-env"].items():
        monkeypatch.setenv(key, value)
    cluster, platform = load_config_text("cluster"), resolved_platform_config(objs)
    assert (cluster.storage.root, cluster.tracking.uri) == (platform.storage.root, platform.tracking.uri)


# ---- the MLflow server as deployed: basic-auth on PostgreSQL ----------------------------------------------------

@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A real PostgreSQL server from pgserver (as root it runs the server as a user ``pgserver`` it creates;
    it listens on a Unix socket only). Trust authentication: passwords are not checked by this server."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()


def _local_postgres(text: str, socket_dir: str) -> str:
    """The in-cluster PostgreSQL URI of a manifest pointed at the test server's socket."""
    return re.sub(r"postgresql\+psycopg2://(\w+)@postgres\.loomcfm\.svc:5432/(\w+)",
                  rf"postgresql+psycopg2://\1@/\2?host={socket_dir}", text)


def _status(url: str, host: str, auth: str | None) -> int:
    headers = {"Host": host, **({"Authorization": f"Basic {auth}"} if auth else {})}
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.timeout(600)
def test_mlflow_server_as_deployed_authenticates_on_postgres(postgres, moto_server, tmp_path, monkeypatch):
    """The Deployment's command, env and basic-auth ini on PostgreSQL initialised as the StatefulSet does: a
    stage run logs params, metrics and artifacts with the Secret's credentials and is refused without."""
    import boto3
    from mlflow.tracking import MlflowClient

    from loomcfm_core import stages
    from loomcfm_core.config import load_config_text
    from loomcfm_core.errors import TrackingError

    objs = render("overlays/cpu")
    maps = configmaps(objs)
    assert _run_bucket_job(objs, moto_server).returncode == 0
    # the postgres image's first start: POSTGRES_USER / POSTGRES_DB, then /docker-entrypoint-initdb.d
    (statefulset,) = find(objs, "StatefulSet", "postgres")
    pg_env = {e["name"]: e.get("value") for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
    postgres.psql(f"CREATE ROLE {pg_env['POSTGRES_USER']} LOGIN PASSWORD 'unchecked-here';")
    postgres.psql(f"CREATE DATABASE {pg_env['POSTGRES_DB']} OWNER {pg_env['POSTGRES_USER']};")
    for script in maps["postgres-initdb"].values():
        postgres.psql(script)
    socket_dir = postgres.get_uri().split("host=")[1]

    user, password = "loomcfm", secrets.token_urlsafe(18)
    secret_values = {"<loomcfm-mlflow/MLFLOW_TRACKING_USERNAME>": user,
                     "<loomcfm-mlflow/MLFLOW_TRACKING_PASSWORD>": password,
                     "<loomcfm-mlflow/MLFLOW_FLASK_SERVER_SECRET_KEY>": secrets.token_hex(32),
                     "<loomcfm-postgres/POSTGRES_PASSWORD>": "unchecked-here",
                     "<loomcfm-s3/AWS_ACCESS_KEY_ID>": "testing", "<loomcfm-s3/AWS_SECRET_ACCESS_KEY>": "testing"}
    pod = find(objs, "Deployment", "mlflow")[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {k: secret_values.get(v, v) for k, v in container_env(container, maps).items()}
    env.update(AWS_ENDPOINT_URL=moto_server, MLFLOW_S3_ENDPOINT_URL=moto_server, HOME=str(tmp_path / "home"))
    mounts = {}
    for mount in container["volumeMounts"]:  # ConfigMap volumes become local folders
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        folder = tmp_path / mount["name"]
        folder.mkdir()
        for key, text in maps[volume["configMap"]["name"]].items():
            (folder / key).write_text(_local_postgres(text, socket_dir))
        mounts[mount["mountPath"]] = str(folder)

    def local(text: str) -> str:
        for path, folder in mounts.items():
            text = text.replace(path, folder)
        return _local_postgres(text, socket_dir)

    env = {k: local(v) for k, v in env.items()}
    assert Path(env["MLFLOW_AUTH_CONFIG_PATH"]).is_file()
    port = free_port()
    argv = [local(kubelet_expand(a, env)) for a in container["command"] + container["args"]]
    argv = [f"--port={port}" if a.startswith("--port=") else "--host=127.0.0.1" if a.startswith("--host=") else a
            for a in argv]
    assert argv[:2] == ["mlflow", "server"] and "--app-name=basic-auth" in argv
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PG"))}
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", *argv[1:]], env={**base_env, **env}, cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_health(url, proc, timeout=240)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}\n{log.read_text()[-4000:]}") from None
        good = b64encode(f"{user}:{password}".encode()).decode()
        assert _status(url, f"mlflow.{NAMESPACE}.svc:5000", good) == 200
        assert _status(url, "localhost:5000", good) == 200            # kubectl port-forward
        assert _status(url, f"mlflow.{NAMESPACE}.svc:5000", None) == 401
        assert _status(url, f"mlflow.{NAMESPACE}.svc:5000", b64encode(f"{user}:wrong".encode()).decode()) == 401
        assert _status(url, "attacker.example:5000", good) == 403     # DNS rebinding protection stays on

        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        cfg = load_config_text("digits", [f"tracking.uri={url}", "tracking.experiment=platform-check",
                                          f"storage.root={tmp_path / 'store'}", "eval.feature_network=inception"])
        with pytest.raises(TrackingError, match="refused the credentials.*MLFLOW_TRACKING_USERNAME"):
            stages.cache(cfg)
        assert not (tmp_path / "store").exists(), "a refused stage must not start its work"

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        result = stages.cache(cfg)
        client = MlflowClient(url)
        (run,) = client.search_runs([client.get_experiment_by_name("platform-check").experiment_id])
        assert run.data.params["data.name"] == "digits" and run.data.params["storage.root"] == cfg.storage.root
        assert run.data.metrics["num_train"] == result.num_train > 0
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        bucket, prefix = env["MLFLOW_ARTIFACTS_DESTINATION"].removeprefix("s3://").split("/", 1)
        s3 = boto3.client("s3", endpoint_url=moto_server, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/config.yaml") for k in keys), keys

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
        with pytest.raises(TrackingError, match="refused the credentials"):
            stages.cache(cfg)
        # runs and users are in PostgreSQL, not in a file beside the server
        runs = postgres.psql(f"\\c {pg_env['POSTGRES_DB']}\nSELECT count(*) FROM runs;")
        assert re.search(r"^\s*1\s*$", runs, re.M), runs
        users = postgres.psql("\\c mlflow_auth\nSELECT username FROM users;")
        assert user in users, users
        assert not list(tmp_path.rglob("*.db")), "a SQLite file was written"
    finally:
        _stop_group(proc)
