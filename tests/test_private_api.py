"""Other projects' private API: used only by one adapter module per project, each of which declares what it
uses, and the installed versions still have all of it (a changed surface fails here, naming the version
pyproject pins and the missing name)."""

from __future__ import annotations

import ast
import importlib
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import loomcfm_core
from loomcfm_core.private_api import PrivateSurface

PACKAGE = Path(loomcfm_core.__file__).resolve().parent
ADAPTERS = {"ray": "loomcfm_core.training.ray_trainer", "mlflow": "loomcfm_core.mlflow_stack"}
WATCHED = ("ray", "mlflow", "kfp")


def pinned(project: str) -> str:
    """The version specifier pyproject.toml gives ``project`` (``2.60.*``)."""
    deps = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == project]
    return str(spec).removeprefix("==")


@pytest.mark.parametrize("project", ADAPTERS)
def test_each_adapter_finds_the_private_names_it_uses(project):
    try:
        surface = importlib.import_module(ADAPTERS[project]).SURFACE
    except ImportError as exc:
        pytest.fail(f"{project} {metadata.version(project)} (pyproject pins {pinned(project)}): "
                    f"{ADAPTERS[project]} no longer imports: {exc}")
    assert (surface.project, surface.pinned) == (project, pinned(project)), "declared against the pinned version"
    assert not surface.missing(), surface.report()


def test_a_changed_surface_names_the_pinned_version_and_what_is_missing():
    surface = PrivateSurface("mlflow", "3.17.*", names=("mlflow.tracking.fluent._active_run_stack.get",
                                                        "mlflow.tracking.fluent._gone_stack",
                                                        "mlflow.no_such_module.thing"),
                             parameters={"mlflow.tracking.fluent.end_run": ("status", "gone_param")})
    assert surface.missing() == ["mlflow.tracking.fluent._gone_stack is missing",
                                 "mlflow.no_such_module.thing (mlflow.no_such_module is missing)",
                                 "mlflow.tracking.fluent.end_run: parameter 'gone_param'"]
    assert surface.report().startswith(f"mlflow {metadata.version('mlflow')} (pyproject pins 3.17.*) lacks private "
                                       "names an adapter relies on: mlflow.tracking.fluent._gone_stack is missing; ")


def _private_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, name)`` of every dotted name of a watched project with a private part (``_x``, not ``__x__``),
    in imports, attribute chains and strings (a logger's name)."""
    def private(dotted: str) -> bool:
        parts = dotted.split(".")
        return parts[0] in WATCHED and any(p.startswith("_") and not p.endswith("__") for p in parts[1:])

    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Attribute):
            names = [ast.unparse(node)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value:
            names = [node.value]
        found += [(node.lineno, name) for name in names if private(name)]
    return found


def test_private_names_of_other_projects_are_used_only_by_their_adapter():
    adapters = {ADAPTERS[p].replace(".", "/") + ".py" for p in ADAPTERS}
    outside, by_adapter = [], {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        uses = _private_uses(ast.parse(path.read_text()))
        if relative in adapters:
            by_adapter[relative] = {name.split(".")[0] for _, name in uses}
        else:
            outside += [f"{relative}:{line}: {name}" for line, name in uses]
    assert not outside, "private API outside its adapter:\n" + "\n".join(outside)
    assert by_adapter == {"loomcfm_core/training/ray_trainer.py": {"ray"}, "loomcfm_core/mlflow_stack.py": {"mlflow"}}


def test_the_pipelines_replace_the_private_kfp_method_they_declare():
    """``pipelines/common.py`` replaces one private kfp method (its ``SURFACE``), and only when the installed
    kfp has it: an upgrade that moves it fails here, naming the pinned version, not silently slow builds."""
    from kfp.dsl.pipeline_task import PipelineTask

    from pipelines import common

    assert common.SURFACE.pinned == pinned("kfp"), "declared against the pinned version"
    assert PipelineTask._ensure_container_spec_exists is common._ensure_container_spec_exists, \
        f"kfp {metadata.version('kfp')} (pyproject pins {pinned('kfp')}) has no {common.SURFACE.names[0]}"
