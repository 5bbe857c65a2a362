"""A stage's options as a file: every stage's `Options` dataclass saved to and read from YAML / JSON.

A run folder keeps the resolved options of its stage (`config.yaml`), and `--config FILE` reads such a
file back, so a run is fully described by one file. The command line (cli.py) builds on this; stages
that save their options or launch themselves under torchrun use it without importing the command line.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml


def save_options(opts: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(dataclasses.asdict(opts), sort_keys=False))
    return p


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"error: config file {p} does not exist")
    text = p.read_text()
    try:
        data = (yaml.safe_load(text) or {}) if p.suffix in (".yaml", ".yml") else json.loads(text)
    except Exception as e:  # noqa: BLE001 - report any parse error the same way
        raise SystemExit(f"error: cannot parse config file {p}: {e}")
    if not isinstance(data, dict):
        raise SystemExit(f"error: config file {p} must hold a mapping of option: value")
    return data
