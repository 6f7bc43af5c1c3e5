"""KFP steps of the coupling ablation: the arms to run, one arm (train + evaluate with one coupling), and the
comparison. Each finds the parent MLflow run of its pipeline run by the KFP run id
(:func:`loomcfm_core.kfp_env.pipeline_parent`), as the other steps do."""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Markdown, Output

from loomcfm_core import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ablation_plan(config_yaml: str, overrides: list, dataset_uri: str) -> List[str]:
    """One JSON spec per arm (the config, the arm and the dataset): the ``ParallelFor`` items."""
    from loomcfm_core.offline import stay_offline

    stay_offline()
    from loomcfm_core import ablation
    from loomcfm_core.config import load_config_text

    return ablation.plan(load_config_text(config_yaml, overrides), dataset_uri)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ablation_arm(spec: str) -> str:
    """Trains and evaluates the spec's config with its arm's coupling; returns the arm's result as JSON."""
    from loomcfm_core.offline import stay_offline

    stay_offline()
    from loomcfm_core import stages
    from loomcfm_core.ablation import ArmSpec
    from loomcfm_core.config import load_config_text
    from loomcfm_core.kfp_env import pipeline_parent

    arm = ArmSpec.from_json(spec)
    cfg = load_config_text(arm.config_yaml)
    return stages.ablation_arm(cfg, arm.arm, arm.dataset_uri, pipeline_parent(cfg)).to_json()


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ablation_report(config_yaml: str, overrides: list, arms: list, report: Output[Markdown],
                    page: Output[HTML]) -> str:
    """Distance vs NFE per coupling: the table for the KFP UI (Markdown, and HTML with the plot) and the same
    files on the parent MLflow run; returns the Markdown table."""
    from loomcfm_core.offline import stay_offline

    stay_offline()
    import shutil
    import tempfile
    from pathlib import Path

    from loomcfm_core import stages
    from loomcfm_core.ablation import ArmResult
    from loomcfm_core.config import load_config_text
    from loomcfm_core.errors import UsageError
    from loomcfm_core.kfp_env import pipeline_parent

    cfg = load_config_text(config_yaml, overrides)
    parent_run_id = pipeline_parent(cfg)
    if parent_run_id is None:
        raise UsageError("ablation_report records the comparison on the pipeline's parent MLflow run, and found "
                         "none for this KFP run (KFP_RUN_ID)")
    with tempfile.TemporaryDirectory() as tmp:
        files = stages.ablation_report(cfg, parent_run_id, [ArmResult.from_json(a) for a in arms], Path(tmp))
        for artifact, name in ((report, "ablation.md"), (page, "ablation.html")):
            Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[name], artifact.path)
        return files["ablation.md"].read_text()
