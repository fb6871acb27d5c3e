"""A ``LoggerAdapter`` that keeps the call's ``extra``, and so its Customer.io tag.

The standard library's adapter replaces a call's ``extra`` with its own (on Python
3.11 and 3.12 always, on 3.13 unless ``merge_extra=True`` is given), so a tag passed
through ``LoggerAdapter(logger, {"tenant": "acme"})`` never reaches the handler, and
nothing says so: the record simply carries no tag. :class:`CioAdapter` merges the two,
the call's keys winning, on every Python version.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any


class CioAdapter(logging.LoggerAdapter[logging.Logger]):
    """Like :class:`logging.LoggerAdapter`, but a call's ``extra`` is merged with the
    adapter's instead of replaced by it.

    Example::

        log = CioAdapter(logging.getLogger("app.events"), {"tenant": "acme"})
        log.info("purchase", extra=cio_event("user-42", amount=9.99))  # tagged and delivered
    """

    def __init__(self, logger: logging.Logger, extra: Mapping[str, object] | None = None) -> None:
        super().__init__(logger, extra)

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        given = kwargs.get("extra")
        if self.extra:
            kwargs["extra"] = {**self.extra, **given} if given else dict(self.extra)
        return msg, kwargs
