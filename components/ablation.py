"""KFP steps of the coupling ablation: the arms to run, one arm (train + evaluate with one coupling), and the
comparison."""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Markdown, Output

from loomcfm_core import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ablation_plan(config_yaml: str, overrides: list, dataset_uri: str, parent_run_id: str) -> List[str]:
    """One JSON spec per arm (the config, the arm, the dataset and the parent run): the ``ParallelFor`` items."""
    from loomcfm_core import ablation
    from loomcfm_core.config import load_config_text

    return ablation.plan(load_config_text(config_yaml, overrides), dataset_uri, parent_run_id)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ablation_arm(spec: str) -> str:
    """Trains and evaluates the spec's config with its arm's coupling; returns the arm's result as JSON."""
    from loomcfm_core import stages
    from loomcfm_core.ablation import ArmSpec
    from loomcfm_core.config import load_config_text

    arm = ArmSpec.from_json(spec)
    return stages.ablation_arm(load_config_text(arm.config_yaml), arm.arm, arm.dataset_uri,
                               arm.parent_run_id or None).to_json()


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ablation_report(config_yaml: str, overrides: list, parent_run_id: str, arms: list, report: Output[Markdown],
                    page: Output[HTML]) -> str:
    """Distance vs NFE per coupling: the table for the KFP UI (Markdown, and HTML with the plot) and the same
    files on the parent MLflow run; returns the Markdown table."""
    import shutil
    import tempfile
    from pathlib import Path

    from loomcfm_core import stages
    from loomcfm_core.ablation import ArmResult
    from loomcfm_core.config import load_config_text

    cfg = load_config_text(config_yaml, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        files = stages.ablation_report(cfg, parent_run_id, [ArmResult.from_json(a) for a in arms], Path(tmp))
        for artifact, name in ((report, "ablation.md"), (page, "ablation.html")):
            Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[name], artifact.path)
        return files["ablation.md"].read_text()
