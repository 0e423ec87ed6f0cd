"""t5lite.models."""
