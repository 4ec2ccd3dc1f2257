"""Config loading, overrides and the clear errors users see."""

import re

import pytest

from flowalign.cli import parse_overrides
from flowalign.config import (
    PRESET_DIR,
    TrainConfig,
    load_config,
    load_prompts,
    make_config,
    preset_names,
    read_yaml,
    to_yaml,
)


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ValueError) as err:
        make_config({"learning_rat": 1e-3})
    msg = str(err.value)
    assert "'learning_rat'" in msg and "did you mean 'learning_rate'" in msg and "group_size" in msg


def test_group_size_below_two_is_refused():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        make_config({"group_size": 1})


def test_eval_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="eval_batch_size must be >= 1"):
        make_config({"eval_batch_size": 0})


def test_overrides_are_coerced_and_win_over_preset():
    assert "shapes" in preset_names()
    cfg = load_config(
        "shapes", parse_overrides(["--max-steps", "3", "--learning_rate=1e-3", "--lora-targets", "to_q,to_k"])
    )
    assert cfg.max_steps == 3 and cfg.learning_rate == 1e-3 and cfg.lora_targets == ("to_q", "to_k")
    assert cfg.model == read_yaml("shapes")["model"]
    with pytest.raises(ValueError, match="max_steps expects an integer"):
        load_config("shapes", {"max_steps": "many"})


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config("shapes", {"max_steps": 7, "max_sequence_length": "none"})
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg == TrainConfig(**{**cfg.__dict__})


def test_missing_config_and_prompt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a YAML file nor a built-in preset"):
        load_config("no_such_preset")
    with pytest.raises(FileNotFoundError, match="prompt file"):
        load_prompts(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_prompts(str(empty))
    ok = tmp_path / "p.txt"
    ok.write_text("a cat\n\n a dog \n")
    assert load_prompts(str(ok)) == ["a cat", "a dog"]


def test_override_parser_errors():
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--max-steps"])
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_overrides(["oops"])


def test_on_off_keys_stand_alone_on_the_command_line():
    """`--key` / `--no-key` for boolean keys reach the config as true / false; other keys still need a value."""
    over = parse_overrides(["--no-credit-constrained", "--group-shared-noise", "--max-steps", "3"])
    assert over == {"credit_constrained": "false", "group_shared_noise": "true", "max_steps": "3"}
    cfg = load_config("shapes", over)
    assert cfg.credit_constrained is False and cfg.group_shared_noise is True and cfg.max_steps == 3
    assert load_config("shapes").credit_constrained is True  # the default the flag turned off
    with pytest.raises(ValueError, match="--no-max-steps needs a value"):
        parse_overrides(["--no-max-steps"])  # not an on/off key, so not a negation
    with pytest.raises(ValueError, match="--seed needs a value"):
        parse_overrides(["--seed", "--no-credit-constrained"])


def test_a_yaml_starts_from_its_base_and_changes_only_what_it_names(tmp_path):
    """`base:` chains (a preset, then a file relative to the one naming it): later keys win, overrides win over all."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("base: shapes\nlearning_rate: 1.0e-4\nmax_steps: 50\n")
    (tmp_path / "short.yaml").write_text("base: sub/mine.yaml\nmax_steps: 5\n")
    preset = read_yaml("shapes")
    cfg = load_config(str(tmp_path / "short.yaml"), {"seed": 3})
    assert (cfg.learning_rate, cfg.max_steps, cfg.seed) == (1.0e-4, 5, 3)
    expected = make_config({**preset, "learning_rate": 1.0e-4, "max_steps": 5, "seed": 3})
    assert cfg == expected and cfg.num_steps == preset["num_steps"] and cfg.lora_min_sigma == preset["lora_min_sigma"]
    assert "base" not in to_yaml(cfg)  # a run's config.yaml is resolved: it stands alone


def test_bad_bases_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nseed: 1\n")
    with pytest.raises(ValueError, match="loops back"):
        read_yaml(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="base 'nowhere.yaml'.*neither a YAML file nor a built-in preset"):
        read_yaml(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("base: [shapes]\n")
    with pytest.raises(ValueError, match="base must name a preset or a YAML file"):
        read_yaml(str(tmp_path / "d.yaml"))


def test_counts_betas_and_broken_yaml_are_named(tmp_path):
    for key in ("train_batch_size", "grad_accum", "inner_epochs"):
        with pytest.raises(ValueError, match=f"{key} must be >= 1, got 0"):
            make_config({key: 0})
    with pytest.raises(ValueError, match="adam_betas must be two numbers"):
        make_config({"adam_betas": "0.9"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1,\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config(str(bad))


def test_a_folder_named_like_a_preset_does_not_hide_the_preset(tmp_path, monkeypatch):
    """`flowalign train shapes --output-dir shapes`, then `flowalign train shapes` again from the same folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    assert load_config("shapes") == load_config(str(PRESET_DIR / "shapes.yaml"))
    (tmp_path / "mine.yaml").write_text("base: shapes\nseed: 4\n")
    assert load_config("mine.yaml").seed == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_steps": 2.7}, "max_steps expects an integer, got 2.7"),  # was truncated to 2
        ({"max_steps": True}, "max_steps expects an integer, got True"),  # was 1
        ({"output_dir": None}, "output_dir expects str, got None"),  # was a folder named None
        ({"output_dir": ["a", "b"]}, "output_dir expects str"),
        ({"output_dir": ""}, "output_dir must name a directory"),  # was the current directory
        ({"lora_rank": -4}, "lora_rank must be >= 0"),  # was a full fine-tune under a LoRA banner
        ({"eval_guidance_scale": float("nan")}, "eval_guidance_scale must be a finite number"),  # was no guidance
        ({"ema_decay": 2}, "ema_decay must be in"),
        ({"clip_range": -1}, "clip_range must be a positive"),
        ({"warmup_steps": -5}, "warmup_steps must be >= 0"),
        ({"sde_window": -1}, "sde_window must be >= 0"),  # these four loaded
        ({"sde_window_max_start": -1}, "sde_window_max_start must be >= 0"),
        ({"max_sequence_length": -3}, "max_sequence_length must be >= 1"),
        ({"completion_steps": -2}, "completion_steps must be >= 1"),
        ({"num_steps": 1}, "num_steps must be >= 2"),
        ({"adam_betas": 0.9}, "adam_betas expects a list of float"),  # was a TypeError
        ({"lora_targets": 5}, "lora_targets expects a list of str"),
        ({"log_with": None}, "log_with expects a list"),
        ({"device": "nonsense"}, "device must be one of cpu, cuda"),  # was CPU, silently
        ({"use_ema": 1}, "unknown config key"),
    ],
)
def test_values_that_would_be_silently_changed_are_refused(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config("shapes", override)


def test_whole_floats_and_listed_strings_still_coerce():
    cfg = load_config("shapes", {"max_steps": 3.0, "lora_targets": "to_q, to_k", "log_with": [], "seed": "7"})
    assert (cfg.max_steps, cfg.lora_targets, cfg.log_with, cfg.seed) == (3, ("to_q", "to_k"), (), 7)


def test_prompt_files_and_run_directories_are_named_for_what_they_are(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_prompts(str(tmp_path))
    (tmp_path / "latin1.txt").write_bytes("un cercle rouge à gauche\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt' is not UTF-8 text"):
        load_prompts(str(tmp_path / "latin1.txt"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="a training run: pass it as --checkpoint"):
        load_config(str(tmp_path / "run"))


def test_the_checker_version_defaults_to_the_checkers_and_unknown_ones_are_refused():
    from rewards.shapes import DEFAULT_CHECKER

    assert TrainConfig().checker == DEFAULT_CHECKER
    assert load_config("shapes", {"checker": 3}).checker == 3
    for bad in (4, True, 2.5):
        with pytest.raises(ValueError, match="checker"):
            load_config("shapes", {"checker": bad})
