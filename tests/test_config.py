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


def test_a_critic_warm_up_that_leaves_the_policy_no_iteration_is_refused():
    # The default 10 value-only iterations would make a 5-iteration smoke run train nothing.
    with pytest.raises(ConfigError, match=r"critic_warmup \(10\) leaves no iteration of rl.iterations \(5\).*"
                       r"rl.critic_warmup=0 for a short run"):
        RFTConfig.load(None, ["rl.iterations=5"])
    assert RFTConfig.load(None, ["rl.iterations=11"]).rl.critic_warmup == 10
    assert RFTConfig.load(None, ["rl.iterations=5", "rl.critic_warmup=0"]).rl.iterations == 5
    assert RFTConfig.load(None, ["rl.iterations=5", "rl.algorithm=grpo"]).rl.critic_warmup == 10  # no critic


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


# --------------------------------------------------------------------------- TRL's names

TRL_AND_OURS = [
    ("sft.learning_rate=3e-4", "sft.lr=3e-4"),
    ("sft.per_device_train_batch_size=4", "sft.batch_size=4"),
    ("sft.gradient_accumulation_steps=3", "sft.grad_accum=3"),
    ("sft.num_train_epochs=2", "sft.epochs=2"),
    ("rl.learning_rate=2e-5", "rl.lr=2e-5"),
    ("rl.beta=0.01", "rl.kl_coef=0.01"),
    ("rl.num_generations=8", "rl.samples_per_prompt=8"),
    ("rl.max_completion_length=96", "rl.max_new_tokens=96"),
    ("rl.num_iterations=3", "rl.ppo_epochs=3"),
    ("rl.num_ppo_epochs=3", "rl.ppo_epochs=3"),
    ("rl.epsilon=0.1", "rl.clip_range=0.1"),
]


@pytest.mark.parametrize(("trl", "ours"), TRL_AND_OURS)
def test_a_trl_name_sets_our_key_and_says_so(trl, ours, caplog):
    with caplog.at_level("INFO", logger="rft.config"):
        cfg = RFTConfig.load(None, [trl])
    assert cfg == RFTConfig.load(None, [ours])
    assert cfg.digest() == RFTConfig.load(None, [ours]).digest()
    name, key = trl.split("=")[0], ours.split("=")[0]
    assert f"{name} is TRL's name: using {key}" in caplog.text


def test_trl_names_in_a_yaml_file_give_the_same_config_and_digest(tmp_path, caplog):
    trl = tmp_path / "trl.yaml"
    trl.write_text("sft:\n  learning_rate: 3.0e-4\n  gradient_accumulation_steps: 2\n"
                   "rl:\n  beta: 0.01\n  num_generations: 8\n  max_completion_length: 64\n"
                   "  temperature: 0.7\n  top_p: 0.9\n")
    ours = tmp_path / "ours.yaml"
    ours.write_text("sft:\n  lr: 3.0e-4\n  grad_accum: 2\n"
                    "rl:\n  kl_coef: 0.01\n  samples_per_prompt: 8\n  max_new_tokens: 64\n"
                    "  temperature: 0.7\n  top_p: 0.9\n")
    with caplog.at_level("INFO", logger="rft.config"):
        cfg = RFTConfig.from_yaml(trl)
    assert cfg == RFTConfig.from_yaml(ours)
    assert cfg.digest() == RFTConfig.from_yaml(ours).digest()
    assert "rl.beta is TRL's name: using rl.kl_coef" in caplog.text
    assert "beta" not in cfg.to_yaml() and "kl_coef: 0.01" in cfg.to_yaml()  # stored under our names
    # --set wins over the file under either name; a dict (a flow parameter) is accepted too.
    assert RFTConfig.from_yaml(trl, ["rl.kl_coef=0.2"]).rl.kl_coef == 0.2
    assert RFTConfig.from_yaml(ours, ["rl.beta=0.2"]).rl.kl_coef == 0.2
    assert RFTConfig.model_validate({"rl": {"beta": 0.2}}).rl.kl_coef == 0.2


def test_giving_a_trl_name_and_ours_is_an_error_naming_both(tmp_path):
    with pytest.raises(ConfigError, match=r"'rl.beta' and 'rl.kl_coef' are the same setting"):
        RFTConfig.load(None, ["rl.beta=0.1", "rl.kl_coef=0.2"])
    both = tmp_path / "both.yaml"
    both.write_text("sft:\n  lr: 1.0e-3\n  learning_rate: 3.0e-4\n")
    with pytest.raises(ConfigError, match=r"both.yaml: 'sft.learning_rate' and 'sft.lr' are the same setting"):
        RFTConfig.from_yaml(both)
    with pytest.raises(ConfigError, match=r"'rl.num_iterations' and 'rl.num_ppo_epochs' are the same setting"):
        RFTConfig.from_dict({"rl": {"num_iterations": 2, "num_ppo_epochs": 3}})


def test_trl_names_without_a_one_to_one_key_are_refused_with_what_to_set():
    with pytest.raises(ConfigError, match=r"'rl.per_device_train_batch_size': TRL's name.*rl.minibatch_size"):
        RFTConfig.load(None, ["rl.per_device_train_batch_size=4"])
    with pytest.raises(ConfigError, match=r"'rl.gradient_accumulation_steps': TRL's name.*rl.micro_batch_size"):
        RFTConfig.load(None, ["rl.gradient_accumulation_steps=4"])
    with pytest.raises(ConfigError, match=r"'rl.num_train_epochs': TRL's name.*rl.iterations"):
        RFTConfig.load(None, ["rl.num_train_epochs=1"])


def test_did_you_mean_knows_trl_names_and_where_they_live():
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'; 'learning_rate' is TRL's name, here it is 'sft.lr' or 'rl.lr'"):
        RFTConfig.load(None, ["learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown key 'sft.beta'; 'beta' is TRL's name, here it is 'rl.kl_coef'"):
        RFTConfig.load(None, ["sft.beta=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'top_p'; 'top_p' is TRL's name, here it is 'rl.top_p'"):
        RFTConfig.load(None, ["top_p=0.9"])
    with pytest.raises(ConfigError, match=r"did you mean 'rl.num_generations' \(TRL's name for 'rl.samples_per_prompt'\)"):
        RFTConfig.load(None, ["rl.num_generation=4"])
    result = CliRunner().invoke(app, ["run", "--set", "rl.learning_rat=1e-5"])
    assert result.exit_code == 2 and "did you mean 'rl.learning_rate'" in result.output


def test_sampling_filters_default_off_and_are_range_checked():
    cfg = RFTConfig()
    assert (cfg.rl.top_k, cfg.rl.top_p, cfg.rl.min_p) == (0, 1.0, 0.0)
    assert (cfg.eval.top_k, cfg.eval.top_p, cfg.eval.min_p) == (0, 1.0, 0.0)
    assert RFTConfig.load(None, ["rl.top_p=0.95", "eval.min_p=0.05"]).rl.top_p == 0.95
    for bad in ("rl.top_p=0", "rl.top_p=1.5", "rl.min_p=-0.1", "eval.min_p=2", "eval.top_k=-1"):
        with pytest.raises(ConfigError):
            RFTConfig.load(None, [bad])
