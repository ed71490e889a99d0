"""Reading the operator's YAML files (config, rule file, web config), and the error that names
the file, the field and the problem.

A module of its own so that every reader (config.py, web_config.py, alerts/rules.py) can import
it without importing the others.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """A configuration problem: where (file), what (field) and why (problem)."""

    def __init__(self, source: str, field_path: str, problem: str):
        self.source, self.field_path, self.problem = source, field_path, problem
        super().__init__(f"{source}: field '{field_path}': {problem}")


class HostProblem(str):
    """A config problem that depends on the machine reading the file (a path that must exist
    there, an environment variable that must be set), not on the file itself. Every command
    that runs something refuses it; a command that only turns the file into text elsewhere
    (`rules export`, on a CI machine for a serving host) does not."""


def read_yaml_file(path: str | os.PathLike, what: str) -> Any:
    """A YAML file's content (config, rule or web config file); a file that cannot be read or
    parsed raises ConfigError naming it."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(source, "-", f"cannot read the {what}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "-", f"not valid YAML: {exc}") from None
