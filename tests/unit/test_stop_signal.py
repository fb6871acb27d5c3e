"""The long-running commands (``deliver``, ``drain``, ``dlq replay --wait``, the
simulator) stop on SIGINT or SIGTERM. A signal handler runs on the main thread between
two bytecodes, possibly while that thread holds the lock of the event the handler sets
(inside ``Event.wait``, or inside a first handler when a second signal follows):
``cio-logging deliver`` once hung for ever that way. Each test runs in a child process,
so a hang fails it by timeout instead of hanging the suite."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import signal
    from cio_logging.stop_signal import stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert not stop.is_set() and not stop.wait(0.01)
        with stop._cond:  # the main thread inside the event's own wait() or set()
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)  # a second signal right after the first
        assert stop.is_set() and stop.wait(0.01)
        print("stopped by", signal.Signals(stop.signal).name)
    assert signal.getsignal(signal.SIGTERM) is before
    """
)


def test_a_signal_landing_while_the_event_lock_is_held_stops_without_hanging() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stopped by SIGTERM"
