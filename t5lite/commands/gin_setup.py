"""The gin edge of the command line: `--gin_file=F` and `--gin.NAME=VALUE`.

Library code never imports gin. Commands call `register_configurables()` and then
`parse_gin(files, overrides)`.

Unlike T5X, string values need no escaped quotes on the command line: a value that is not a gin
literal (number, bool, None, tuple/list/dict, quoted string) nor a reference (`@name`,
`%MACRO`) is taken as a string.

Example::

    >>> split_gin_overrides(["--model_dir=x", "--gin.MIXTURE_OR_TASK_NAME=demo_ul2"])
    (['--model_dir=x'], ['MIXTURE_OR_TASK_NAME = "demo_ul2"'])
"""

from __future__ import annotations

import ast

GIN_FLAG_PREFIX = "--gin."

# `--gin.NAME=VALUE` bindings taken off the command line by t5lite.cli before absl parses flags.
COMMAND_LINE_BINDINGS: list[str] = []


def _as_gin_value(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith(("@", "%")):
        return stripped
    try:
        ast.literal_eval(stripped)
        return stripped
    except (ValueError, SyntaxError):
        return repr(stripped).replace("'", '"') if '"' not in stripped else repr(stripped)


def split_gin_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Remove `--gin.NAME=VALUE` arguments from argv; return (rest, gin binding strings)."""
    rest: list[str] = []
    bindings: list[str] = []
    for arg in argv:
        if arg.startswith(GIN_FLAG_PREFIX) and "=" in arg:
            name, value = arg[len(GIN_FLAG_PREFIX):].split("=", 1)
            bindings.append(f"{name} = {_as_gin_value(value)}")
        else:
            rest.append(arg)
    return rest, bindings


def register_configurables() -> None:
    """Register library dataclasses with gin under their own names (idempotent)."""
    import gin

    from t5lite.config import ModelConfig
    from t5lite.parallel.mesh import MeshConfig

    for cls in (ModelConfig, MeshConfig):
        try:
            gin.external_configurable(cls, name=cls.__name__)
        except ValueError:
            pass  # already registered in this process
