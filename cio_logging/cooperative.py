"""Monkey-patched processes: gevent and eventlet.

Under ``gevent.monkey.patch_all()`` (gunicorn's ``-k gevent`` worker does it before it
imports the application) ``threading`` is gevent's: the handler's commit and flush
threads are greenlets on the hub, its locks and sleeps yield to the hub, and its HTTP
requests go through gevent's sockets. SQLite calls do not yield: a commit, or a read
or an acknowledgement of the sender (each one transaction), keeps the hub for as long
as it takes, which was measured (see the gevent recipe) and left there: sending each
call to a real thread would cost a thread hop per call for a gain within the noise.
eventlet's ``monkey_patch()`` works the same way as far as the handler is concerned.

One thing needs help, at interpreter exit. gevent resolves host names in its thread
pool, which on Python 3.12 cannot start a thread once the interpreter exits: the
delivery that ``flush()`` waits for then, on the flush greenlet or on the calling
thread (see background.py), would fail to connect. Nothing else runs on the hub by
then, so resolving there, in the blocking way, costs nothing:
:func:`resolve_names_on_the_hub`, run by :func:`resolve_names_on_the_hub_at_exit` as
soon as the interpreter starts to exit (the flush greenlet may be sending by then,
before ``logging.shutdown()`` runs), through the hook ``threading`` runs when the main
thread ends, the one ``concurrent.futures`` uses to stop its pools.
"""

from __future__ import annotations

import contextlib
import sys
import threading

_registered = False


def resolve_names_on_the_hub() -> None:
    """In a gevent-patched process, resolve host names on the hub from now on (for the
    delivery ``flush()`` waits for at interpreter exit). Elsewhere, nothing."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return
    with contextlib.suppress(Exception):  # an unknown gevent: keep its resolver
        from gevent import get_hub
        from gevent.resolver.blocking import Resolver

        hub = get_hub()
        if not isinstance(hub.resolver, Resolver):
            hub.resolver = Resolver(hub=hub)


def resolve_names_on_the_hub_at_exit() -> None:
    """In a gevent-patched process, arrange for :func:`resolve_names_on_the_hub` to run
    as soon as the interpreter starts to exit (once per process)."""
    global _registered
    monkey = sys.modules.get("gevent.monkey")
    if _registered or monkey is None or not monkey.is_module_patched("socket"):
        return
    register = getattr(threading, "_register_atexit", None)  # CPython 3.9+
    if register is None:
        return
    with contextlib.suppress(RuntimeError):  # the interpreter is exiting already
        register(resolve_names_on_the_hub)
        _registered = True
