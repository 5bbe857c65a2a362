"""`nanoseek` command line: one command, one subcommand per stage.

Each subcommand lives in its own module, which defines
  * `Options`: a dataclass; every field has a default and a `help` in its metadata,
  * `run(opts: Options) -> None`.
Flags are generated from the dataclass, `--config FILE` (YAML or JSON) fills fields, and flags
given on the command line override the file. The resolved options are what a stage saves in
its run folder, so a run is fully described by one config file.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import typing
from typing import Any

from nanoseek.errors import UsageError
from nanoseek.options import read_config_file

# subcommand -> (module, one-line description). The command line's one place of lazy imports: a command's
# module is imported when it runs (`_main`), so `nanoseek --help` starts without importing torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "speedrun": ("nanoseek.speedrun.run", "the whole R1 recipe end to end, with a report"),
    "pretrain": ("nanoseek.train.pretrain", "pretrain the MoE model (next-token + MTP loss)"),
    "sft": ("nanoseek.train.sft", "supervised fine-tuning on chat data (cold start, rejection-sampling SFT)"),
    "grpo": ("nanoseek.train.grpo", "reinforcement learning with GRPO and rule rewards (R1 / R1-Zero)"),
    "extend": ("nanoseek.train.extend", "context extension: continue training at a longer length with YaRN"),
    "rejection-sample": ("nanoseek.train.rejection", "sample k answers per prompt, keep correct ones as SFT data"),
    "distill": ("nanoseek.train.distill", "distil a teacher into the dense Qwen2-style student"),
    "eval": ("nanoseek.eval", "pass@1 / cons@k / format rate on held-out tasks"),
    "long-eval": ("nanoseek.long_context", "pass key retrieval and task accuracy against context length"),
    "generate": ("nanoseek.infer.generate", "generate completions for prompts"),
    "chat": ("nanoseek.infer.chat", "chat with a model in the terminal"),
    "serve": ("nanoseek.infer.server", "OpenAI-compatible API server with a web chat"),
    "export": ("nanoseek.hf.export", "convert / export a checkpoint to HF layout"),
    "cost": ("nanoseek.cost", "FLOPs, GPU-hours, dollars and memory of a config"),
    "bench": ("nanoseek.bench", "benchmarks against HF transformers / TRL"),
    "data": ("nanoseek.data.cli", "print and export samples of the reasoning tasks"),
    "tokenizer": ("nanoseek.tokenizer", "train the byte-level BPE tokenizer"),
}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", ())) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return tp, False


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def _converter(tp: Any):
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        base = _parse_bool
    elif tp in (int, float, str):
        base = tp
    elif origin in (list, tuple):
        inner = (typing.get_args(tp) or (str,))[0]
        base = lambda s, f=inner: [f(x) for x in s.split(",") if x.strip()]  # noqa: E731
    else:  # dicts and the rest: JSON
        base = json.loads
    if optional:
        return lambda s: None if s.strip().lower() in ("none", "null", "") else base(s)
    return base


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_") or f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_ = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")  # argparse formats %
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:  # --flag / --no-flag
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_)
            continue
        if f.metadata.get("repeat"):  # free text that may hold commas: one item per use of the flag
            parser.add_argument(flag, dest=f.name, action="append", default=argparse.SUPPRESS,
                                metavar=f.metadata.get("metavar", f.name.upper()), help=help_)
            continue
        parser.add_argument(flag, dest=f.name, type=_converter(hints[f.name]), default=argparse.SUPPRESS,
                            metavar=f.metadata.get("metavar", f.name.upper()), help=help_)


def build_options(cls: type, namespace: argparse.Namespace, config_path: str | None = None):
    """Defaults < config file < command-line flags."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if config_path:
        file_values = read_config_file(config_path)
        unknown = sorted(set(k.replace("-", "_") for k in file_values) - names)
        if unknown:
            raise SystemExit(f"error: unknown option(s) in {config_path}: {', '.join(unknown)}")
        values.update({k.replace("-", "_"): v for k, v in file_values.items()})
    values.update({k: v for k, v in vars(namespace).items() if k in names})
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="nanoseek: DeepSeek-V3 / R1 — pretrain, SFT, GRPO, distil, evaluate and serve, on a laptop CPU or many GPUs.",
        epilog="Errors in what you give (paths, names, files) print one line and exit 2; add --debug for the traceback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, desc) in COMMANDS.items():
        sub.add_parser(name, help=desc, add_help=False)
    return parser


def parse_command(name: str, module, argv: list[str], desc: str = ""):
    """The options of `nanoseek <name> argv...`: module.Options from defaults < --config file < flags."""
    parser = argparse.ArgumentParser(prog=f"nanoseek {name}", description=getattr(module, "__doc__", None) or desc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    optional = set()
    for pos in getattr(module, "POSITIONAL", ()):  # ("model", "model directory"[, optional])
        if len(pos) > 2 and pos[2]:
            optional.add(pos[0])
        parser.add_argument(pos[0], nargs="?" if pos[0] in optional else None, help=pos[1],
                            default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of options; flags override it")
    # an optional positional keeps its --flag too (`nanoseek sft DIR` and `nanoseek sft --model DIR`)
    required = {p[0] for p in getattr(module, "POSITIONAL", ())} - optional
    add_dataclass_arguments(parser, module.Options, skip=required)
    ns = parser.parse_args(argv)
    return build_options(module.Options, ns, ns.config)


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's mistake (UsageError, or a stage's SystemExit with a message) prints one
    line and exits 2; `nanoseek --debug COMMAND ...` lets the traceback through instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        return _main(argv)
    except UsageError as e:
        if debug:
            raise
        print(f"nanoseek {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if debug or not isinstance(e.code, str):
            raise
        msg = e.code.removeprefix("error: ")
        print(msg if msg.startswith(("nanoseek", argv[0])) else f"nanoseek {argv[0]}: error: {msg}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    top = make_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        top.print_usage(sys.stderr)
        print(f"nanoseek: error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, desc = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
            print(f"nanoseek: the '{name}' command is not available in this build ({module_name} missing)", file=sys.stderr)
            return 2
        raise SystemExit(f"nanoseek {name}: missing dependency '{e.name}'. Install the extras: pip install 'nanoseek[dev]'")
    names = {f.name for f in dataclasses.fields(module.Options)}
    if "parallel" not in names and (int(os.environ.get("WORLD_SIZE", "1")) > 1
                                    or any(a.split("=")[0] in ("--parallel", "--ep") for a in argv[1:])):
        print(f"nanoseek {name} runs in one process: launch it without torchrun, --parallel and --ep "
              "(pretrain, sft, distill and grpo run distributed)", file=sys.stderr)
        return 2
    opts = parse_command(name, module, argv[1:], desc)
    module.run(opts)
    # imported here for the same reason as the commands: it imports torch
    from nanoseek.parallel.parallelize import destroy_distributed
    destroy_distributed()  # a no-op unless the stage joined torchrun's process group
    return 0


if __name__ == "__main__":
    sys.exit(main())
