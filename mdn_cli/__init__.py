"""mdn-cli: image regression with honest uncertainty (CNN backbone + mixture density network)."""

__version__ = "0.1.0"

import time as _time

started_at = _time.monotonic()
"""When mdn was first imported: the start of the process, for the whole run's time estimate."""
