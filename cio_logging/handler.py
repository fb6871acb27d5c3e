"""``CustomerIOHandler``: the logging.Handler that turns tagged records into Track API events.

On the caller's thread it only maps the record, validates it and appends it to the
write-ahead log; the background worker does all network work. It never raises into
the caller: a bad event is refused with a warning on the ``cio_logging`` logger and
counted; a failing disk goes through ``Handler.handleError``, as for any handler.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from typing import Any

from .config import Settings, resolve_settings
from .errors import InvalidEventError
from .events import EXTRA_KEY, event_from_record
from .wal import DeadLetterStore, WriteAheadLog, secure_directory
from .worker import DeliveryWorker

internal_log = logging.getLogger("cio_logging")

#: Reasons under which ``status()["dropped"]`` counts events that were not queued.
DROP_INVALID = "invalid_event"
DROP_QUEUE_ERROR = "queue_error"

# Set while this thread is inside emit(): anything logged meanwhile (by diskcache,
# by our own warnings) must not come back into the handler.
_inside_emit = threading.local()


class CustomerIOHandler(logging.Handler):
    """Sends log records tagged with ``extra={"cio": {...}}`` to Customer.io, durably.

    Args:
        site_id: Track API site id; default ``$CUSTOMERIO_SITE_ID``.
        api_key: Track API key; default ``$CUSTOMERIO_API_KEY``.
        region: ``"us"`` or ``"eu"``; default ``$CUSTOMERIO_REGION`` or ``"us"``.
        queue_dir: the write-ahead log's directory; default ``$CIO_LOGGING_QUEUE_DIR``
            or a persistent per-user directory (never a temporary one).
        track_url: replaces the Track API base URL (a proxy, the simulator); default
            ``$CIO_LOGGING_TRACK_URL``.
        ca_bundle: CA file for TLS verification, winning over ``REQUESTS_CA_BUNDLE``;
            default ``$CIO_LOGGING_CA_BUNDLE``.
        level: the handler's level, as for any handler.
        **options: tunables (``flush_timeout``, ``close_timeout``, ``request_timeout``,
            ``flush_interval``, ``batch_size``, ``max_backoff``, ``fsync``); see README.

    Raises:
        ConfigurationError: a credential is missing or a setting is invalid.
    """

    def __init__(
        self,
        site_id: str | None = None,
        api_key: str | None = None,
        *,
        region: str | None = None,
        queue_dir: str | os.PathLike[str] | None = None,
        track_url: str | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
        level: int | str = logging.NOTSET,
        **options: Any,
    ) -> None:
        self.settings: Settings = resolve_settings(
            site_id,
            api_key,
            region=region,
            queue_dir=queue_dir,
            track_url=track_url,
            ca_bundle=ca_bundle,
            options=options,
        )
        super().__init__(level)
        queue_dir_path = self.settings.queue_dir
        secure_directory(queue_dir_path)
        self._wal = WriteAheadLog(queue_dir_path / "wal", fsync=self.settings.fsync)
        self._dead_letters = DeadLetterStore(queue_dir_path / "dead", fsync=self.settings.fsync)
        self._worker = DeliveryWorker(self.settings, self._wal, self._dead_letters)
        self._counts_guard = threading.Lock()
        self._enqueued = 0
        self._dropped: Counter[str] = Counter()
        self._last_key: str | None = None
        self._closed = False
        if len(self._wal):
            # An earlier process left events: deliver them without waiting for a new one.
            self._worker.ensure_started()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} site_id={self.settings.site_id!r} "
            f"endpoint={self.settings.endpoint.base_url} "
            f"queue_dir={str(self.settings.queue_dir)!r} "
            f"level={logging.getLevelName(self.level)}>"
        )

    def handle(self, record: logging.LogRecord) -> Any:
        """Filter and emit, without the handler lock.

        Untagged records return at the cost of one dict lookup. The lock is skipped on
        purpose: the write-ahead log is safe for concurrent writers, and serialising
        every caller behind one lock would make logging threads queue up.
        """
        if EXTRA_KEY not in record.__dict__ or getattr(_inside_emit, "active", False):
            return False
        result = self.filter(record)
        if isinstance(result, logging.LogRecord):  # Python 3.12+: a filter may swap it
            record = result
        if result:
            self.emit(record)
        return result

    def emit(self, record: logging.LogRecord) -> None:
        """Append the record's event to the write-ahead log; it is on disk on return."""
        _inside_emit.active = True
        try:
            event = event_from_record(record)
            if event is None:
                return
            self._wal.append(event)
            with self._counts_guard:
                self._enqueued += 1
                self._last_key = event.id
            if not self._closed:
                self._worker.ensure_started()
                self._worker.notify()
        except InvalidEventError as exc:
            self._count_drop(DROP_INVALID)
            internal_log.warning(
                "cio_logging: event refused at emit (logger %s, %s:%d): %s",
                record.name,
                record.filename,
                record.lineno,
                exc,
            )
        except Exception:
            self._count_drop(DROP_QUEUE_ERROR)
            self.handleError(record)
        finally:
            _inside_emit.active = False

    def flush(self) -> None:
        """Wait, at most ``flush_timeout``, until what was queued is delivered or cannot be."""
        if self._closed:
            return
        with self._counts_guard:
            last_key = self._last_key
        if not self._worker.flush(self.settings.flush_timeout, last_key):
            internal_log.warning(
                "cio_logging: flush timed out after %gs; %d event(s) wait on "
                "disk and will be sent later",
                self.settings.flush_timeout,
                len(self._wal),
            )

    def close(self) -> None:
        """Stop the worker within ``close_timeout``; unsent events stay on disk. Idempotent."""
        with self._counts_guard:
            if self._closed:
                return
            self._closed = True
        try:
            if self._worker.close(self.settings.close_timeout):
                # Release the database files now; an emit after close reopens them.
                self._wal.close()
                self._dead_letters.close()
            else:
                internal_log.warning(
                    "cio_logging: the flush thread did not stop within %gs; "
                    "its unsent events stay on disk",
                    self.settings.close_timeout,
                )
        finally:
            super().close()

    def status(self) -> dict[str, Any]:
        """A snapshot for operators and health checks."""
        stats = self._worker.stats
        with self._counts_guard:
            dropped = dict(self._dropped)
            enqueued = self._enqueued
        return {
            "queued": len(self._wal),
            "dead_letters": len(self._dead_letters),
            "enqueued": enqueued,
            "delivered": stats.delivered,
            "dead_lettered": stats.dead_lettered,
            "dropped": dropped,
            "requests": stats.requests,
            "failed_requests": stats.failed_requests,
            "last_error": stats.last_error,
            "delivering_process": self._worker.is_delivering_process,
            "queue_dir": str(self.settings.queue_dir),
        }

    def _count_drop(self, reason: str) -> None:
        with self._counts_guard:
            self._dropped[reason] += 1
