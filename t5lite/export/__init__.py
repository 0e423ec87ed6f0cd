"""t5lite.export."""
