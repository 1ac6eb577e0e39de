"""mdn-cli: image regression with honest uncertainty (CNN backbone + mixture density network)."""

__version__ = "0.1.0"
