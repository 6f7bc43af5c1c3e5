"""The shape of the package itself: it imports without its front doors and names them in no import statement,
its modules stay small, its import graph has no cycle (annotation-only imports included), allowed values live
in a leaf, and every error it raises on purpose is a LoomcfmError."""

from __future__ import annotations

import ast
import builtins
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import loomcfm_core
from loomcfm_core import errors

PACKAGE = Path(loomcfm_core.__file__).resolve().parent
MAX_LINES = 350


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module under loomcfm_core (packages by their __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


@pytest.fixture(scope="module")
def fresh_imports() -> dict:
    """What a fresh interpreter imports, in one subprocess (an interpreter with torch costs seconds): the
    modules of diffusers and its hub after the CLI and the stage modules, then how many of the library's
    modules import with components/ and pipelines/ blocked."""
    script = textwrap.dedent("""
        import importlib, json, pkgutil, sys

        class FrontDoors:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("components", "pipelines"):
                    raise ImportError(f"{name} is a front door, not importable here")

        sys.meta_path.insert(0, FrontDoors())
        try:
            import pipelines.runner
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not block")
        import loomcfm_core.cli, loomcfm_core.stages, loomcfm_core.models.loading, loomcfm_core.data.latents
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'huggingface_hub', 'safetensors'))
        import loomcfm_core
        names = [m.name for m in pkgutil.walk_packages(loomcfm_core.__path__, "loomcfm_core.")]
        for name in names:
            importlib.import_module(name)
        assert not {"components", "pipelines"} & {n.split(".")[0] for n in sys.modules}
        print(json.dumps({"heavy": heavy, "imported": len(names)}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.process
def test_every_module_imports_without_the_front_doors(fresh_imports):
    """components/ and pipelines/ are front doors over the library; the library never needs them."""
    assert fresh_imports["imported"] == len(modules()) - 1, "every module was imported (all but the package)"


def test_no_module_is_over_the_hard_cap():
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert not {n: length for n, length in lengths.items() if length > MAX_LINES}, lengths


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_statements(path: Path) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a file, at module level, inside functions or under ``if TYPE_CHECKING:``
    alike, each with whether it is annotation-only (under ``TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return [(node, _type_checking_only(node, parents)) for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_no_import_statement_names_a_front_door():
    """Not only what runs on import: an import inside a function, or one for annotations, is a dependency too."""
    found = []
    for name, path in modules().items():
        for node, _ in import_statements(path):
            targets = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}" for target in targets
                      if not getattr(node, "level", 0) and target.split(".")[0] in ("components", "pipelines")]
    assert not found, "the library imports its front doors:\n" + "\n".join(found)


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """Module -> the loomcfm_core modules it imports, at module level or inside functions alike (an import
    inside a function is still a dependency); imports under ``if TYPE_CHECKING:`` never run and are left
    out unless ``type_checking``. Importing ``a.b.c`` runs the packages ``a`` and ``a.b`` first, so those are
    edges too."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node, annotations_only in import_statements(path):
            if annotations_only and not type_checking:
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
        edges = set()
        for target in targets:
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known.keys()
        edges.discard(name)
        graph[name] = edges - {p for p in edges if name.startswith(p + ".")}  # a module's own packages
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    # the graph sees real edges, function-level ones included
    assert {"loomcfm_core.training.driver", "loomcfm_core.results"} <= graph["loomcfm_core.stages"]
    assert "loomcfm_core.choices" in graph["loomcfm_core.config.sections"]
    assert "loomcfm_core.config" not in graph["loomcfm_core.data.sources"], "annotations only (TYPE_CHECKING)"
    assert "loomcfm_core.evaluation" not in graph["loomcfm_core.reflow"]
    assert "loomcfm_core.reflow" not in graph["loomcfm_core.evaluation.scoring"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    # Nor when annotation-only imports count: the config's allowed values come from modules that never
    # import the config back, so the types of annotations need no TYPE_CHECKING to break a circle.
    annotated = import_graph(type_checking=True)
    assert "loomcfm_core.config" in annotated["loomcfm_core.data.sources"]
    assert find_cycle(annotated) is None, " -> ".join(find_cycle(annotated))


def test_allowed_values_live_in_a_leaf_the_config_reads():
    graph = import_graph(type_checking=True)
    assert graph["loomcfm_core.choices"] <= {"loomcfm_core.errors"}, graph["loomcfm_core.choices"]
    reached, todo = set(), ["loomcfm_core.config.schema"]
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    implementations = {"loomcfm_core.coupling", "loomcfm_core.sampling", "loomcfm_core.data.sources",
                       "loomcfm_core.models.autoencoder", "loomcfm_core.evaluation.metrics"}
    assert not reached & implementations, "the schema checks against values, not the modules that use them"


ALLOWED_BUILTINS = {
    "NotImplementedError": "an abstract method",
    "IndexError": "the sequence protocol (a Dataset index out of range)",
    "KeyboardInterrupt": "a SIGTERM handler stops the main thread's work as Ctrl-C does (MLflow runs end KILLED)",
}
VALIDATORS = {"field_validator", "model_validator"}  # pydantic turns their ValueErrors into our ConfigError


def _raised_class(node: ast.Raise) -> str | None:
    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    name = exc.attr if isinstance(exc, ast.Attribute) else exc.id if isinstance(exc, ast.Name) else None
    return name if name and name[0].isupper() else None  # lower case: re-raising a caught exception


# a framework's own exception that a module must raise for the framework to do its part (module -> class -> why)
FRAMEWORK_ERRORS = {
    "loomcfm_core.serving": {"MlflowException": "MLflow's scoring server answers an MlflowException with its code "
                                                "(400) and message, anything else with a generic one"},
}


def test_every_deliberate_error_is_a_loomcfm_error():
    ours = {n for n, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, errors.LoomcfmError)}
    assert {"ConfigError", "StorageError", "SourceError", "CheckpointError", "MetricsError", "TrackingError",
            "RayJobError", "UsageError"} <= ours
    problems = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and name != "loomcfm_core.errors":
                bases = {ast.unparse(b) for b in node.bases}
                if any(b.endswith(("Error", "Exception")) for b in bases):
                    problems.append(f"{name}:{node.lineno}: error class {node.name} outside errors.py")
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            raised = _raised_class(node)
            if raised is None or raised in ours or raised in ALLOWED_BUILTINS or raised == "ArgumentTypeError" \
                    or raised in FRAMEWORK_ERRORS.get(name, {}):
                continue
            scope = node
            while scope in parents and not isinstance(scope, ast.FunctionDef):
                scope = parents[scope]
            decorators = {ast.unparse(d).split("(")[0] for d in getattr(scope, "decorator_list", [])}
            if raised == "ValueError" and decorators & VALIDATORS:
                continue
            kind = "a built-in" if isinstance(getattr(builtins, raised, None), type) else "not a LoomcfmError"
            problems.append(f"{name}:{node.lineno}: raises {raised} ({kind})")
    assert not problems, "\n".join(problems)


@pytest.mark.process
def test_diffusers_is_imported_only_for_latent_work(fresh_imports):
    """diffusers costs seconds to import: the CLI and every stage module leave it to the autoencoder code."""
    assert fresh_imports["heavy"] == []
