"""RFTConfig: YAML, --set overrides, unknown keys, shipped configs, the CLI's command list."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from rft.cli import app
from rft_core.config import ConfigError, RFTConfig, apply_overrides

ROOT = Path(__file__).parents[1]


def test_overrides_parse_yaml_scalars_and_nested_keys():
    raw = apply_overrides({"rl": {"lr": 1.0}}, ["rl.lr=3e-5", "model.lora.enabled=true", "data.val_size=null",
                                                "model.lora.target_modules=[q_proj, v_proj]"])
    cfg = RFTConfig.from_dict(raw)
    assert cfg.rl.lr == 3e-5
    assert cfg.model.lora.enabled is True
    assert cfg.data.val_size is None
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_the_key_and_the_nearest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown key 'rl.learning_rat'.*did you mean 'rl.learning_rate'|unknown key 'rl.kl_coeff'; did you mean 'rl.kl_coef'"):
        RFTConfig.load(None, ["rl.kl_coeff=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'sfft'; did you mean 'sft'"):
        RFTConfig.load(None, ["sfft.lr=1"])


def test_bad_values_and_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"rl.lr: .*greater than 0"):
        RFTConfig.load(None, ["rl.lr=-1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        RFTConfig.load(None, ["rl.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        RFTConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="a config is a mapping"):
        RFTConfig.from_yaml(bad)


def test_yaml_round_trip_and_section_digests(tmp_path):
    cfg = RFTConfig.load(None, ["rl.lr=1e-4"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = RFTConfig.from_yaml(path)
    assert again == cfg
    other = RFTConfig.load(None, ["rl.lr=2e-4"])
    assert cfg.digest("data", "sft") == other.digest("data", "sft")
    assert cfg.digest("rl") != other.digest("rl")


def test_demo_yaml_is_exactly_what_rft_run_uses_without_a_config():
    assert RFTConfig.from_yaml(ROOT / "configs" / "demo.yaml") == RFTConfig()


def test_gsm8k_yaml_loads_with_reft_settings():
    cfg = RFTConfig.from_yaml(ROOT / "configs" / "gsm8k.yaml")
    assert cfg.data.format == "gsm8k"
    assert cfg.model.lora.enabled
    assert (cfg.rl.gamma, cfg.rl.lam, cfg.rl.clip_range, cfg.rl.vf_coef, cfg.rl.ppo_epochs) == (1.0, 0.95, 0.2, 5.0, 2)
    assert cfg.grader.resolved_spec()["partial_credit"] == 0.1


def test_rft_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "validate", "grade", "train", "promote", "rollback", "models"):
        assert f" {command} " in result.output


def test_rft_run_rejects_a_bad_override_without_a_traceback():
    result = CliRunner().invoke(app, ["run", "--set", "rl.kl_coeff=0.1"])
    assert result.exit_code == 2
    assert "did you mean 'rl.kl_coef'" in result.output
    assert "Traceback" not in result.output
