"""t5lite.train."""
