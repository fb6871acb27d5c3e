"""One workspace per queue directory.

A queue directory's rows (the write-ahead log, the dead letters, fleet mode's spill)
carry no credentials: whoever sends them sends with its own. Two applications of two
workspaces given one directory (one ``CIO_LOGGING_QUEUE_DIR`` in a shared base image is
enough) would send each other's events, personal data, into the wrong workspace. So a
directory records the account it was first opened for (``workspace.json``: the site id,
or for the Pipelines API a digest of the source's key, never a key), and opening it for
another account is refused with a clear error, before any row is read or written. The
endpoint is not part of it: the same site's events sent to another endpoint (a
simulator restarted on another port, a proxy) reach no other tenant.

A directory made by an earlier version has no record: the first opener claims it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

from ..errors import ConfigurationError
from ._sqlite import secure_file

#: The record's file name in the queue directory.
RECORD = "workspace.json"


class WorkspaceMismatchError(ConfigurationError):
    """The queue directory holds another workspace's queue."""


def claim(directory: Path, workspace: str) -> None:
    """Record ``workspace`` (an account: see :attr:`Settings.account`) as the owner of
    ``directory``, or check that it is.

    Raises:
        WorkspaceMismatchError: the directory belongs to another workspace.
        OSError: the record cannot be written or read.
    """
    path = directory / RECORD
    owner = _read(path)
    if owner is None:
        _write(path, workspace)
        owner = _read(path)  # another process may have claimed it first
    if owner is not None and owner != workspace:
        raise WorkspaceMismatchError(
            f"queue_dir {str(directory)!r} holds the queue of workspace {owner!r}; this "
            f"handler sends to {workspace!r}. Its events would go out with these "
            "credentials, so it is not used: give each workspace its own queue_dir (the "
            "default queue_dir is one per workspace)"
        )


def check(directory: Path, workspace: str) -> None:
    """Like :func:`claim`, without recording anything (a directory never claimed
    passes): for the commands that send what a directory holds."""
    owner = _read(directory / RECORD)
    if owner is not None and owner != workspace:
        raise WorkspaceMismatchError(
            f"queue_dir {str(directory)!r} holds the queue of workspace {owner!r}, not of "
            f"{workspace!r}: use the credentials it was written with"
        )


def recorded(directory: Path) -> str | None:
    """The workspace ``directory`` belongs to, if recorded."""
    return _read(directory / RECORD)


def _read(path: Path) -> str | None:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None  # a torn write (a crash while claiming): claimed again
    workspace = value.get("workspace") if isinstance(value, dict) else None
    return workspace if isinstance(workspace, str) else None


def _write(path: Path, workspace: str) -> None:
    # Written aside, then linked to its name: link() fails if the name exists, so of
    # two first openers exactly one claims it, and a reader sees no record or a whole
    # one. The temporary name is the thread's own, so two threads claiming at once
    # never write into one file.
    temporary = path.with_name(f".{RECORD}.{os.getpid()}.{threading.get_ident()}")
    secure_file(temporary)
    try:
        temporary.write_text(json.dumps({"workspace": workspace}) + "\n", "utf-8")
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


__all__ = ["RECORD", "WorkspaceMismatchError", "check", "claim", "recorded"]
