"""The ablation's arms as configs, without training: what each of the five trains (the kfp.local run in
``tests/kfp/test_ablation.py`` trains two of them) and how ``ablation.arms`` picks them."""

import pytest

from loomcfm_core.ablation import ArmSpec, arm_config, plan
from loomcfm_core.choices import ABLATION_ARMS
from loomcfm_core.config import ConfigError, load_config


def test_each_arm_trains_its_coupling_under_its_own_name_in_the_configs_experiment():
    cfg = load_config("digits", ["train.run_name=mine", "coupling.converge_epochs=3"])
    configs = {arm: arm_config(cfg, arm) for arm in ABLATION_ARMS}
    assert {arm: (c.coupling.kind, c.coupling.converge_epochs) for arm, c in configs.items()} == {
        "independent": ("independent", 0), "minibatch_ot": ("minibatch_ot", 0), "fixed": ("fixed", 0),
        "loom": ("loom", 0), "loom_converge": ("loom", 3)}
    assert all(c.name == f"digits-{arm}" and c.train.run_name is None and c.experiment == cfg.experiment
               for arm, c in configs.items())
    assert arm_config(load_config("digits"), "loom_converge").coupling.converge_epochs == 5, "the default passes"


def test_ablation_arms_picks_the_arms_in_the_order_given_and_rejects_others():
    cfg = load_config("digits", ["ablation.arms=[loom,independent]"])
    assert [ArmSpec.from_json(s).arm for s in plan(cfg, "/data/digits-x")] == ["loom", "independent"]
    assert [ArmSpec.from_json(s).arm for s in plan(load_config("digits"), "d")] == list(ABLATION_ARMS)
    for value, expected in (("[loom,ot]", "ablation.arms.1"), ("[loom,loom]", "each arm at most once"),
                            ("[]", "ablation.arms")):
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
            load_config("digits", [f"ablation.arms={value}"])
