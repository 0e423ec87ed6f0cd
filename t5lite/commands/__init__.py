"""t5lite.commands."""
