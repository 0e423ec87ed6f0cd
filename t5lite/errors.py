"""The one exception type that means "the user asked for something wrong".

Library code raises `UserError` (or its subclasses) with a message that names what was wrong and
how to fix it. The `t5lite` command catches it, prints `error: <message>` as one line on stderr
and exits with status 2 — no traceback, and nothing on disk is touched after the error.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: a config value, a flag, a file. The message is shown as is."""


class ConfigError(UserError):
    """An invalid configuration value (model, mesh, optimiser, task)."""
