"""The gin edge of the command line: `--gin_file=F` and `--gin.NAME=VALUE`.

Library code never imports gin. Commands call `register_configurables()`, then
`parse_gin(files, bindings)`, then build the configured dataclasses with `configured(name)`.

Unlike T5X, string values need no escaped quotes on the command line: a value that is not a gin
literal (number, bool, None, tuple/list/dict, quoted string) nor a reference (`@name`,
`%MACRO`) is taken as a string.

Gin files are looked up as given, then relative to the current directory, then relative to the
t5lite checkout (so `--gin_file=gin/demo.gin` and `include "gin/runs/pretrain.gin"` work from
anywhere).

Example::

    >>> split_gin_overrides(["--model_dir=x", "--gin.MIXTURE_OR_TASK_NAME=demo_ul2"])
    (['--model_dir=x'], ['MIXTURE_OR_TASK_NAME = "demo_ul2"'])
    >>> register_configurables()
    >>> parse_gin(["gin/demo.gin"], ['TRAIN_STEPS = 10'])
    >>> configured("TrainConfig")().train_steps
    10
"""

from __future__ import annotations

import ast
import os
import re
import tokenize
from collections.abc import Callable, Sequence
from typing import Any

from t5lite.errors import ConfigError, UserError

GIN_FLAG_PREFIX = "--gin."

# name -> gin-wrapped class (calling it applies the bindings)
_CONFIGURABLES: dict[str, Callable[..., Any]] = {}


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


def _library_classes() -> list[type]:
    from t5lite.config import ModelConfig
    from t5lite.data.pipeline import DataConfig
    from t5lite.data.text2text import Text2TextConfig
    from t5lite.parallel.mesh import MeshConfig
    from t5lite.train.config import TrainConfig
    from t5lite.train.distill import DistillConfig
    from t5lite.train.teacher_forced_eval import EvalConfig
    from t5lite.train.losses import LossConfig
    from t5lite.train.optim import OptimizerConfig
    from t5lite.train.schedules import ScheduleConfig

    return [ModelConfig, MeshConfig, TrainConfig, OptimizerConfig, ScheduleConfig, LossConfig,
            DataConfig, EvalConfig, DistillConfig, Text2TextConfig]


def register_configurables() -> None:
    """Register library dataclasses with gin under their own names (idempotent)."""
    import gin

    for cls in _library_classes():
        if cls.__name__ in _CONFIGURABLES:
            continue
        try:
            _CONFIGURABLES[cls.__name__] = gin.external_configurable(cls, name=cls.__name__)
        except ValueError:
            pass  # registered elsewhere in this process under the same name


def configured(name: str) -> Callable[..., Any]:
    """The gin-configured constructor of a registered class (call it to apply bindings)."""
    register_configurables()
    if name not in _CONFIGURABLES:
        raise KeyError(f"{name} is not registered with gin")
    return _CONFIGURABLES[name]


def build(name: str, **kwargs: Any) -> Any:
    """`configured(name)(**kwargs)`, turning missing gin values into a UserError.

    A value left at `%gin.REQUIRED` (directly or through a macro such as
    `MIXTURE_OR_TASK_NAME = %gin.REQUIRED`) is reported with the field it was meant for.
    """
    import gin

    try:
        value = configured(name)(**kwargs)
    except UserError as e:
        # gin appends "In call to configurable ..." lines to the message: keep the first line.
        # (gin re-raises through a proxy subclass, so rebuild the plain t5lite error type).
        error_type = ConfigError if isinstance(e, ConfigError) else UserError
        raise error_type(str(e).split("\n")[0].strip()) from None
    except (TypeError, ValueError) as e:
        text = str(e).split("\n")[0]
        if "required" in str(e).lower() or "missing" in text:
            raise UserError(f"gin: {name} is missing a value: {text}. Set it in a gin file or "
                            "with --gin.NAME=VALUE.") from None
        raise
    missing = _required_fields(value, gin.REQUIRED, name)
    if missing:
        raise UserError(f"gin: {missing[0]} has no value (it is %gin.REQUIRED, e.g. through a "
                        "macro such as MIXTURE_OR_TASK_NAME); set it in a gin file or with "
                        "--gin.NAME=VALUE, e.g. --gin.MIXTURE_OR_TASK_NAME=demo_span_corruption.")
    return value


def _required_fields(value: Any, sentinel: object, prefix: str) -> list[str]:
    import dataclasses

    if value is sentinel:
        return [prefix]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: list[str] = []
        for field in dataclasses.fields(value):
            out += _required_fields(getattr(value, field.name), sentinel,
                                    f"{prefix}.{field.name}")
        return out
    return []


def search_paths() -> list[str]:
    """Directories where gin files are looked up: cwd, then the t5lite checkout."""
    import t5lite

    root = os.path.dirname(os.path.dirname(os.path.abspath(t5lite.__file__)))
    return [os.getcwd(), root]


def resolve_gin_file(path: str) -> str:
    if os.path.isabs(path):
        candidates = [path]
    else:
        candidates = [os.path.join(d, path) for d in search_paths()]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"gin file {path!r} not found (looked in {', '.join(search_paths())}).")


def _line_of(error: BaseException, text: str) -> int | None:
    location = getattr(error, "location", None)
    if location is not None and getattr(location, "line_num", None):
        return int(location.line_num)
    if isinstance(error, SyntaxError) and error.lineno:
        return int(error.lineno)
    if isinstance(error, tokenize.TokenError) and len(error.args) > 1:
        return int(error.args[1][0]) - 1 or 1
    m = re.search(r"line (\d+)", text)
    return int(m.group(1)) if m else None


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, tokenize.TokenError):
        return f"{error.args[0]} (unbalanced brackets or quotes?)"
    first = text.split("\n")[0]
    return first.replace("\n", " ") or type(error).__name__


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parse gin files then bindings (later ones win), after `gin.clear_config()`.

    Raises UserError naming the file and line of malformed gin, unknown configurables or
    parameters, and bad command-line bindings.
    """
    import gin

    register_configurables()
    gin.clear_config()
    for d in search_paths():
        gin.add_config_file_search_path(d)
    for path in files:
        resolved = resolve_gin_file(path)
        try:
            gin.parse_config_file(resolved)
        except (SyntaxError, ValueError, TypeError, tokenize.TokenError, OSError) as e:
            line = _line_of(e, str(e))
            where = f"{path}, line {line}" if line else path
            raise UserError(f"malformed gin in {where}: {_describe(e)}") from None
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except (SyntaxError, ValueError, TypeError, tokenize.TokenError) as e:
            raise UserError(f"bad --gin binding `{binding}`: {_describe(e)}") from None


def operative_config() -> str:
    """The gin config that was actually used (call after the configurables were built)."""
    import gin

    return gin.operative_config_str()
