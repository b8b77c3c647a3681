"""Placeholder: filled in by the provider work of issue 4."""
