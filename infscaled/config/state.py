"""Where a host's daemons keep their state: shared by the controller (token, database) and the
agent (its credential), so one host's daemons and CLI agree without configuration."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

STATE_DIR_ENV: Final = "INFSCALED_STATE_DIR"


def default_state_dir() -> str:
    """$INFSCALED_STATE_DIR, else ~/.local/state/infscaled."""
    return os.environ.get(STATE_DIR_ENV) or str(Path("~/.local/state/infscaled").expanduser())
