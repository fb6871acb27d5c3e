"""Batch items described once, so the database can build them from the stored text.

An API module describes each batch item it sends as a :data:`Template`: literal text
and :class:`Field` s of the stored row, in order. The same description is rendered three
ways, which the tests hold byte for byte equal:

* :func:`render`, in Python, from an :class:`~cio_logging.events.Event` (the reference);
* SQLite and PostgreSQL expressions (``cio_logging/store/items.py``), from the row's
  stored JSON text, so a whole batch's body is joined by the database, in C, and the
  sender never decodes a row it only sends.

Every value is copied as stored, never decoded and encoded again: the stored text was
made by Python's JSON encoder at emit (strings through ``encode_basestring``, the data
object compact), and a field of it is the same text in a request body. A call without
a template (or a row the database cannot read) is built in Python instead.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from json.encoder import encode_basestring

from . import wire
from .events import Event


class Field(enum.Enum):
    """A value of the stored row, as JSON text."""

    CUSTOMER_ID = "customer_id"  # a JSON string
    ANONYMOUS_ID = "anonymous_id"  # a JSON string
    NAME = "name"  # a JSON string
    ID = "id"  # the event id, a JSON string
    TIMESTAMP = "timestamp"  # integer Unix seconds
    ISO_TIME = "iso_time"  # a JSON string: the call's time, ISO 8601 UTC, milliseconds
    DATA = "data"  # the data object, as encoded at emit


#: An item: literal text and fields, concatenated.
Template = tuple[str | Field, ...]
#: The templates of one API, by (call, whether the row names a customer id). A row
#: whose pair is missing is built in Python.
Templates = Mapping[tuple[str, bool], Template]


#: The call's time as the wire formats write it (one definition, in wire.py).
iso_time = wire.iso_timestamp


def field_text(field: Field, event: Event) -> str:
    """One field of ``event`` as JSON text, as the templates splice it."""
    if field is Field.CUSTOMER_ID:
        return "null" if event.customer_id is None else encode_basestring(event.customer_id)
    if field is Field.ANONYMOUS_ID:
        return "null" if event.anonymous_id is None else encode_basestring(event.anonymous_id)
    if field is Field.NAME:
        return encode_basestring(event.name)
    if field is Field.ID:
        return encode_basestring(event.id)
    if field is Field.TIMESTAMP:
        return str(int(event.timestamp))
    if field is Field.ISO_TIME:
        return f'"{iso_time(event)}"'
    return event.data_json


def template_for(templates: Templates, event: Event) -> Template | None:
    return templates.get((event.call, event.customer_id is not None))


def render(template: Template, event: Event) -> str:
    """The item ``template`` describes, for ``event``."""
    return "".join(part if isinstance(part, str) else field_text(part, event) for part in template)
