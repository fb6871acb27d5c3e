"""``deliver="process"``: one ``cio-logging deliver`` child per queue directory.

The handler of every process sharing a queue directory competes for
``queue_dir/deliver.supervisor.lock`` (an ``flock``, like ``delivery.lock``); its holder
alone starts the sender child, restarts it when it dies (with a backoff) and stops it
at ``close()``. So a gunicorn master and its forked workers run one sender between
them: the lock's descriptor is forgotten in a forked child (see process_lock.py), and
so are the parent's monitor thread and child.

The child gets the handler's settings through its environment, never on its command
line (which every user on the host can read). It asks the kernel for SIGTERM when its
parent dies (``PR_SET_PDEATHSIG``, Linux) and also watches its parent's pid, so a
SIGKILLed application leaves no orphan sender behind. The death signal is bound to
the thread that started the child: every child is started by the monitor thread,
which lives until ``close()`` has stopped the child.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

from . import background
from .config import (
    DELIVER_THREAD,
    ENV_API,
    ENV_API_KEY,
    ENV_CA_BUNDLE,
    ENV_CDP_API_KEY,
    ENV_DELIVER,
    ENV_QUEUE_DIR,
    ENV_QUEUE_URL,
    ENV_REGION,
    ENV_SITE_ID,
    ENV_TRACK_URL,
    PIPELINES,
    TUNABLE_OPTIONS,
    Settings,
)
from .process_lock import DeliveryLock

internal_log = logging.getLogger("cio_logging")

SUPERVISOR_LOCK = "deliver.supervisor.lock"
#: Handler options for ``cio-logging deliver``, as a JSON object (``-o`` wins).
ENV_OPTIONS = "CIO_LOGGING_OPTIONS"
#: The supervising process's pid: the child stops once it is no longer its parent.
ENV_PARENT = "CIO_LOGGING_DELIVER_PARENT"

# Options the sender does not use, or that would make it something else than a sender.
_NOT_PASSED = frozenset({"signal_handlers"})
# Restart backoff: the first restart soon (a SIGKILL, an OOM kill), then doubling, so a
# child that dies at start (a broken installation) costs little.
_FIRST_RESTART_SECONDS = 0.5
_LONGEST_RESTART_SECONDS = 30.0
# A child that lived this long was healthy: its death starts the backoff afresh.
_HEALTHY_SECONDS = 30.0
# How often a process that is not the supervisor asks for the lock again (on commits).
_TAKEOVER_SECONDS = 5.0
# How often the monitor looks at the child.
_POLL_SECONDS = 0.1

_PR_SET_PDEATHSIG = 1


def sender_environment(settings: Settings, parent_pid: int) -> dict[str, str]:
    """The child's environment: ours, with the handler's settings in the variables the
    handler reads (so the child resolves exactly these), and the options as JSON."""
    env = dict(os.environ)
    for name in (ENV_QUEUE_URL, ENV_CA_BUNDLE, ENV_SITE_ID, ENV_API_KEY, ENV_CDP_API_KEY):
        env.pop(name, None)
    env[ENV_API] = settings.api
    env[ENV_DELIVER] = DELIVER_THREAD  # the child is the sender, not another supervisor
    if settings.api == PIPELINES:
        env[ENV_CDP_API_KEY] = settings.api_key
    else:
        env[ENV_SITE_ID] = settings.site_id
        env[ENV_API_KEY] = settings.api_key
    env[ENV_REGION] = settings.region
    env[ENV_TRACK_URL] = settings.endpoint.base_url + settings.endpoint.path
    env[ENV_QUEUE_DIR] = str(settings.queue_dir)
    if settings.ca_bundle is not None:
        env[ENV_CA_BUNDLE] = str(settings.ca_bundle)
    if settings.queue_url is not None:
        env[ENV_QUEUE_URL] = settings.queue_url
    options: dict[str, object] = {
        name: getattr(settings, name) for name in TUNABLE_OPTIONS if name not in _NOT_PASSED
    }
    env[ENV_OPTIONS] = json.dumps(options)
    env[ENV_PARENT] = str(parent_pid)
    # The child must import this very package, wherever the application found it.
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (package_root, env.get("PYTHONPATH", "")) if part
    )
    return env


def die_with_parent(parent_pid: int) -> bool:
    """In the child: ask for SIGTERM when the parent dies (Linux). Returns whether the
    parent is still ours (it may have died before the request was made)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent_pid


class SenderSupervisor:
    """Starts, watches and stops the sender child, in the one process holding the lock."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = DeliveryLock(settings.queue_dir / SUPERVISOR_LOCK)
        self.restarts = 0
        self._reset()
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_in_child(reference))

    def _reset(self) -> None:
        # At construction and in a forked child: the parent's thread and child are not
        # this process's (DeliveryLock forgets the lock's descriptor by itself).
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread = background.OwnThread(self._run, "cio_logging-sender-supervisor")
        self._child: subprocess.Popen[bytes] | None = None
        self._tried_at = float("-inf")

    @property
    def supervising(self) -> bool:
        return self._lock.held

    @property
    def child_pid(self) -> int | None:
        child = self._child
        return None if child is None or child.returncode is not None else child.pid

    def ensure(self, *, now: bool = False) -> None:
        """Become the supervisor if nobody is (at most every few seconds unless ``now``);
        never blocks and never raises."""
        if self._stop.is_set() or self._thread.is_alive():
            return
        moment = time.monotonic()
        if not now and moment - self._tried_at < _TAKEOVER_SECONDS:
            return
        self._tried_at = moment
        with self._guard:
            if self._stop.is_set() or self._thread.is_alive():
                return
            try:
                if not self._lock.try_acquire():
                    return
            except OSError as exc:
                internal_log.error(
                    "deliver=process: cannot open %s (%s); no sender is started",
                    self._lock.path,
                    exc,
                )
                return
            self._thread.ensure_started()  # none at interpreter exit

    def _run(self) -> None:
        delay = _FIRST_RESTART_SECONDS
        while not self._stop.is_set():
            started = time.monotonic()
            child = self._start_child()
            if child is None:
                code: int | None = None
            else:
                while child.poll() is None and not self._stop.wait(_POLL_SECONDS):
                    pass
                if self._stop.is_set():
                    return  # close() stops the child
                code = child.returncode
            if time.monotonic() - started >= _HEALTHY_SECONDS:
                delay = _FIRST_RESTART_SECONDS
            internal_log.warning(
                "the sender process (cio-logging deliver) %s; restarting it in %g s",
                "could not be started" if code is None else f"ended with status {code}",
                delay,
            )
            if self._stop.wait(delay):
                return
            self.restarts += 1
            delay = min(delay * 2, _LONGEST_RESTART_SECONDS)

    def _start_child(self) -> subprocess.Popen[bytes] | None:
        with self._guard:
            if self._stop.is_set():
                return None
            try:
                # A session of its own: a Ctrl-C at the terminal must not stop the sender
                # before the application has committed its last events; close() does.
                self._child = subprocess.Popen(
                    [sys.executable, "-m", "cio_logging", "deliver"],
                    env=sender_environment(self._settings, os.getpid()),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                internal_log.error("the sender process could not be started: %s", exc)
                self._child = None
            return self._child

    def close(self, timeout: float) -> bool:
        """Stop the child: SIGTERM, then SIGKILL after ``timeout``. Returns whether it
        ended within ``timeout``."""
        with self._guard:
            self._stop.set()
            child = self._child
        stopped = True
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                stopped = False
                internal_log.warning("the sender process did not stop within %gs; killed", timeout)
                child.kill()
                child.wait()
        self._thread.join(1.0)
        self._lock.release()
        return stopped


def _reset_in_child(reference: weakref.ref[SenderSupervisor]) -> None:
    supervisor = reference()
    if supervisor is not None:
        supervisor._reset()
