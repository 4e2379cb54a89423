"""cowdisk: copy-on-write root disks for microVM sandboxes."""

__version__ = "0.1.0"
"""The package's version (pyproject.toml reads it from here): ``cowdisk --version`` prints it
without importing ``importlib.metadata``."""
