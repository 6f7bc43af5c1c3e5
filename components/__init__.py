"""KFP v2 components: one per stage, each a thin wrapper over the ``loomcfm_core.stages`` function.

All run on the one image ``docker/`` builds (``loomcfm_core.IMAGE``) with the package installed, so nothing is
pip-installed at run time. Each takes the config as YAML text (a preset name, a user's file, or the
resolved YAML ``prepare`` emits) plus ``key=value`` overrides, validated exactly as the CLI validates them.
"""

from components.ablation import ablation_arm, ablation_plan, ablation_report
from components.cache import cache
from components.cluster_check import cluster_check
from components.evaluate import evaluate, evaluate_reflow
from components.pairs import pairs
from components.prepare import prepare
from components.train import train

__all__ = ["ablation_arm", "ablation_plan", "ablation_report", "cache", "cluster_check", "evaluate",
           "evaluate_reflow", "pairs",
           "prepare", "train"]
