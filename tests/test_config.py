import argparse

import pytest

from qlora_ui.config import (
    FIELD_INDEX,
    ConfigError,
    RunConfig,
    add_cli_flags,
    apply_cli_flags,
    cli_command,
    from_yaml,
    list_presets,
    load_preset,
    to_yaml,
)


def test_yaml_round_trip_is_exact():
    cfg = RunConfig().updated(lora_r=8, learning_rate=3e-4, column_map={"q": "instruction"}, system_prompt="Be brief.",
                              revision="main", quant_type="fp4", max_steps=7)
    text = to_yaml(cfg)
    again = from_yaml(text)
    assert again == cfg
    assert to_yaml(again) == text


def test_validation_collects_every_problem_at_once():
    cfg = RunConfig().updated(lora_r=0, learning_rate=5.0, lora_alpha=0, batch_size=0)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    text = str(e.value)
    for key in ("lora_r", "learning_rate", "lora_alpha", "batch_size"):
        assert key in text
    assert len(e.value.problems) == 4


def test_bad_values_are_named_not_tracebacks():
    with pytest.raises(ConfigError) as e:
        RunConfig().updated(learning_rate="abc", quant_type="int3", gradient_checkpointing="maybe", nope=1)
    msg = str(e.value)
    assert "learning_rate" in msg and "int3" in msg and "maybe" in msg and "unknown setting 'nope'" in msg


def test_unknown_yaml_keys_are_reported():
    with pytest.raises(ConfigError) as e:
        from_yaml("lora:\n  rank: 4\ntraining:\n  max_steps: x\n")
    assert "lora.rank" in str(e.value) and "max_steps" in str(e.value)


def test_every_field_is_a_cli_flag_applied_over_the_preset():
    p = argparse.ArgumentParser()
    add_cli_flags(p)
    args = p.parse_args(["--max-steps", "3", "--lora-r", "16", "--save-steps", "2", "--runs-dir", "/tmp/x",
                         "--data", "a.csv"])
    cfg = apply_cli_flags(load_preset("cpu-quickstart"), args)
    assert (cfg.training.max_steps, cfg.lora.lora_r, cfg.training.save_steps, cfg.runs_dir) == (3, 16, 2, "/tmp/x")
    assert cfg.data.data_path == "a.csv"
    assert cfg.quantization.quant_type == "nf4"  # untouched preset values stay
    flags = {a for action in p._actions for a in action.option_strings}
    for key in FIELD_INDEX:
        assert "--" + key.replace("_", "-") in flags


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_and_validates(name):
    cfg = load_preset(name)
    cfg.validate()
    assert cfg.model.base_model


def test_paper_preset_is_the_guanaco_recipe():
    c = load_preset("qlora-paper")
    assert (c.lora.lora_r, c.lora.lora_alpha, c.lora.lora_dropout) == (64, 16, 0.05)
    t = c.training
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.optimizer, t.max_grad_norm, t.group_by_length) == (
        2e-4, "constant", 0.03, "paged_adamw_32bit", 0.3, True)
    assert c.lora.target_modules == "all-linear" and c.quantization.quant_type == "nf4"
    assert c.quantization.double_quant and not c.data.train_on_source


def test_cli_command_reproduces_the_config():
    import shlex

    cfg = load_preset("cpu-quickstart").updated(lora_r=4, system_prompt="Talk like a pirate")
    cmd = cli_command(cfg, preset="cpu-quickstart")
    argv = shlex.split(cmd)[4:]
    p = argparse.ArgumentParser()
    p.add_argument("--preset")
    add_cli_flags(p)
    args = p.parse_args(argv)
    assert apply_cli_flags(load_preset(args.preset), args) == cfg


def test_column_map_accepts_the_documented_form_with_spaces_and_never_yaml():
    from qlora_ui.config import parse_column_map

    want = {"question": "instruction", "answer": "output"}
    for typed in ["question=instruction, answer=output", " question = instruction ,answer=output, ",
                  '{"question": "instruction", "answer": "output"}', "{'question': 'instruction', 'answer': 'output'}"]:
        assert parse_column_map(typed) == want, typed
        assert RunConfig().updated(column_map=typed).data.column_map == want
    for bad, words in [("question", "no '='"), ("=output", "empty"), ("{a: &a [x], b: *a}", "question=instruction"),
                       ('{"a": {"b": "c"}}', "one column name"), ("a=b," * 1000, "too long")]:
        with pytest.raises(ValueError, match=words):
            parse_column_map(bad)


def test_free_text_fields_are_capped_and_not_echoed_whole():
    with pytest.raises(ConfigError) as e:
        RunConfig().updated(system_prompt="s" * 10_000, name="n" * 1000, learning_rate="x" * 10_000)
    text = str(e.value)
    assert "system_prompt" in text and "limit is 4,000" in text and "name" in text and "limit is 256" in text
    assert len(text) < 1000


def test_a_preset_states_its_target_gpu_as_a_key_that_the_run_config_does_not_keep(tmp_path):
    from qlora_ui.presets import preset_target_gb

    assert preset_target_gb("gpu-65b-48gb") == 48 and preset_target_gb("gpu-7b-24gb") == 24
    assert preset_target_gb("qlora-paper") is None and preset_target_gb("no-such-preset") is None
    cfg = from_yaml("name: x\ntarget_gpu_gb: 40\nlora:\n  lora_r: 8\n")
    assert cfg.lora.lora_r == 8 and "target_gpu_gb" not in to_yaml(cfg)
    with pytest.raises(ConfigError, match="target_gpu_gb: 'big' is not a positive number of GB"):
        from_yaml("target_gpu_gb: big\n")
    # The GPU size comes from the key, not from the file's name.
    (tmp_path / "mine-99gb.yaml").write_text("name: mine\n", encoding="utf-8")
    (tmp_path / "mine.yaml").write_text("name: mine\ntarget_gpu_gb: 12\n", encoding="utf-8")
    assert preset_target_gb("mine-99gb", tmp_path) is None and preset_target_gb("mine", tmp_path) == 12


def test_sub_commands_take_a_subset_of_the_config_flags_with_their_own_aliases():
    from qlora_ui.cli_flags import add_cli_flags as add

    parser = argparse.ArgumentParser()
    add(parser, ["batch_size", "double_quant"], aliases={"--batch": "batch_size"}, switches=True)
    args = parser.parse_args(["--batch", "3", "--no-double-quant"])
    cfg = apply_cli_flags(RunConfig(), args)
    assert cfg.training.batch_size == 3 and cfg.quantization.double_quant is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora-r", "8"])  # not one of this parser's fields
    with pytest.raises(ValueError, match="not config fields: nope"):
        add(argparse.ArgumentParser(), ["nope"])


def test_saved_presets_are_capped_and_lookalikes_refused(tmp_path, monkeypatch):
    from qlora_ui import presets as pr

    (tmp_path / "cpu-quickstart.yaml").write_text("name: q\n")
    pr.save_preset(RunConfig(), "mine", tmp_path)
    pr.save_preset(RunConfig().updated(max_steps=7), "mine", tmp_path)  # the same name replaces
    assert pr.load_preset("mine", tmp_path).training.max_steps == 7
    for name in ("MINE", "mine.", "Cpu-Quickstart", "cpu-quickstart_"):
        with pytest.raises(ConfigError, match="looks like"):
            pr.save_preset(RunConfig(), name, tmp_path)
    monkeypatch.setattr(pr, "MAX_USER_PRESETS", 3)
    pr.save_preset(RunConfig(), "two", tmp_path)
    pr.save_preset(RunConfig(), "three", tmp_path)
    with pytest.raises(ConfigError, match="already holds 3"):
        pr.save_preset(RunConfig(), "four", tmp_path)
    pr.save_preset(RunConfig(), "three", tmp_path)  # replacing one still works at the cap
