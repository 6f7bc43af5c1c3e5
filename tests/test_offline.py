"""No run phones home, and importing the library changes nothing: the CLI (and every process of ours that
starts others) sets the offline defaults, a user's own setting wins."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import loomcfm_core
from loomcfm_core.cli import main
from loomcfm_core.offline import DEFAULTS

PACKAGE = Path(loomcfm_core.__file__).resolve().parent


CHANGED = """
    import importlib, os, pkgutil
    before = dict(os.environ)
    {imports}
    print(sorted(k for k in before.keys() | os.environ.keys() if before.get(k) != os.environ.get(k)))
"""
EVERY_MODULE = """import loomcfm_core
    for module in pkgutil.walk_packages(loomcfm_core.__path__, "loomcfm_core."):
        importlib.import_module(module.name)"""


def _changed(imports: str) -> set[str]:
    """The environment variables that running ``imports`` changes in a fresh process without our defaults."""
    env = {k: v for k, v in os.environ.items() if k not in DEFAULTS}
    script = textwrap.dedent(CHANGED.format(imports=imports))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(ast.literal_eval(proc.stdout.strip().splitlines()[-1]))


def _third_party() -> set[str]:
    """The packages our modules import at module level, stdlib aside."""
    roots = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                roots.add(node.module.split(".")[0])
    return roots - set(sys.stdlib_module_names) - {"loomcfm_core", "__future__"}


@pytest.mark.process
def test_importing_the_library_sets_no_environment_variable():
    """Every module imported: what changes is what the libraries it imports change themselves (Ray and MLflow
    note their own state), nothing of ours."""
    ours = _changed(EVERY_MODULE)
    theirs = _changed("\n    ".join(f"import {name}" for name in sorted(_third_party())))
    assert not ours & set(DEFAULTS) and ours <= theirs, (ours, theirs)


def test_a_cli_run_keeps_ray_mlflow_and_the_hub_offline(monkeypatch, capsys):
    for name in DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's own choice
    assert main(["config", "presets"]) == 0
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0" and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1" and os.environ["HF_HUB_OFFLINE"] == "0"
