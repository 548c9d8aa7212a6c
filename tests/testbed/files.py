"""Private files for tests and the demo: passphrases, configs, extra vars."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_private(path: str | os.PathLike[str], data: str | bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to a file created with ``mode`` (never readable by others in between)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)  # an existing file keeps its old mode through O_CREAT
    return path


def write_passphrase_file(path: str | os.PathLike[str]) -> Path:
    """A 0600 file holding a random passphrase followed by a newline."""
    return write_private(path, secrets.token_urlsafe(32) + "\n")
