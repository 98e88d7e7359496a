"""The package version (one place; pyproject.toml states the same)."""
__version__ = "0.2.0"
