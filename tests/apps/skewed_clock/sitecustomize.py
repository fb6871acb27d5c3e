"""Shift this process's wall clock by ``$CIO_TEST_CLOCK_SKEW`` seconds: a host whose clock
is off. Put this directory first on PYTHONPATH; Python imports ``sitecustomize`` at start.

libfaketime broke Python's sleeps here, so the shift is a shim over ``time.time``,
``time.time_ns`` and ``datetime.datetime.now``/``utcnow``; the monotonic clock (which
every wait in memory uses) is left alone, as a skewed host's is.
"""

from __future__ import annotations

import datetime as _datetime
import os
import time as _time

_SKEW = float(os.environ.get("CIO_TEST_CLOCK_SKEW", "0") or 0)

if _SKEW:
    _real_time = _time.time
    _real_time_ns = _time.time_ns
    _skew_ns = int(_SKEW * 1_000_000_000)

    def _skewed_time() -> float:
        return _real_time() + _SKEW

    def _skewed_time_ns() -> int:
        return _real_time_ns() + _skew_ns

    _time.time = _skewed_time
    _time.time_ns = _skewed_time_ns

    class _SkewedDatetime(_datetime.datetime):
        @classmethod
        def now(cls, tz: _datetime.tzinfo | None = None) -> _SkewedDatetime:
            return cls.fromtimestamp(_skewed_time(), tz)

        @classmethod
        def utcnow(cls) -> _SkewedDatetime:
            return cls.fromtimestamp(_skewed_time(), _datetime.UTC).replace(tzinfo=None)

    _datetime.datetime = _SkewedDatetime  # type: ignore[misc]
