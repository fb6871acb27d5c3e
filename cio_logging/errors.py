"""The exceptions cio_logging raises, in one tree.

::

    CIOLoggingError
    ├── ConfigurationError      bad or missing settings; raised at construction
    ├── InvalidEventError       a record's ``cio`` extra cannot become an event
    │   └── UnreadableTagError  a record carries a tag where the handler cannot read it
    └── QueueError              the write-ahead log or dead-letter store failed
        ├── CorruptEntryError   a stored row is not the JSON we wrote (never unpickled)
        └── DatabaseError       the PostgreSQL store failed (the driver's error, its
            │                   text scrubbed of the password, is the __cause__)
            └── LeaseLostError  this process no longer holds the workspace's lease

Only ``ConfigurationError`` ever reaches application code: it is raised by the
handler's constructor (a missing credential, a bad value, a queue directory that
cannot be created or opened) so that ``logging.config.dictConfig`` fails at start-up.
Everything else is caught inside the handler and reported through
``Handler.handleError`` or the ``cio_logging`` logger, because logging must never
raise into the caller.
"""

from __future__ import annotations


class CIOLoggingError(Exception):
    """Base class of every cio_logging exception."""


class ConfigurationError(CIOLoggingError, ValueError):
    """A setting is missing or invalid.

    A ``ValueError`` too, so that ``logging.config`` reports it like any other
    bad handler argument.
    """


class InvalidEventError(CIOLoggingError, ValueError):
    """A log record's ``cio`` extra cannot be turned into a Customer.io call.

    The message names the field and the rule it breaks, never the field's value:
    event data is personal data. ``rule`` names the rule in a word, for the counts in
    ``status()["refused"]`` (``"invalid"`` for the rules every call shares).
    """

    def __init__(self, message: str, rule: str = "invalid") -> None:
        super().__init__(message)
        self.rule = rule


class UnreadableTagError(InvalidEventError):
    """A record carries a Customer.io tag in a shape the handler cannot read.

    For example a structlog renderer turned the tag into text before the record
    reached logging. ``shape`` names the shape (``"rendered"``, ``"args"``): the
    handler warns once per logger and shape, with the message, which says how to fix it.
    """

    def __init__(self, shape: str, message: str) -> None:
        super().__init__(message, "unreadable_tag")
        self.shape = shape


class QueueError(CIOLoggingError):
    """The write-ahead log or the dead-letter store could not be read or written."""


class CorruptEntryError(QueueError):
    """A stored row is not a JSON text written by cio_logging.

    Raised instead of decoding it: a planted pickle must never be loaded.
    """


class DatabaseError(QueueError):
    """The PostgreSQL store could not be read or written.

    The driver's exception is the ``__cause__``; neither text ever holds the password
    of the queue URL (it is replaced by ``***`` where the database quoted it).
    """


class LeaseLostError(DatabaseError):
    """An acknowledgement was refused: this process's term is no longer the lease's.

    A sender that was paused past its lease finds another sender took over; it must
    stop sending. Its rows stay for the new sender.
    """
