"""t5lite.data."""
