"""The dataclass -> argparse layer every command shares: flag forms, config files, errors."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from nanoseek.cli import add_dataclass_arguments, build_options, main


@dataclass
class Opts:
    steps: int = field(default=3, metadata={"help": "steps, 100% of them"})
    lr: float = 1e-3
    tasks: list[str] = field(default_factory=lambda: ["add"])
    prompt: list[str] = field(default_factory=lambda: ["hi"], metadata={"repeat": True})
    difficulty: int | None = 1
    progress: bool = True


def parse(argv: list[str], config: str | None = None) -> Opts:
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, Opts)
    return build_options(Opts, p.parse_args(argv), config)


def test_defaults_and_flag_forms():
    o = parse([])
    assert (o.steps, o.tasks, o.prompt, o.difficulty, o.progress) == (3, ["add"], ["hi"], 1, True)
    o = parse(["--steps", "7", "--tasks", "add,sub", "--difficulty", "none", "--no-progress"])
    assert (o.steps, o.tasks, o.difficulty, o.progress) == (7, ["add", "sub"], None, False)


def test_repeatable_free_text_keeps_commas():
    o = parse(["--prompt", "largest of 84, 18?", "--prompt", "sort 3, 1, 2"])
    assert o.prompt == ["largest of 84, 18?", "sort 3, 1, 2"]


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 9\nlr: 0.5\ntasks: [max, sort]\n")
    o = parse(["--lr", "0.25"], str(cfg))
    assert (o.steps, o.lr, o.tasks) == (9, 0.25, ["max", "sort"])  # the flag wins over the file


def test_bad_config_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 9\n")
    with pytest.raises(SystemExit, match="unknown option.*stepz"):
        parse([], str(bad))
    with pytest.raises(SystemExit, match="does not exist"):
        parse([], str(tmp_path / "missing.yaml"))
    bad.write_text("[1, 2]\n")
    with pytest.raises(SystemExit, match="mapping"):
        parse([], str(bad))


def test_bad_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse(["--steps", "many"])
    assert "invalid" in capsys.readouterr().err


def test_help_of_every_command_renders(capsys):
    from nanoseek.cli import COMMANDS
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert f"nanoseek {name}" in capsys.readouterr().out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_model_directory_as_positional_or_flag():
    from nanoseek.cli import parse_command
    from nanoseek.train import grpo, sft
    assert parse_command("sft", sft, ["runs/a/final", "--steps", "3"]).model == "runs/a/final"
    assert parse_command("sft", sft, ["--model", "runs/a/final"]).model == "runs/a/final"
    assert parse_command("grpo", grpo, ["runs/b/final"]).model == "runs/b/final"
    assert parse_command("grpo", grpo, ["--model", "runs/b/final"]).model == "runs/b/final"
    from nanoseek import eval as ev
    with pytest.raises(SystemExit):  # eval's model is a required positional without a --model flag
        parse_command("eval", ev, ["--model", "x"])


def test_grpo_options_round_trip_through_a_config_file(tmp_path):
    """The speedrun launches GRPO under torchrun as `nanoseek grpo --config launch.yaml`."""
    from nanoseek.cli import parse_command
    from nanoseek.options import save_options
    from nanoseek.train import grpo
    o = grpo.Options(model="runs/sft/final", steps=3, tasks=["add", "sub"], lr=5e-5, parallel="fsdp")
    back = parse_command("grpo", grpo, ["--config", str(save_options(o, tmp_path / "launch.yaml"))])
    assert back == o
