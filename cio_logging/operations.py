"""What the operator commands do, without the printing: ``cli.py`` parses and prints.

Every function here takes plain values and returns a dataclass or a dict, so the
commands can be tested without a terminal and their JSON output is exactly these.

Safety with a live application on the same queue directory:

* reading (``status``, ``dlq count/list/show``) never takes a lock: SQLite readers do
  not block the application's writers, and the delivery lock is only probed;
* ``drain`` takes the application's own ``delivery.lock`` (through a handler, see
  :func:`drain`), so at most one process ever sends from the write-ahead log;
* ``dlq replay`` puts entries back in the queue (the application's sender delivers
  them, under its rules) and ``dlq purge`` deletes them; both take ``dlq.lock`` so two
  operators cannot replay or purge the same entries at once.

Nothing here raises for an expected condition without saying so: a missing queue
directory is :class:`QueueDirectoryError`, a lock held by another process is
:class:`LockHeldError`, bad settings are ``ConfigurationError``.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import pwd
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from .config import (
    ENV_API,
    ENV_API_KEY,
    ENV_CDP_API_KEY,
    ENV_QUEUE_DIR,
    ENV_QUEUE_URL,
    ENV_SITE_ID,
    PIPELINES,
    TUNABLE_OPTIONS,
    Settings,
    resolve_settings,
)
from .errors import CIOLoggingError, ConfigurationError
from .events import event_from_dict
from .process_lock import DeliveryLock
from .state_record import read_state
from .store import (
    DeadLetter,
    DeadLetterArchive,
    DeadLetterReason,
    DeadLetterStore,
    Row,
    WriteAheadLog,
    encode_row,
)
from .store.owner import check as check_owner
from .window import WINDOW_SECONDS, past_window

WAL_DIR, DEAD_DIR, DELIVERY_LOCK, DLQ_LOCK = "wal", "dead", "delivery.lock", "dlq.lock"

# Read-only commands need no API key: the default queue directory depends on the site
# id and the endpoint only. This stands in for it and is never sent anywhere.
_UNUSED_API_KEY = "unused-by-read-only-commands"
_UNUSED_SITE_ID = "unused-by-read-only-commands"
# How often drain looks at its handler's progress.
_DRAIN_POLL_SECONDS = 0.1
# Drain's handler looks for the lock and for retries that came due this often, unless
# the operator sets flush_interval.
_DRAIN_FLUSH_INTERVAL = 0.2


class ExitCode(enum.IntEnum):
    """The command's exit status; documented in ``--help`` and docs/reference/cli.md."""

    OK = 0
    INCOMPLETE = 1  # work left: events not delivered, entries not replayed, not found
    USAGE = 2  # bad arguments or settings, or a purge refused without --yes
    NO_QUEUE = 3  # the queue directory is missing, unreadable or not a queue
    LOCKED = 4  # another process held the lock for the whole time bound
    AUTH = 5  # refused by the set-up: credentials (401/403) or TLS verification
    INTERRUPTED = 130  # SIGINT or SIGTERM: stopped early, nothing lost


class QueueDirectoryError(CIOLoggingError):
    """The queue directory is missing, unreadable, not writable, or not a queue."""


class LockHeldError(CIOLoggingError):
    """Another process holds a lock this command needs."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


# -- settings and the queue directory --------------------------------------------------


@dataclass(frozen=True)
class FleetLocation:
    """Fleet mode's queue: a workspace's rows in PostgreSQL (``--queue-url``)."""

    url: str = field(repr=False)
    workspace: str

    def database(self) -> Any:
        """A :class:`~cio_logging.store.postgres.Database`, checked (schema made)."""
        from .store.postgres import Database

        database = Database(self.url)
        database.check()  # one clear (scrubbed) error if it cannot be reached
        return database


#: Where a command reads dead letters: a queue directory, or a fleet's database.
Location = Path | FleetLocation


def fleet_location(settings: Settings) -> FleetLocation | None:
    """The fleet's queue when ``settings`` name one (queue_url), else None."""
    if settings.queue_url is None:
        return None
    return FleetLocation(settings.queue_url, settings.workspace)


def operator_settings(
    *,
    site_id: str | None,
    api_key: str | None,
    region: str | None,
    queue_dir: str | None,
    track_url: str | None,
    ca_bundle: str | None,
    options: Mapping[str, Any],
    sends: bool,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve settings from flags and environment exactly as the handler does.

    Commands that do not send (``sends=False``) need no API key.

    Raises:
        ConfigurationError: a credential is missing or a value is invalid.
    """
    env = os.environ if environ is None else environ
    pipelines = str(options.get("api") or env.get(ENV_API) or "").strip().lower() == PIPELINES
    key_variable = ENV_CDP_API_KEY if pipelines else ENV_API_KEY
    explicit = explicit_queue_dir(queue_dir, env) is not None
    if not sends and explicit and not (site_id or env.get(ENV_SITE_ID)):
        # The site id only names the default directory: with the directory given, a
        # command that sends nothing needs none (every other setting is still checked).
        site_id = _UNUSED_SITE_ID
    if not sends and not (api_key or env.get(key_variable)):
        if pipelines and explicit_queue_dir(queue_dir, env) is None:
            # The default directory of a Pipelines source is named by its key.
            raise ConfigurationError(
                "api_key is missing: pass api_key= or set CUSTOMERIO_CDP_API_KEY "
                "(or give --queue-dir or CIO_LOGGING_QUEUE_DIR)"
            )
        api_key = _UNUSED_API_KEY
    return resolve_settings(
        site_id,
        api_key,
        region=region,
        queue_dir=queue_dir,
        track_url=track_url,
        ca_bundle=ca_bundle,
        options=options,
        environ=env,
    )


def explicit_queue_dir(
    queue_dir: str | None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """The queue directory from ``--queue-dir`` or its environment variable, if given."""
    env = os.environ if environ is None else environ
    chosen = queue_dir or env.get(ENV_QUEUE_DIR) or None
    return None if chosen is None else Path(chosen).expanduser()


def check_queue_dir(path: Path, *, writable: bool = False) -> Path:
    """Make sure ``path`` is an existing, readable queue directory; never create it.

    Opening the stores would create the directories, so a mistyped path would silently
    become an empty queue: check first.

    Raises:
        QueueDirectoryError: missing, not a directory, unreadable, not writable (when
            ``writable``), holding neither ``wal/`` nor ``dead/``, or holding a file
            or directory that the command must open and this user cannot (another
            user's, left by a command run as root).
    """
    if not path.exists():
        raise QueueDirectoryError(f"queue directory {path} does not exist")
    if not path.is_dir():
        raise QueueDirectoryError(f"{path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise QueueDirectoryError(f"queue directory {path} is not readable by this user")
    for store in (path / WAL_DIR, path / DEAD_DIR):
        if store.is_dir() and not os.access(store, os.R_OK | os.W_OK | os.X_OK):
            raise QueueDirectoryError(not_writable_message(store))
    if not any((path / name / "cache.db").is_file() for name in (WAL_DIR, DEAD_DIR)):
        raise QueueDirectoryError(
            f"{path} is not a cio_logging queue directory (no {WAL_DIR}/ or {DEAD_DIR}/ in it)"
        )
    # Every command opens the stores, and opening one writes (its open.lock, SQLite's
    # shared memory): a file another user left there fails it half-way otherwise.
    needed = [path / name / file for name in (WAL_DIR, DEAD_DIR) for file in _STORE_FILES]
    if writable:
        for directory in (path, path / WAL_DIR, path / DEAD_DIR):
            if directory.exists() and not os.access(directory, os.W_OK | os.X_OK):
                raise QueueDirectoryError(f"{directory} is not writable by this user")
        needed += [path / DELIVERY_LOCK, path / DLQ_LOCK]
    for file in needed:
        if file.name.endswith(".lock") and file.is_symlink():
            raise QueueDirectoryError(_symlink_message(file))
        if _present_and_not_writable(file):
            raise QueueDirectoryError(not_writable_message(file))
    return path


def _present_and_not_writable(file: Path) -> bool:
    """Whether ``file`` exists and this user cannot read and write it.

    SQLite deletes a store's ``-wal`` and ``-shm`` files when its last connection
    closes and makes them again on the next open, so with other commands running they
    come and go between two looks. Asking for access first and for existence second
    takes a file that vanished in between for a missing one, not an unwritable one; one
    that appeared in between is asked about again.
    """
    return all(
        not os.access(file, os.R_OK | os.W_OK) and file.exists()
        for _ in range(5)  # refused and still there, five times running
    )


def _symlink_message(path: Path) -> str:
    return (
        f"{path} is a symbolic link; cio-logging never opens a lock file through one "
        "(it writes its pid into it): remove the link"
    )


# The files in wal/ and dead/ that opening a store opens for writing.
_STORE_FILES = ("open.lock", "cache.db", "cache.db-wal", "cache.db-shm")


def not_writable_message(path: Path) -> str:
    """One line on a file this user cannot write: whose it is and what to do."""
    try:
        status = path.stat()
        directory = path.parent.stat()
    except OSError as exc:
        return f"{path} cannot be opened by this user ({exc.strerror})"
    owner, directory_owner = _user_name(status.st_uid), _user_name(directory.st_uid)
    return (
        f"{path} is owned by {owner} (mode {stat.S_IMODE(status.st_mode):04o}) and is not "
        f"writable by this user ({_user_name(os.geteuid())}); a command run as {owner} "
        f"left it: run `chown {'-R ' if path.is_dir() else ''}{directory_owner}: {path}` "
        f"as root, or run this command as {owner}"
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def lock_holder(queue_dir: Path, name: str = DELIVERY_LOCK) -> int | None:
    """The pid holding ``queue_dir/name``, or None when nobody holds it.

    Probes with a shared, non-blocking flock and lets go at once; never creates or
    writes the file, so the holder's pid in it stays as it wrote it.
    """
    try:
        descriptor = os.open(queue_dir / name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            text = os.read(descriptor, 64).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else -1  # held; pid not written yet
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _exclusive(queue_dir: Path, name: str, purpose: str) -> Iterator[None]:
    lock = DeliveryLock(queue_dir / name)
    try:
        acquired = lock.try_acquire()
    except PermissionError:  # made another user's since check_queue_dir looked
        raise QueueDirectoryError(not_writable_message(queue_dir / name)) from None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise QueueDirectoryError(_symlink_message(queue_dir / name)) from None
    if not acquired:
        pid = lock_holder(queue_dir, name)
        raise LockHeldError(
            f"another process (pid {pid}) is replaying or purging dead letters in "
            f"{queue_dir} ({name}); {purpose} later",
            pid,
        )
    try:
        yield
    finally:
        lock.release()


# -- times -------------------------------------------------------------------------------

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_time(text: str, now: float | None = None) -> float:
    """A moment as Unix seconds, from ISO 8601 or an age such as ``30m``, ``2h``, ``3d``.

    An ISO time without a zone is local time. An age counts back from ``now``.

    Raises:
        ValueError: neither form.
    """
    moment = time.time() if now is None else now
    match = _AGE.match(text)
    if match:
        return moment - float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO 8601 time (2024-05-01T12:00:00Z) "
            "nor an age (30s, 30m, 2h, 3d, 1w)"
        ) from None
    return parsed.timestamp()


def iso_time(moment: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC (``...Z``), the form JSON output uses."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- status --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueStatus:
    """A queue directory at a glance, plus what its delivering process last recorded."""

    queue_dir: str
    queued: int
    oldest_logged_at: str | None
    oldest_age_seconds: float | None
    dead_letters: int
    # Read from the queue itself (counted with each acknowledgement): events delivered
    # from this directory by every process since it was created; None for a queue
    # written before it was counted.
    delivered_total: int | None
    queue_bytes: int  # what the shedding limits compare with (SQLite pages of wal/)
    disk_bytes: int  # every file in the directory
    disk_free_bytes: int  # on the file system that holds it
    delivering_pid: int | None  # who holds delivery.lock now
    breaker: str | None  # as the delivering process last recorded it
    last_error: str | None
    last_error_at: str | None
    delivery_paused: str | None
    recorded_by_pid: int | None
    recorded_at: str | None
    recorded_age_seconds: float | None
    recorder_is_delivering: bool  # False: the record is from a process gone since
    counters: dict[str, int]
    # Events are queued and no process holds delivery.lock: nothing sends them (an
    # application with deliver="none" and no ``cio-logging deliver`` running).
    events_wait_for_a_sender: bool = False
    # Why the sending process sends nothing now, as it recorded it, while it lasts:
    # {"reason": retry_after | auth | config | breaker, "until", "seconds", "message"}.
    hold: dict[str, Any] | None = None
    # The oldest waiting event was logged more than 72 hours ago: Customer.io will
    # record it but trigger no campaign with it.
    oldest_past_window: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def queue_status(queue_dir: Path, now: float | None = None) -> QueueStatus:
    """Read a queue directory without disturbing the process that delivers from it.

    Raises:
        QueueDirectoryError: see :func:`check_queue_dir`.
        QueueError: a store could not be opened.
    """
    check_queue_dir(queue_dir)
    moment = time.time() if now is None else now
    queued = queue_bytes = dead_letters = 0
    oldest: float | None = None
    delivered: int | None = None
    if (queue_dir / WAL_DIR).is_dir():
        # fsync=None: keep the application's durability setting; read, never change.
        wal = WriteAheadLog(queue_dir / WAL_DIR, fsync=None)
        try:
            queued, queue_bytes = len(wal), wal.volume()
            oldest = wal.oldest_logged_at()
            delivered = wal.delivered_total()
        finally:
            wal.close()
    if (queue_dir / DEAD_DIR).is_dir():
        dead = DeadLetterStore(queue_dir / DEAD_DIR, fsync=None)
        try:
            dead_letters = len(dead)
        finally:
            dead.close()
    state = read_state(queue_dir) or {}
    holder = lock_holder(queue_dir)
    recorded_by = state.get("pid") if isinstance(state.get("pid"), int) else None
    updated_at = _number_or_none(state.get("updated_at"))
    counters = {
        name: int(state[name])
        for name in ("delivered", "dead_lettered", "requests", "failed_requests")
        if isinstance(state.get(name), int)
    }
    return QueueStatus(
        queue_dir=str(queue_dir),
        queued=queued,
        oldest_logged_at=iso_time(oldest),
        oldest_age_seconds=None if oldest is None else round(max(0.0, moment - oldest), 3),
        dead_letters=dead_letters,
        delivered_total=delivered,
        queue_bytes=queue_bytes,
        disk_bytes=_directory_bytes(queue_dir),
        disk_free_bytes=shutil.disk_usage(queue_dir).free,
        delivering_pid=holder,
        breaker=_string_or_none(state.get("breaker")),
        last_error=_string_or_none(state.get("last_error")),
        last_error_at=iso_time(_number_or_none(state.get("last_error_at"))),
        delivery_paused=_string_or_none(state.get("delivery_paused")),
        recorded_by_pid=recorded_by,
        recorded_at=iso_time(updated_at),
        recorded_age_seconds=None if updated_at is None else round(moment - updated_at, 3),
        recorder_is_delivering=recorded_by is not None and recorded_by == holder,
        counters=counters,
        events_wait_for_a_sender=queued > 0 and holder is None,
        hold=current_hold(state, moment) if holder is not None else None,
        oldest_past_window=oldest is not None and moment - oldest > WINDOW_SECONDS,
    )


def current_hold(state: Mapping[str, Any], now: float) -> dict[str, Any] | None:
    """The hold a sender recorded (see sender/state.py), if it has not ended yet, with
    its seconds left from ``now`` and its end as ISO time."""
    hold = state.get("hold")
    if not isinstance(hold, dict):
        return None
    until = _number_or_none(hold.get("until"))
    if until is None or until <= now:
        return None
    return {
        "reason": _string_or_none(hold.get("reason")),
        "until": iso_time(until),
        "seconds": round(until - now, 1),
        "message": _string_or_none(hold.get("message")),
    }


def fleet_status(location: FleetLocation, now: float | None = None) -> dict[str, Any]:
    """A workspace's queue in the fleet's database: rows, dead letters, who sends (the
    lease holder: host, pid, since when) and what the sender last recorded (breaker,
    last error, pauses). Read from any host; disturbs no one.

    Raises:
        QueueError: the database cannot be reached (the text holds no password).
    """
    from .store.postgres import PostgresLease, SenderState, display_url, fleet_summary

    moment = time.time() if now is None else now
    database = location.database()
    try:
        workspace = location.workspace
        # Times on this host's clock, from the database's (one clock for the fleet).
        summary = fleet_summary(database, workspace)
        queued, oldest = summary["queued"], summary["oldest_logged_at"]
        ((dead,),) = database.run("count_dead_letters", {"workspace": workspace})
        info = PostgresLease(database, workspace, seconds=1.0, log=None).info()
        state = SenderState(database, workspace, None).read() or {}
    finally:
        database.close()
    recorded_at = _number_or_none(state.get("recorded_at"))
    return {
        "store": "postgresql",
        "queue_url": display_url(location.url),
        "workspace": workspace,
        "queued": int(queued),
        "oldest_logged_at": iso_time(_number_or_none(oldest)),
        "oldest_age_seconds": None if oldest is None else round(max(0.0, moment - oldest), 3),
        "oldest_past_window": oldest is not None and moment - float(oldest) > WINDOW_SECONDS,
        "dead_letters": int(dead),
        # Rows in hosts' local spills (committed there while the database did not
        # answer), as each host last reported them: on their way into the queue.
        "spilled": [
            {
                "host": spill["host"],
                "directory": spill["directory"],
                "rows": spill["rows"],
                "oldest_logged_at": iso_time(spill["oldest_logged_at"]),
                "reported_age_seconds": round(max(0.0, moment - spill["reported_at"]), 3),
            }
            for spill in summary["spills"]
        ],
        "sender": None
        if info is None
        else {
            "host": info.host,
            "pid": info.pid,
            "term": info.term,
            "since": iso_time(info.since),
            "expires_at": iso_time(info.expires_at),
            "holds_lease": info.valid,
        },
        "breaker": _string_or_none(state.get("breaker")),
        "last_error": _string_or_none(state.get("last_error")),
        "last_error_at": iso_time(_number_or_none(state.get("last_error_at"))),
        "delivery_paused": _string_or_none(state.get("delivery_paused")),
        "hold": current_hold(state, moment) if info is not None and info.valid else None,
        "recorded_by": None
        if not state
        else {"host": _string_or_none(state.get("host")), "pid": state.get("pid")},
        "recorded_at": iso_time(recorded_at),
        "recorded_age_seconds": None if recorded_at is None else round(moment - recorded_at, 3),
        "counters": {
            name: int(state[name])
            for name in ("delivered", "dead_lettered", "requests", "failed_requests")
            if isinstance(state.get(name), int)
        },
    }


def _directory_bytes(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):  # a SQLite -journal file may vanish meanwhile
                total += os.stat(os.path.join(root, name)).st_size
    return total


def _string_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _number_or_none(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# -- dead letters: reading -----------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command works on: every filter given must match."""

    event: str | None = None
    reason: str | None = None
    since: float | None = None
    before: float | None = None
    ids: tuple[str, ...] | None = None
    limit: int | None = None


def _check(location: Location, *, writable: bool = False) -> None:
    if isinstance(location, Path):
        check_queue_dir(location, writable=writable)


@contextlib.contextmanager
def _dead_letters(queue_dir: Location) -> Iterator[DeadLetterArchive | None]:
    if isinstance(queue_dir, FleetLocation):
        from .store.postgres import PostgresDeadLetters

        database = queue_dir.database()
        try:
            yield PostgresDeadLetters(database, queue_dir.workspace, Path("."))
        finally:
            database.close()
        return
    # A queue directory whose handler never dead-lettered may lack dead/: say "none"
    # rather than create it.
    if not (queue_dir / DEAD_DIR).is_dir():
        yield None
        return
    store = DeadLetterStore(queue_dir / DEAD_DIR, fsync=None)
    try:
        yield store
    finally:
        store.close()


def _select(store: DeadLetterArchive | None, selection: Selection) -> list[DeadLetter]:
    if store is None:
        return []
    return store.select(
        event=selection.event,
        reason=selection.reason,
        since=selection.since,
        before=selection.before,
        keys=selection.ids,
        limit=selection.limit,
    )


def count_dead_letters(
    queue_dir: Location, by: Literal["event", "reason"] | None = None
) -> dict[str, Any]:
    """``{"total": n, "by": by, "counts": {group: n}}``, largest group first.

    Raises:
        QueueDirectoryError: see :func:`check_queue_dir`.
        QueueError: the store could not be read.
    """
    _check(queue_dir)
    with _dead_letters(queue_dir) as store:
        if store is None:
            return {"total": 0, "by": by, "counts": {}}
        counts = store.count(by=by)
    total = sum(counts.values())
    if by is None:
        return {"total": total, "by": None, "counts": {}}
    ordered = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    return {"total": total, "by": by, "counts": ordered}


def letter_summary(letter: DeadLetter) -> dict[str, Any]:
    """One dead letter without its event data (which is personal data)."""
    return {
        "id": letter.key,
        "event": letter.event_name,
        "error_type": letter.error_type,
        "status": letter.status,
        "message": letter.message,
        "attempts": letter.attempts,
        "first_failure_at": iso_time(letter.first_failure_at),
        "last_failure_at": iso_time(letter.last_failure_at),
        # Why it was dead-lettered first (the reason above is the latest), and the
        # replays that did not deliver it, oldest first.
        "original": None if letter.original is None else _reason_dict(letter.original),
        "replay_count": letter.replay_count,
        "replays": [
            {
                "at": iso_time(record.at),
                "error_type": record.error_type,
                "status": record.status,
                "message": record.message,
                "failed_at": iso_time(record.failed_at),
            }
            for record in letter.replays
        ],
    }


def _reason_dict(reason: DeadLetterReason) -> dict[str, Any]:
    return {
        "error_type": reason.error_type,
        "status": reason.status,
        "message": reason.message,
        "at": iso_time(reason.at),
    }


def letter_detail(letter: DeadLetter) -> dict[str, Any]:
    """One dead letter with the whole stored event."""
    detail = letter_summary(letter)
    detail["stored_event"] = letter.event
    if letter.event is not None:
        logged_at = _number_or_none(letter.event.get("logged_at"))
        detail["logged_at"] = iso_time(logged_at)
    return detail


def list_dead_letters(queue_dir: Location, selection: Selection) -> list[dict[str, Any]]:
    """Summaries of the matching dead letters, oldest key first.

    Raises:
        QueueDirectoryError: see :func:`check_queue_dir`.
        QueueError: the store could not be read.
    """
    _check(queue_dir)
    with _dead_letters(queue_dir) as store:
        return [letter_summary(letter) for letter in _select(store, selection)]


def show_dead_letter(queue_dir: Location, key: str) -> dict[str, Any] | None:
    """One dead letter in full, or None when there is no such id.

    Raises:
        QueueDirectoryError: see :func:`check_queue_dir`.
        QueueError: the store could not be read.
    """
    _check(queue_dir)
    with _dead_letters(queue_dir) as store:
        letter = None if store is None else store.get(key)
        return None if letter is None else letter_detail(letter)


# -- dead letters: purge -------------------------------------------------------------------


def select_dead_letters(queue_dir: Location, selection: Selection) -> list[DeadLetter]:
    """The entries a purge or a replay would work on.

    Raises:
        QueueDirectoryError: see :func:`check_queue_dir`.
        QueueError: the store could not be read.
    """
    _check(queue_dir)
    with _dead_letters(queue_dir) as store:
        return _select(store, selection)


def purge_dead_letters(queue_dir: Location, letters: Sequence[DeadLetter]) -> int:
    """Delete these entries for good; returns how many were still there.

    Raises:
        QueueDirectoryError: see :func:`check_queue_dir`.
        LockHeldError: a replay or another purge is running on this directory.
    """
    _check(queue_dir, writable=True)
    with contextlib.ExitStack() as cleanup:
        if isinstance(queue_dir, Path):
            cleanup.enter_context(_exclusive(queue_dir, DLQ_LOCK, "purge"))
        store = cleanup.enter_context(_dead_letters(queue_dir))
        return 0 if store is None else store.purge(letters)


# -- dead letters: replay -----------------------------------------------------------------


@dataclass
class ReplayEntry:
    """One selected dead letter: what the replay did with it and what it lands behind.

    Ids, names and times only: never event data, never a person's identifier.
    ``ahead_of``: the calls of its person still queued, which it goes ahead of.
    ``after``: calls of its person delivered after it was dead-lettered (the first
    ones; ``after_count`` counts all), which it now lands behind. ``outcome``:
    ``queued`` (put back), ``refused`` (a delete of its person was delivered after
    it: not replayed without ``--after-delete``), ``would_queue`` (dry run); with
    ``--wait``: ``delivered``, ``dead_lettered`` (came back, ``reason``) or
    ``still_queued`` at the bound.
    """

    id: str
    event: str | None
    outcome: str
    ahead_of: int = 0
    after: list[dict[str, Any]] = field(default_factory=list)
    after_count: int = 0
    reason: str | None = None


@dataclass
class ReplayReport:
    """What a replay did. Ids only: never event data."""

    dry_run: bool
    waited: bool = False
    selected: int = 0
    entries: list[ReplayEntry] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # stored event is None: skipped
    missing_ids: list[str] = field(default_factory=list)  # asked for by --id, not found
    sender_pid: int | None = None  # who holds delivery.lock (-1: unknown): it sends them
    auth_error: str | None = None
    elapsed_seconds: float = 0.0
    interrupted: bool = False
    left_in_store: int = 0  # dead letters in the store when the replay ended, any match
    # Selected entries stamped more than 72 hours ago: Customer.io records them when
    # they arrive, but triggers no campaign from them. Counted before anything is sent.
    past_window: int = 0

    def ids(self, outcome: str) -> list[str]:
        return [entry.id for entry in self.entries if entry.outcome == outcome]

    @property
    def done(self) -> int:
        """Entries settled so far: put back, or (with --wait) delivered or back."""
        settled = (
            {"queued", "delivered", "dead_lettered"}
            if not self.waited
            else {
                "delivered",
                "dead_lettered",
            }
        )
        return sum(1 for entry in self.entries if entry.outcome in settled)

    def exit_code(self) -> ExitCode:
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if self.auth_error is not None:
            return ExitCode.AUTH
        return ExitCode.INCOMPLETE if self.work_left() is not None else ExitCode.OK

    def work_left(self) -> str | None:
        """What this replay left to do, in one line, or None when nothing is left.

        A replay that selected nothing while dead letters remain is work left too:
        the runbook's ``--reason max_attempts`` finding nothing must not read as done.
        """
        parts = []
        if self.selected == 0 and self.left_in_store:
            parts.append("no dead letter matched the selection")
        refused = self.ids("refused")
        if refused:
            parts.append(
                f"{len(refused)} not replayed: a delete of the person was delivered after "
                "it (replayed now, it would land after the delete and Customer.io would "
                "create the person again; --after-delete to replay anyway)"
            )
        back = self.ids("dead_lettered")
        if back:
            parts.append(f"{len(back)} came back to the store")
        still = self.ids("still_queued")
        if still:
            parts.append(f"{len(still)} still queued at the bound")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable")
        if self.missing_ids:
            parts.append(f"{len(self.missing_ids)} id(s) not found")
        if not parts:
            return None
        return f"{'; '.join(parts)}; {self.left_in_store} dead letter(s) remain in the store"

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["work_left"] = self.work_left()
        result["exit_code"] = int(self.exit_code())
        return result


class _FleetQueue:
    """A fleet's queue as a replay sees it: rows put back, a person's calls counted."""

    def __init__(self, database: Any, workspace: str) -> None:
        from .store.postgres import requeue_rows

        self._database, self._workspace, self._requeue = database, workspace, requeue_rows

    def requeue(self, rows: Sequence[Row]) -> list[int]:
        return self._requeue(self._database, self._workspace, rows)

    def queued_calls_of(self, person: str) -> int:
        from .store.postgres import _person_column

        params = {"workspace": self._workspace, "person": _person_column(person)}
        ((count,),) = self._database.run("count_person", params)
        return int(count)

    def holds(self, keys: Sequence[str]) -> set[str]:
        found = self._database.run("ids_queued", {"workspace": self._workspace, "ids": list(keys)})
        return {str(key) for (key,) in found}


class _LocalQueue:
    """A queue directory's queue as a replay sees it."""

    def __init__(self, wal: WriteAheadLog) -> None:
        self._wal = wal

    def requeue(self, rows: Sequence[Row]) -> list[int]:
        return self._wal.requeue(rows)

    def queued_calls_of(self, person: str) -> int:
        return self._wal.queued_calls_of(person)

    def holds(self, keys: Sequence[str]) -> set[str]:
        return {key for key in keys if key in self._wal}


@contextlib.contextmanager
def _replay_queue(location: Location) -> Iterator[_LocalQueue | _FleetQueue]:
    if isinstance(location, FleetLocation):
        database = location.database()
        try:
            yield _FleetQueue(database, location.workspace)
        finally:
            database.close()
        return
    # fsync=None: keep the application's durability setting.
    wal = WriteAheadLog(location / WAL_DIR, fsync=None)
    try:
        yield _LocalQueue(wal)
    finally:
        wal.close()


def replay_dead_letters(
    settings: Settings,
    selection: Selection,
    *,
    handler_arguments: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    after_delete: bool = False,
    wait: bool = False,
    timeout: float = 300.0,
    stop: threading.Event | None = None,
    progress: Callable[[ReplayReport], None] | None = None,
) -> ReplayReport:
    """Put chosen dead letters back in the queue, where the sender delivers them.

    Each goes ahead of its person's calls still queued, in the order they were logged,
    with its id (Customer.io deduplicates) and its history (failing again, it comes
    back with its first reason and this replay added). The sender then delivers it
    under the same order rule, breaker, rate cap and outcome policy as every call. An
    entry whose person had a delete delivered after it is not replayed unless
    ``after_delete``: it would land after the delete, and Customer.io would create the
    person again. Nothing is reordered silently: each entry's report names the queued
    calls it goes ahead of and the delivered ones it lands behind.

    ``wait``: deliver them (this process takes the queue directory's delivery.lock, as
    ``drain`` does, or waits for the process holding it) and report each one's
    outcome, within ``timeout``. ``handler_arguments``: the handler's constructor
    arguments for that (default: ``settings``' own).

    Raises:
        QueueDirectoryError: see :func:`check_queue_dir`.
        LockHeldError: another replay or a purge is running on this directory.
    """
    location: Location = fleet_location(settings) or settings.queue_dir
    report = ReplayReport(dry_run=dry_run)
    started = time.monotonic()
    _check(location, writable=not dry_run)
    if isinstance(location, Path) and not dry_run:
        # Sent with these credentials: only a directory of this workspace.
        check_owner(location, settings.account)
    stop = stop or threading.Event()
    with contextlib.ExitStack() as cleanup:
        if not dry_run and isinstance(location, Path):
            cleanup.enter_context(_exclusive(location, DLQ_LOCK, "replay"))
        store = cleanup.enter_context(_dead_letters(location))
        letters = _select(store, selection)
        report.selected = len(letters)
        if selection.ids is not None:
            found = {letter.key for letter in letters}
            report.missing_ids = [key for key in selection.ids if key not in found]
        readable = []
        for letter in letters:
            if letter.event is None:
                report.unreadable.append(letter.key)
            else:
                readable.append(letter)
        # Logging order: a person's replayed calls keep theirs among themselves.
        readable.sort(key=lambda letter: (float(letter.event.get("logged_at") or 0), letter.key))  # type: ignore[union-attr]
        report.past_window = len(
            past_window((event_from_dict(letter.event) for letter in readable), time.time())  # type: ignore[arg-type]
        )
        if readable and store is not None:
            queue = cleanup.enter_context(_replay_queue(location))
            chosen = _judge(readable, queue, report, dry_run=dry_run, after_delete=after_delete)
            if not dry_run and chosen:
                now = time.time()
                queue.requeue(
                    [
                        encode_row(
                            event_from_dict(letter.event),  # type: ignore[arg-type]
                            replayed_at=now,
                            dead_letter=letter.history(),
                        )
                        for letter in chosen
                    ]
                )
                # In the queue first, then out of the store: a crash in between leaves
                # an entry in both (the id deduplicates), never in neither.
                store.purge(chosen)
                if progress is not None:
                    progress(report)
        if isinstance(location, Path):
            report.sender_pid = lock_holder(location)
    if wait and not dry_run and any(entry.outcome == "queued" for entry in report.entries):
        report.waited = True
        _wait_for_replayed(
            settings,
            dict(handler_arguments or {}),
            location,
            report,
            started + timeout,
            stop,
            progress,
        )
    with _dead_letters(location) as store:
        report.left_in_store = 0 if store is None else len(store)
    report.interrupted = stop.is_set()
    report.elapsed_seconds = round(time.monotonic() - started, 3)
    return report


def _judge(
    letters: Sequence[DeadLetter],
    queue: _LocalQueue | _FleetQueue,
    report: ReplayReport,
    *,
    dry_run: bool,
    after_delete: bool,
) -> list[DeadLetter]:
    """Each entry's report; the entries that may go back in the queue."""
    chosen: list[DeadLetter] = []
    for letter in letters:
        person = letter.person
        entry = ReplayEntry(
            letter.key,
            letter.event_name,
            "would_queue" if dry_run else "queued",
            ahead_of=0 if person is None else queue.queued_calls_of(person),
            after=[
                {
                    "call": call.call,
                    "name": call.name,
                    "id": call.id,
                    "delivered_at": iso_time(call.delivered_at),
                }
                for call in letter.later
            ],
            after_count=letter.later_count,
        )
        if letter.landed_after_a_delete and not after_delete:
            entry.outcome = "refused"
            entry.reason = "a delete of its person was delivered after it"
        else:
            chosen.append(letter)
        report.entries.append(entry)
    return chosen


def _wait_for_replayed(
    settings: Settings,
    arguments: dict[str, Any],
    location: Location,
    report: ReplayReport,
    deadline: float,
    stop: threading.Event,
    progress: Callable[[ReplayReport], None] | None,
) -> None:
    """Run a sender on the queue (as drain does) until every replayed entry left it,
    then say where each went: delivered, or back in the dead-letter store."""
    from .handler import CustomerIOHandler  # the handler pulls in the sender: only here

    waiting = {entry.id: entry for entry in report.entries if entry.outcome == "queued"}
    if not arguments:
        arguments = _handler_arguments(settings)
    arguments.setdefault("flush_interval", _DRAIN_FLUSH_INTERVAL)
    arguments["queue_dir"] = str(settings.queue_dir)
    arguments["deliver"] = "thread"
    handler = CustomerIOHandler(**arguments)
    if progress is not None:
        progress(report)  # "0 of N" at once: the first answer may take a while
    try:
        handler.start_delivery()
        with _replay_queue(location) as queue:
            while waiting and not stop.is_set() and time.monotonic() < deadline:
                still = queue.holds(list(waiting))
                for key in [key for key in waiting if key not in still]:
                    _settle(waiting.pop(key), location)
                status = handler.status()
                if status["delivery_paused"]:
                    report.auth_error = status["delivery_paused"]
                    break
                if progress is not None:
                    progress(report)
                if waiting:
                    stop.wait(_DRAIN_POLL_SECONDS)
    finally:
        handler.close()
    for entry in waiting.values():
        entry.outcome = "still_queued"


def _settle(entry: ReplayEntry, location: Location) -> None:
    """A replayed entry left the queue: delivered, or dead-lettered again."""
    with _dead_letters(location) as store:
        letter = None if store is None else store.get(entry.id)
    if letter is None:
        entry.outcome = "delivered"
    else:
        entry.outcome = "dead_lettered"
        entry.reason = f"{letter.error_type}: {letter.message}"


def _handler_arguments(settings: Settings) -> dict[str, Any]:
    """Constructor arguments for a handler with exactly these settings."""
    arguments: dict[str, Any] = {
        "api_key": settings.api_key,
        "region": settings.region,
        "track_url": settings.endpoint.base_url + settings.endpoint.path,
        "ca_bundle": None if settings.ca_bundle is None else str(settings.ca_bundle),
        "api": settings.api,
    }
    if settings.api != PIPELINES:
        arguments["site_id"] = settings.site_id
    if settings.queue_url is not None:
        arguments["queue_url"] = settings.queue_url
    for name in TUNABLE_OPTIONS:
        if name not in ("signal_handlers", "deliver"):
            arguments[name] = getattr(settings, name)
    return arguments


# -- drain ---------------------------------------------------------------------------------


@dataclass
class DrainReport:
    """What a drain did."""

    queue_dir: str
    queued_at_start: int = 0
    queued: int = 0  # left at the end
    delivered: int = 0  # by this process
    dead_lettered: int = 0  # by this process
    held_lock: bool = False  # this process delivered (it held delivery.lock)
    lock_holder_pid: int | None = None  # another process holding delivery.lock (-1: pid unknown)
    breaker: str | None = None
    last_error: str | None = None
    auth_error: str | None = None
    elapsed_seconds: float = 0.0
    interrupted: bool = False

    def exit_code(self) -> ExitCode:
        if self.queued == 0:
            return ExitCode.OK
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if self.auth_error is not None:
            return ExitCode.AUTH
        if not self.held_lock and self.lock_holder_pid is not None:
            return ExitCode.LOCKED
        return ExitCode.INCOMPLETE

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["exit_code"] = int(self.exit_code())
        return result


def _lease_holder(status: Mapping[str, Any]) -> int | None:
    lease = status.get("lease")
    if not isinstance(lease, dict) or not lease.get("valid"):
        return None
    return int(lease["pid"]) if lease.get("pid") else -1


def drain(
    handler_arguments: Mapping[str, Any],
    queue_dir: Path,
    *,
    timeout: float = 300.0,
    stop: threading.Event | None = None,
    progress: Callable[[DrainReport], None] | None = None,
) -> DrainReport:
    """Deliver what ``queue_dir`` holds until it is empty or ``timeout`` passes.

    It runs a :class:`~cio_logging.CustomerIOHandler` on the directory and lets its
    worker do the sending, rather than a loop of its own around ``delivery.lock`` and a
    the API's client: the worker already takes that lock before reading the log (so this
    never sends while a live application does), and it already dead-letters, expires,
    schedules retries, pauses on 401/403, rate-caps and records ``state.json`` exactly
    as the application would. A second copy of that loop could only drift from it.
    Here we watch the handler's ``status()`` and stop at the bound.

    ``handler_arguments`` are the handler's constructor arguments (credentials,
    endpoint, options); ``queue_dir`` must already be one.

    Raises:
        QueueDirectoryError: see :func:`check_queue_dir`.
        ConfigurationError: the settings are invalid.
    """
    from .handler import CustomerIOHandler  # the handler pulls in the worker: only here

    fleet = bool(handler_arguments.get("queue_url") or os.environ.get(ENV_QUEUE_URL))
    if not fleet:  # fleet mode: the queue is the database; queue_dir only holds a spill
        check_queue_dir(queue_dir, writable=True)
    stop = stop or threading.Event()
    started = time.monotonic()
    deadline = started + timeout
    report = DrainReport(queue_dir=str(queue_dir))
    arguments = dict(handler_arguments)
    arguments.setdefault("flush_interval", _DRAIN_FLUSH_INTERVAL)
    arguments["queue_dir"] = str(queue_dir)
    handler = CustomerIOHandler(**arguments)
    try:
        status = handler.status()
        report.queued_at_start = report.queued = status["queued"]
        while report.queued and not stop.is_set():
            status = handler.status()
            report.queued = status["queued"]
            report.delivered = status["delivered"]
            report.dead_lettered = status["dead_lettered"]
            report.breaker = status["breaker"]
            report.last_error = status["last_error"]
            if not status["delivering_process"] and not report.held_lock:
                # Fleet mode: the workspace's lease holder, on any host, sends.
                holder = _lease_holder(status) if fleet else lock_holder(queue_dir)
                # Our own worker may have taken the lock since status() was read.
                if holder is not None and handler.status()["delivering_process"]:
                    holder = None
                    report.held_lock = True
                report.lock_holder_pid = holder
            if status["delivering_process"]:
                report.held_lock, report.lock_holder_pid = True, None
            if status["delivery_paused"]:
                report.auth_error = status["delivery_paused"]
            if progress is not None:
                progress(report)
            if not report.queued or report.auth_error or time.monotonic() >= deadline:
                break
            stop.wait(_DRAIN_POLL_SECONDS)
    finally:
        handler.close()
    report.interrupted = stop.is_set()
    report.elapsed_seconds = round(time.monotonic() - started, 3)
    return report


# How often ``deliver`` looks at its parent and at who holds the lock.
_DELIVER_POLL_SECONDS = 0.2


@dataclass
class DeliverReport:
    """What a ``deliver`` run did, once it stopped."""

    queue_dir: str
    delivered: int = 0  # by this process
    dead_lettered: int = 0  # by this process
    queued: int | None = None  # left at the end: it stays on disk
    held_lock: bool = False  # this process was the sender at some point
    parent_gone: bool = False  # stopped because the supervising process died
    elapsed_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def deliver(
    handler_arguments: Mapping[str, Any],
    queue_dir: Path,
    *,
    stop: threading.Event,
    parent_pid: int | None = None,
    waiting: Callable[[int], None] | None = None,
) -> DeliverReport:
    """Be the sender for ``queue_dir`` (or the fleet's workspace) until ``stop`` is set.

    Like :func:`drain`, it runs a :class:`~cio_logging.CustomerIOHandler` and lets its
    worker send, so the lock, breaker, retries, dead letters and ``state.json`` are the
    application's own; it logs nothing through it. Unlike ``drain`` it never ends by
    itself: it waits for the lock while another process holds it, then sends what any
    process appends. Stopping takes at most ``close_timeout``; what was not sent stays
    on disk. ``parent_pid``: stop too once that process is no longer our parent (the
    supervising application died). ``waiting`` is called once with the holder's pid
    (-1 unknown) when another process holds the lock.

    Raises:
        QueueDirectoryError: an existing queue directory this user cannot use.
        ConfigurationError: the settings are invalid.
    """
    from .handler import CustomerIOHandler  # the handler pulls in the worker: only here

    fleet = bool(handler_arguments.get("queue_url") or os.environ.get(ENV_QUEUE_URL))
    # A sender may start before the application: a missing (or still empty) directory
    # is made by the handler, as the application would make it.
    holds_a_store = any((queue_dir / name / "cache.db").is_file() for name in (WAL_DIR, DEAD_DIR))
    if not fleet and holds_a_store:
        check_queue_dir(queue_dir, writable=True)
    started = time.monotonic()
    report = DeliverReport(queue_dir=str(queue_dir))
    arguments = dict(handler_arguments)
    arguments["queue_dir"] = str(queue_dir)
    arguments["deliver"] = "thread"  # this process is the sender, whatever the environment says
    handler = CustomerIOHandler(**arguments)
    noted = False
    try:
        handler.start_delivery()
        while not stop.wait(_DELIVER_POLL_SECONDS):
            if parent_pid is not None and os.getppid() != parent_pid:
                report.parent_gone = True
                break
            status = handler.status()
            report.held_lock = report.held_lock or status["delivering_process"]
            if not status["delivering_process"] and not noted and waiting is not None:
                holder = _lease_holder(status) if fleet else lock_holder(queue_dir)
                if holder is not None and holder != os.getpid():
                    noted = True
                    waiting(holder)
    finally:
        handler.close()
    status = handler.status()
    report.delivered = status["delivered"]
    report.dead_lettered = status["dead_lettered"]
    report.queued = status["queued"]
    report.elapsed_seconds = round(time.monotonic() - started, 3)
    return report
