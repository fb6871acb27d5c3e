"""``state.json``: what the delivering process last recorded, for operators and the CLI.

The process holding a queue directory's delivery lock rewrites this small file on every
breaker transition and at most every few seconds otherwise: pid, breaker state, last
error, counters. ``cio-logging status`` reads it without disturbing that process.
Written atomically (a new file renamed over the old), 0600, JSON only.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from .store import inherited_owner

STATE_FILE = "state.json"


def write_state(queue_dir: Path, state: dict[str, Any]) -> None:
    """Replace the record atomically; failures are ignored (it is advisory)."""
    target = queue_dir / STATE_FILE
    # One temporary file per thread: the sender's loop and its send pool both write
    # the record, and a name shared by the process let one thread unlink the other's
    # file and rename a half-written one into place.
    temporary = queue_dir / f".{STATE_FILE}.{os.getpid()}.{threading.get_ident()}"
    try:
        with contextlib.suppress(FileNotFoundError):  # left by a thread with our ids
            temporary.unlink()
        # A new file, never through a link: root writes it in its user's directory.
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
        descriptor = os.open(temporary, flags, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            os.fchmod(stream.fileno(), 0o600)
            owner = inherited_owner(queue_dir)
            if owner is not None:  # the directory's user must be able to replace it
                os.fchown(stream.fileno(), *owner)
            json.dump(state, stream, separators=(",", ":"))
        os.replace(temporary, target)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()


def read_state(queue_dir: Path) -> dict[str, Any] | None:
    """The last record, or None when there is none or it is not ours."""
    try:
        state = json.loads((queue_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None
