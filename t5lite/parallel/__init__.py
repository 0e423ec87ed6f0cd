"""t5lite.parallel."""
