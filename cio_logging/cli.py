"""The ``cio-logging`` command.

Subcommands: ``demo`` (the whole path against the embedded simulator), ``simulator``
(run the Track API simulator for manual testing), and the operator commands
``status``, ``dlq count|list|show|replay|purge``, ``drain`` and ``deliver``. This module parses and
prints; what the operator commands do lives in :mod:`cio_logging.operations`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from ._argparse import OneLineParser
from .config import ENV_API_KEY, ENV_CDP_API_KEY, ENV_QUEUE_DIR, ENV_QUEUE_URL
from .errors import CIOLoggingError, ConfigurationError, QueueError
from .metadata import PACKAGE_VERSION
from .operations import (
    ExitCode,
    FleetLocation,
    LockHeldError,
    QueueDirectoryError,
    ReplayEntry,
    ReplayReport,
    Selection,
    count_dead_letters,
    deliver,
    drain,
    fleet_location,
    fleet_status,
    list_dead_letters,
    operator_settings,
    parse_time,
    purge_dead_letters,
    queue_status,
    replay_dead_letters,
    select_dead_letters,
    show_dead_letter,
)
from .sender_process import ENV_OPTIONS, ENV_PARENT, die_with_parent
from .stop_signal import stop_on_signals
from .window import WINDOW_SECONDS

EXIT_CODES = """\
exit codes:
  0    done: nothing is left to do
  1    work left: events still queued at the time bound, dead letters not replayed
       (failed again, unreadable, not found), a replay that selected nothing while
       dead letters remain, an id not found, a purge declined
  2    usage: bad arguments or settings, or a purge refused without --yes
  3    the queue directory is missing, unreadable or not a queue directory
       (it is never created by these commands), or a file or directory in it
       belongs to another user and is not writable by this one (left by a
       command run as root, say; the message names it and its owner)
  4    another process held the lock for the whole time bound (its pid is printed)
  5    delivery refused by the set-up: Customer.io refused the credentials
       (401/403), or TLS verification failed (a wrong --ca-bundle, an
       intercepting proxy); the message says which
  130  interrupted by SIGINT or SIGTERM; nothing is lost
"""

_DEFAULT_LIST_LIMIT = 100
_DEFAULT_TIMEOUT = 300.0


def main(argv: list[str] | None = None) -> int:
    OneLineParser.json_wanted = "--json" in (sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)

    if args.command == "simulator":
        from .simulator import run_from_command_line

        return run_from_command_line(rest)
    if rest:
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        from .demo import run_demo

        # Show the library's own warnings (delivery failures, refused events) briefly.
        logging.basicConfig(
            level=logging.WARNING,
            stream=sys.stdout,
            format="[%(asctime)s]   (%(name)s log) %(message)s",
            datefmt="%H:%M:%S",
        )
        return run_demo(
            api=args.api,
            outage_seconds=args.outage_seconds,
            directory=None if args.dir is None else Path(args.dir),
        )
    run: Callable[[argparse.Namespace, _Output], int] | None = getattr(args, "run", None)
    if run is None:
        parser.error(f"unknown command {args.command}")
        return ExitCode.USAGE
    out = _Output(json_mode=args.json or getattr(args, "json_early", False), secrets=_secrets(args))
    try:
        return run(args, out)
    except ConfigurationError as exc:
        if isinstance(exc.__cause__, (OSError, QueueError)):
            # The handler (drain, deliver) found the queue directory unusable: that is
            # the queue's exit code, as for every other command, not a usage error.
            return out.fail(_unusable_queue_message(exc.__cause__, args), ExitCode.NO_QUEUE)
        return out.fail(_configuration_message(exc, args), ExitCode.USAGE)
    except QueueDirectoryError as exc:
        return out.fail(str(exc), ExitCode.NO_QUEUE)
    except LockHeldError as exc:
        return out.fail(str(exc), ExitCode.LOCKED)
    except QueueError as exc:
        return out.fail(f"the queue cannot be read: {exc}", ExitCode.NO_QUEUE)
    except CIOLoggingError as exc:
        return out.fail(str(exc), ExitCode.INCOMPLETE)


# -- the parser --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="cio-logging",
        description="Customer.io events through Python logging: demo and operator tools.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {PACKAGE_VERSION}")
    _early_json(parser)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{demo,simulator,status,dlq,drain,deliver}"
    )
    demo = commands.add_parser("demo", help="run the end-to-end demo against the simulator")
    demo.add_argument(
        "--api",
        choices=("track", "pipelines"),
        default="track",
        help="which API the demo's handler sends to (default track)",
    )
    demo.add_argument(
        "--outage-seconds",
        type=float,
        default=4.0,
        help="how long the simulated outage lasts (default 4)",
    )
    demo.add_argument(
        "--dir",
        help="where to keep the demo's queue directory, as DIR/queue "
        "(default: a new temporary directory; kept either way, for the commands it suggests)",
    )
    commands.add_parser("simulator", help="run the Track API simulator", add_help=False)

    common = _common_options()
    status = _subcommand(
        commands,
        "status",
        common,
        "queued events, oldest age, dead letters, disk, breaker and last error",
        "Reads the queue directory without disturbing the process delivering from it. "
        "The breaker state and last error are those the delivering process last "
        "recorded in state.json.",
    )
    status.set_defaults(run=_run_status)

    dlq = commands.add_parser(
        "dlq",
        help="dead letters: count, list, show, replay, purge",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _early_json(dlq)
    dlq_commands = dlq.add_subparsers(
        dest="dlq_command", required=True, metavar="{count,list,show,replay,purge}"
    )
    count = _subcommand(dlq_commands, "count", common, "count dead letters", None)
    count.add_argument("--by", choices=["event", "reason"], help="group by event name or reason")
    count.set_defaults(run=_run_count)

    listing = _subcommand(dlq_commands, "list", common, "list dead letters, oldest first", None)
    _filters(listing, event=True, reason=True, since=True, before=True)
    listing.add_argument(
        "--limit",
        type=_non_negative_int,
        default=_DEFAULT_LIST_LIMIT,
        help=f"show at most N (default {_DEFAULT_LIST_LIMIT}; 0: all)",
    )
    listing.set_defaults(run=_run_list)

    show = _subcommand(dlq_commands, "show", common, "one dead letter, with its event", None)
    show.add_argument(
        "id", type=_event_key, help="the entry's id (the event's ULID, in either case)"
    )
    show.set_defaults(run=_run_show)

    replay = _subcommand(
        dlq_commands,
        "replay",
        common,
        "put dead letters back in the queue, ahead of their person's queued calls",
        "Puts the chosen entries back in the queue, with their own ids (Customer.io "
        "deduplicates), each ahead of the calls of its person still queued, in the order "
        "they were logged. The application's sender (or this command, with --wait) "
        "delivers them under the same order rule, breaker, rate cap and retry policy as "
        "every event; one that fails again comes back to the store with its new reason. "
        "Each entry's line names the queued calls it goes ahead of and the calls of its "
        "person delivered after it, which it now lands behind. An entry whose person "
        "had a delete delivered after it is not replayed without --after-delete: it "
        "would land after the delete, and Customer.io would create the person again.",
    )
    _filters(replay, event=True, reason=True, since=True, before=True)
    replay.add_argument(
        "--id",
        dest="ids",
        action="extend",
        nargs="+",
        type=_event_key,
        metavar="ID",
        help="these entries only (ULIDs, in either case)",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="say what would be put back; change nothing"
    )
    replay.add_argument(
        "--wait",
        action="store_true",
        help="deliver them now (or wait for the sending process) and report each outcome",
    )
    replay.add_argument(
        "--after-delete",
        action="store_true",
        help="replay also entries whose person had a delete delivered after them",
    )
    _timeout(replay)
    replay.set_defaults(run=_run_replay)

    purge = _subcommand(
        dlq_commands,
        "purge",
        common,
        "delete dead letters for good",
        "Asks for confirmation on a terminal; refuses without --yes otherwise.",
    )
    _filters(purge, event=True, reason=True, since=False, before=True)
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(run=_run_purge)

    drain_command = _subcommand(
        commands,
        "drain",
        common,
        "deliver what the queue directory holds, then exit",
        "For a host whose application is gone, a cron job or a sidecar. Takes the same "
        "delivery.lock as the application (waiting for it up to the time bound), so it "
        "never sends while a live application does, then delivers until the queue is "
        "empty or the bound passes.",
    )
    _timeout(drain_command)
    drain_command.set_defaults(run=_run_drain)

    deliver_command = _subcommand(
        commands,
        "deliver",
        common,
        "be the sender for the queue directory until SIGTERM or SIGINT",
        "Delivery out of the application's process (deliver=none or process in the "
        "handler): takes the same delivery.lock (or, with --queue-url, the lease) as an "
        "application's flush thread would, waiting for it while another process holds "
        "it, and sends what every process appends, with the same breaker, retries, "
        "dead letters and state.json. SIGTERM or SIGINT stops it within close_timeout "
        "(exit 0); what it had not sent stays on disk. Handler options also come from "
        f"${ENV_OPTIONS} (a JSON object; -o wins). Unlike the other commands it creates "
        "a missing queue directory, as the application would.",
    )
    deliver_command.set_defaults(run=_run_deliver)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The sub-parser of the command ``args`` name (``dlq replay``), for its error line."""
    for name in (args.command, getattr(args, "dlq_command", None)):
        choices = next(
            (a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
            None,
        )
        if not name or not choices or name not in choices:
            break
        parser = choices[name]
    return parser


def _early_json(parser: argparse.ArgumentParser) -> None:
    """Accept --json before the subcommand too (``cio-logging --json status``)."""
    # SUPPRESS: a sub-parser's default would overwrite a value given before it.
    parser.add_argument(
        "--json",
        dest="json_early",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable output on stdout (also accepted after the subcommand)",
    )


def _event_key(text: str) -> str:
    """A typed event id (ULID): case-insensitive, as the ids are stored upper-case."""
    return text.strip().upper()


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("queue and credentials (as the handler resolves them)")
    group.add_argument(
        "--queue-dir",
        help="the queue directory (default: $CIO_LOGGING_QUEUE_DIR, else the handler's "
        "default for the site id and endpoint)",
    )
    group.add_argument(
        "--queue-url",
        help="fleet mode: the PostgreSQL URL the handlers use (default: "
        "$CIO_LOGGING_QUEUE_URL); the workspace's rows are read there, not in a queue "
        "directory. Its password is never printed.",
    )
    group.add_argument(
        "--api",
        choices=("track", "pipelines"),
        help="the API the handlers send to (default: $CIO_LOGGING_API, else track)",
    )
    group.add_argument("--site-id", help="Track API site id (default: $CUSTOMERIO_SITE_ID)")
    group.add_argument(
        "--api-key",
        help="Track API key (default: $CUSTOMERIO_API_KEY), or with --api pipelines the "
        "source's API key (default: $CUSTOMERIO_CDP_API_KEY); prefer the variable, "
        "a flag shows in the process list. Never printed.",
    )
    group.add_argument("--region", help="us or eu (default: $CUSTOMERIO_REGION or us)")
    group.add_argument("--track-url", help="Track API base URL (default: $CIO_LOGGING_TRACK_URL)")
    group.add_argument("--ca-bundle", help="CA file for TLS (default: $CIO_LOGGING_CA_BUNDLE)")
    group.add_argument(
        "-o",
        "--option",
        dest="options",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any setting of the handler (e.g. -o max_attempts=3); repeat for more",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return common


def _subcommand(
    commands: Any, name: str, common: argparse.ArgumentParser, summary: str, detail: str | None
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        parents=[common],
        help=summary,
        description=f"{summary[0].upper()}{summary[1:]}." + (f" {detail}" if detail else ""),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _filters(
    parser: argparse.ArgumentParser, *, event: bool, reason: bool, since: bool, before: bool
) -> None:
    if event:
        parser.add_argument("--event", metavar="NAME", help="entries of this event name")
    if reason:
        parser.add_argument(
            "--reason",
            metavar="TEXT",
            help="error type (e.g. http_400, max_attempts), or text in the message; "
            "matches the latest reason or the original one (before any replay)",
        )
    times = "ISO 8601 (2024-05-01T12:00:00Z) or an age (30m, 2h, 3d)"
    if since:
        parser.add_argument(
            "--since", type=_moment, metavar="TIME", help=f"last failed at or after TIME: {times}"
        )
    if before:
        parser.add_argument(
            "--before", type=_moment, metavar="TIME", help=f"last failed before TIME: {times}"
        )


def _timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=_DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"bound on the run time (default {_DEFAULT_TIMEOUT:g})",
    )


def _moment(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


# -- settings ----------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in args.options:
        name, separator, value = item.partition("=")
        if not separator or not name.strip():
            raise ConfigurationError(f"-o takes NAME=VALUE, not {item!r}")
        options[name.strip()] = value.strip()
    if getattr(args, "queue_url", None):
        options["queue_url"] = args.queue_url
    if getattr(args, "api", None):
        options["api"] = args.api
    return options


def _settings(
    args: argparse.Namespace, *, sends: bool, options: dict[str, Any] | None = None
) -> Any:
    """Settings as the handler resolves them; ``options``: what the flags' options add to."""
    return operator_settings(
        site_id=args.site_id,
        api_key=args.api_key,
        region=args.region,
        queue_dir=args.queue_dir,
        track_url=args.track_url,
        ca_bundle=args.ca_bundle,
        options={**(options or {}), **_options(args)},
        sends=sends,
    )


def _fleet(args: argparse.Namespace) -> FleetLocation | None:
    """Fleet mode's workspace in the database, when --queue-url or its variable is set."""
    if not (getattr(args, "queue_url", None) or os.environ.get(ENV_QUEUE_URL)):
        return None
    return fleet_location(_settings(args, sends=False))


def _location(args: argparse.Namespace) -> Path | FleetLocation:
    """Where dead-letter commands look: the fleet's database, or a queue directory."""
    return _fleet(args) or _queue_dir(args)


def _queue_dir(args: argparse.Namespace) -> Path:
    """For commands that do not send: an explicit directory needs no credentials, and
    every setting given is checked all the same (``--region mars`` is refused here as
    it is by the commands that send)."""
    queue_dir: Path = _settings(args, sends=False).queue_dir
    return queue_dir


def _unusable_queue_message(cause: BaseException, args: argparse.Namespace) -> str:
    where = args.queue_dir or os.environ.get(ENV_QUEUE_DIR) or "the default queue directory"
    if isinstance(cause, OSError) and cause.strerror:
        return f"queue directory {where} cannot be used: {cause.strerror}"
    return f"queue directory {where} cannot be used: {cause}"


def _configuration_message(exc: ConfigurationError, args: argparse.Namespace) -> str:
    message = str(exc)
    for name in ("site_id", "api_key"):
        message = message.replace(f"pass {name}=", f"pass --{name.replace('_', '-')}")
    sends = args.command in ("drain", "deliver") or (
        getattr(args, "dlq_command", None) == "replay" and args.wait and not args.dry_run
    )
    if "site_id is missing" in message and not sends:
        message += " (or give --queue-dir or CIO_LOGGING_QUEUE_DIR)"
    return f"configuration: {message}"


def _secrets(args: argparse.Namespace) -> set[str]:
    keys = {
        getattr(args, "api_key", None),
        os.environ.get(ENV_API_KEY),
        os.environ.get(ENV_CDP_API_KEY),
    }
    for url in (getattr(args, "queue_url", None), os.environ.get(ENV_QUEUE_URL)):
        if url:
            with contextlib.suppress(ValueError):
                password = urlsplit(url).password
                keys |= {password, unquote(password or "")}
    return {key for key in keys if key and len(key) >= 3}


# -- output ------------------------------------------------------------------------------


class _Output:
    """Everything the commands print, with the API key redacted wherever it might hide."""

    def __init__(self, *, json_mode: bool, secrets: set[str]) -> None:
        self.json_mode = json_mode
        self._secrets = secrets

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def line(self, text: str = "") -> None:
        print(self._redact(text), file=sys.stdout)

    def note(self, text: str) -> None:
        print(self._redact(f"cio-logging: {text}"), file=sys.stderr, flush=True)

    def json(self, value: object) -> None:
        print(self._redact(json.dumps(value, indent=2, ensure_ascii=False)), file=sys.stdout)

    def fail(self, message: str, code: int) -> int:
        self.note(f"error: {message}")
        if self.json_mode:
            self.json({"error": message, "exit_code": int(code)})
        return int(code)


class _Progress:
    """A counter with a rate, on one line of stderr that it rewrites.

    Drawn only when stderr is a terminal and the output is not JSON: a pipe, a log
    file or a program reading --json gets the summary alone.
    """

    def __init__(self, label: str, *, json_mode: bool, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._label = label
        self._active = not json_mode and self._stream.isatty()
        self._started = time.monotonic()
        self._last = ""

    def update(self, done: int, total: int, detail: str) -> None:
        if not self._active:
            return
        elapsed = time.monotonic() - self._started
        rate = f", {done / elapsed:,.0f}/s" if elapsed > 0 and done else ""
        self._last = f"\r{self._label}: {done:,} of {total:,} {detail}{rate}\x1b[K"
        self._stream.write(self._last)
        self._stream.flush()

    def finish(self) -> None:
        """End the line, so that the summary starts on a line of its own."""
        if self._last:
            self._stream.write("\n")
            self._stream.flush()
            self._last = ""


def _show_library_warnings() -> None:
    # The library's own messages (delivery failures, breaker, dead letters) on stderr.
    library_log = logging.getLogger("cio_logging")
    if not library_log.handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        library_log.addHandler(stream)
        library_log.setLevel(logging.WARNING)


def _oldest(seconds: float | None) -> str:
    """The queue's age for the status line, marked once past the 72-hour window."""
    if seconds is None:
        return ""
    if seconds > WINDOW_SECONDS:
        return (
            f" (oldest {_age(seconds)}: past Customer.io's 72-hour window, so the oldest "
            "trigger no campaign when they arrive)"
        )
    return f" (oldest {_age(seconds)})"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns first


def _shorten(text: str | None, width: int) -> str:
    if not text:
        return "-"
    return text if len(text) <= width else text[: width - 1] + "…"


# -- the commands --------------------------------------------------------------------------


def _refusal_advice(error: str) -> str:
    """What to check when delivery is refused by the set-up, not by Customer.io failing."""
    if error.startswith("HTTP 40"):
        return (
            f"Customer.io refused the credentials ({error}); check CUSTOMERIO_SITE_ID "
            "and CUSTOMERIO_API_KEY"
        )
    return f"TLS verification failed ({error}); check --ca-bundle and any proxy"


def _hold_text(hold: dict[str, Any] | None) -> str:
    """Why the sender sends nothing now, and until when; "no" when nothing holds it."""
    if not hold:
        return "no"
    return (
        f"{hold['reason']} until {hold['until']} ({_age(hold['seconds'])} more): {hold['message']}"
    )


def _run_fleet_status(fleet: FleetLocation, out: _Output) -> int:
    status = fleet_status(fleet)
    if out.json_mode:
        out.json(status)
        return ExitCode.OK
    oldest = status["oldest_age_seconds"]
    sender = status["sender"]
    if sender is None:
        sending = "no process has held the lease yet: nothing is being sent"
    else:
        sending = (
            f"{sender['host']} pid {sender['pid']} (term {sender['term']}, since {sender['since']})"
        )
        if not sender["holds_lease"]:
            sending += f"; its lease expired at {sender['expires_at']}: nobody sends now"
    if status["breaker"] is None:
        breaker = "- (no sender has recorded its state yet)"
    else:
        recorder = status["recorded_by"] or {}
        breaker = (
            f"{status['breaker']} (recorded by {recorder.get('host')} pid {recorder.get('pid')} "
            f"{_age(status['recorded_age_seconds'])} ago)"
        )
    last_error = "-"
    if status["last_error"]:
        last_error = f"{status['last_error']} (at {status['last_error_at']})"
    rows = [
        ("store", f"PostgreSQL {status['queue_url']}"),
        ("workspace", status["workspace"]),
        ("queued", f"{status['queued']}{_oldest(oldest)}"),
        ("dead letters", str(status["dead_letters"])),
        ("spilled", _spills(status["spilled"])),
        ("sender", sending),
        ("breaker", breaker),
        ("last error", last_error),
        ("delivery paused", status["delivery_paused"] or "no"),
        ("held", _hold_text(status["hold"])),
    ]
    for label, value in rows:
        out.line(f"{label:<16} {value}")
    return ExitCode.OK


def _spills(spills: list[dict[str, Any]]) -> str:
    """Fleet status: rows waiting in hosts' local spills, per host."""
    if not spills:
        return "0"
    return "; ".join(
        f"{spill['rows']} on {spill['host']} ({spill['directory']}, reported "
        f"{_age(spill['reported_age_seconds'])} ago)"
        for spill in spills
    )


def _run_status(args: argparse.Namespace, out: _Output) -> int:
    fleet = _fleet(args)
    if fleet is not None:
        return _run_fleet_status(fleet, out)
    status = queue_status(_queue_dir(args))
    if out.json_mode:
        out.json(status.to_dict())
        return ExitCode.OK
    oldest = _oldest(status.oldest_age_seconds)
    if status.delivering_pid is None and status.events_wait_for_a_sender:
        # The record's age is the last sign of a sender (it rewrites it every few
        # seconds while it runs): say how long events have had none.
        since = (
            "no sender has run here yet"
            if status.recorded_age_seconds is None
            else f"no sender has run for {_age(status.recorded_age_seconds)}"
        )
        delivering = (
            f"{since}: events wait (no process holds delivery.lock; start "
            "cio-logging deliver, or an application with deliver=thread or process)"
        )
    elif status.delivering_pid is None:
        delivering = "no process holds delivery.lock: nothing is being sent"
    else:
        delivering = f"pid {status.delivering_pid} (holds delivery.lock)"
    if status.breaker is None:
        breaker = "- (no state.json: no process has delivered from here yet)"
    else:
        who = f"recorded by pid {status.recorded_by_pid} {_age(status.recorded_age_seconds)} ago"
        if not status.recorder_is_delivering:
            who += "; that process no longer delivers"
        breaker = f"{status.breaker} ({who})"
    last_error = "-"
    if status.last_error:
        last_error = f"{status.last_error} (at {status.last_error_at})"
    rows = [
        ("queue directory", status.queue_dir),
        ("queued", f"{status.queued}{oldest}"),
        ("dead letters", str(status.dead_letters)),
    ]
    if status.delivered_total is not None:  # counted by the queue itself: always current
        rows.append(("delivered", f"{status.delivered_total} from this directory, by any process"))
    rows += [
        (
            "disk",
            f"queue {_size(status.queue_bytes)}, directory {_size(status.disk_bytes)}, "
            f"{_size(status.disk_free_bytes)} free",
        ),
        ("delivering", delivering),
        ("breaker", breaker),
        ("last error", last_error),
        ("delivery paused", status.delivery_paused or "no"),
        ("held", _hold_text(status.hold)),
    ]
    if status.counters:  # the recording process's own, since it started
        counters = status.counters
        rows.append(
            (
                "last recorded",
                f"by pid {status.recorded_by_pid} {_age(status.recorded_age_seconds)} ago, "
                f"since it started: delivered {counters.get('delivered', 0)}, dead-lettered "
                f"{counters.get('dead_lettered', 0)}, requests {counters.get('requests', 0)} "
                f"({counters.get('failed_requests', 0)} failed)",
            )
        )
    for label, value in rows:
        out.line(f"{label:<16} {value}")
    return ExitCode.OK


def _run_count(args: argparse.Namespace, out: _Output) -> int:
    counts = count_dead_letters(_location(args), by=args.by)
    if out.json_mode:
        out.json(counts)
        return ExitCode.OK
    out.line(f"dead letters: {counts['total']}")
    width = max((len(name) for name in counts["counts"]), default=0)
    for name, number in counts["counts"].items():
        out.line(f"  {name:<{width}}  {number}")
    return ExitCode.OK


def _selection(args: argparse.Namespace, *, limit: int | None = None) -> Selection:
    ids = getattr(args, "ids", None)
    return Selection(
        event=getattr(args, "event", None),
        reason=getattr(args, "reason", None),
        since=getattr(args, "since", None),
        before=getattr(args, "before", None),
        ids=None if ids is None else tuple(dict.fromkeys(ids)),
        limit=limit,
    )


def _run_list(args: argparse.Namespace, out: _Output) -> int:
    limit = args.limit or None
    letters = list_dead_letters(_location(args), _selection(args, limit=limit))
    if out.json_mode:
        out.json(letters)
        return ExitCode.OK
    if not letters:
        out.line("no dead letters match")
        return ExitCode.OK
    out.line(
        f"{'ID':<26}  {'LAST FAILURE':<20}  {'EVENT':<20}  {'REASON':<14}  "
        f"{'ORIGINAL':<14}  REPLAYS  TRIES  MESSAGE"
    )
    for letter in letters:
        original = letter["original"]["error_type"] if letter["original"] else None
        out.line(
            f"{letter['id']:<26}  {letter['last_failure_at']:<20}  "
            f"{_shorten(letter['event'], 20):<20}  {letter['error_type']:<14}  "
            f"{_shorten(original, 14):<14}  {letter['replay_count']:>7}  "
            f"{letter['attempts']:>5}  {_shorten(letter['message'], 60)}"
        )
    if limit is not None and len(letters) >= limit:
        out.note(f"showing the first {limit}; --limit 0 shows all")
    return ExitCode.OK


def _run_show(args: argparse.Namespace, out: _Output) -> int:
    letter = show_dead_letter(_location(args), args.id)
    if letter is None:
        return out.fail(f"no dead letter with id {args.id}", ExitCode.INCOMPLETE)
    if out.json_mode:
        out.json(letter)
        return ExitCode.OK
    for name in ("id", "event", "error_type", "status", "message", "attempts"):
        out.line(f"{name:<17} {letter[name] if letter[name] is not None else '-'}")
    for name in ("first_failure_at", "last_failure_at", "logged_at"):
        if name in letter:
            out.line(f"{name:<17} {letter[name]}")
    original = letter["original"]
    if original is not None:
        out.line(
            f"{'original':<17} {original['error_type']} at {original['at']}: {original['message']}"
        )
    out.line(f"{'replays':<17} {letter['replay_count']}")
    for record in letter["replays"]:
        out.line(
            f"  replayed {record['at']}, came back {record['failed_at']}: "
            f"{record['error_type']}: {record['message']}"
        )
    stored = letter["stored_event"]
    out.line("event:")
    out.line(
        "  unreadable (the stored row could not be decoded)"
        if stored is None
        else json.dumps(stored, indent=2, ensure_ascii=False)
    )
    return ExitCode.OK


def _run_replay(args: argparse.Namespace, out: _Output) -> int:
    settings = _settings(args, sends=args.wait and not args.dry_run)
    bar = _Progress("replay", json_mode=out.json_mode)

    told = False

    def progress(report: ReplayReport) -> None:
        nonlocal told
        if report.past_window and not told:  # the first call comes before anything is sent
            told = True
            out.note(_past_window_line(report))
        bar.update(
            report.done, report.selected, "delivered or back" if report.waited else "put back"
        )

    _show_library_warnings()
    with stop_on_signals() as stop:
        try:
            report = replay_dead_letters(
                settings,
                _selection(args),
                handler_arguments=_handler_arguments(args) if args.wait else None,
                dry_run=args.dry_run,
                after_delete=args.after_delete,
                wait=args.wait,
                timeout=args.timeout,
                stop=stop,
                progress=progress,
            )
        finally:
            bar.finish()
    code = report.exit_code()
    if out.json_mode:
        out.json(report.to_dict())
        return code
    queued = [entry for entry in report.entries if entry.outcome != "refused"]
    if report.dry_run:
        out.line(
            f"dry run: {len(queued)} dead letter(s) would go back in the queue; nothing changed"
        )
        if report.past_window:
            out.line(_past_window_line(report))
    elif report.waited:
        out.line(
            f"replayed {len(queued)} dead letter(s) in {report.elapsed_seconds:g} s: "
            f"{len(report.ids('delivered'))} delivered, "
            f"{len(report.ids('dead_lettered'))} came back to the store, "
            f"{len(report.ids('still_queued'))} still queued"
        )
    else:
        sender = (
            "no process sends from this queue now: run `cio-logging drain`, or replay with --wait"
            if report.sender_pid is None
            else f"the sending process (pid {report.sender_pid}) delivers them"
            if report.sender_pid > 0
            else "the sending process delivers them"
        )
        out.line(f"put {len(queued)} dead letter(s) back in the queue; {sender}")
    for entry in report.entries:
        out.line(f"  {entry.id} ({entry.event}): {_replay_line(entry)}")
    if report.unreadable:
        out.note(
            f"skipped {len(report.unreadable)} unreadable entr(ies): {', '.join(report.unreadable)}"
        )
    if report.missing_ids:
        out.note(f"no dead letter with id {', '.join(report.missing_ids)}")
    if report.auth_error is not None:
        out.note(f"error: {_refusal_advice(report.auth_error)}; the entries wait in the queue")
    if report.interrupted:
        out.note("interrupted: what was put back stays in the queue")
    elif code == ExitCode.INCOMPLETE:
        out.note(f"work left: {report.work_left()}")
    return code


def _replay_line(entry: ReplayEntry) -> str:
    """What happened to one entry, and what it goes ahead of and lands behind."""
    words = {
        "queued": "put back",
        "would_queue": "would go back",
        "refused": f"not replayed: {entry.reason} (--after-delete to replay anyway)",
        "delivered": "delivered",
        "dead_lettered": f"came back to the store: {entry.reason}",
        "still_queued": "still queued at the bound",
    }[entry.outcome]
    parts = [words]
    if entry.ahead_of:
        parts.append(f"ahead of {entry.ahead_of} queued call(s) of its person")
    if entry.after_count:
        calls = ", ".join(
            f"{call['call']} {call['name']!r}" if call["call"] == "event" else str(call["call"])
            for call in entry.after
        )
        more = entry.after_count - len(entry.after)
        parts.append(
            f"after {entry.after_count} call(s) of its person delivered since it failed "
            f"({calls}{f', and {more} more' if more > 0 else ''})"
        )
    return "; ".join(parts)


def _past_window_line(report: ReplayReport) -> str:
    return (
        f"{report.past_window} of the {report.selected} selected entr(ies) are past "
        "Customer.io's 72-hour window: Customer.io records them, but triggers no campaign "
        "from them"
    )


def _run_purge(args: argparse.Namespace, out: _Output) -> int:
    queue_dir = _location(args)
    letters = select_dead_letters(queue_dir, _selection(args))
    if not letters:
        if out.json_mode:
            out.json({"selected": 0, "purged": 0, "ids": [], "exit_code": int(ExitCode.OK)})
        else:
            out.line("no dead letters match: nothing to purge")
        return ExitCode.OK
    if not args.yes:
        if not sys.stdin.isatty():
            return out.fail(
                f"refusing to purge {len(letters)} dead letter(s) without --yes: "
                "stdin is not a terminal to confirm on",
                ExitCode.USAGE,
            )
        sys.stderr.write(f"Delete {len(letters)} dead letter(s) for good? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            # Declining is the operator's choice, not an error; exit 1 as documented.
            if out.json_mode:
                out.json(
                    {
                        "selected": len(letters),
                        "purged": 0,
                        "ids": [],
                        "declined": True,
                        "exit_code": int(ExitCode.INCOMPLETE),
                    }
                )
            else:
                out.line(f"declined: nothing purged; the {len(letters)} dead letter(s) stay")
            return ExitCode.INCOMPLETE
    purged = purge_dead_letters(queue_dir, letters)
    if out.json_mode:
        out.json(
            {
                "selected": len(letters),
                "purged": purged,
                "ids": [x.key for x in letters],
                "exit_code": int(ExitCode.OK),
            }
        )
    else:
        out.line(f"purged {purged} dead letter(s)")
    return ExitCode.OK


def _handler_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The handler's constructor arguments from the command line (and the environment)."""
    return {
        "site_id": args.site_id,
        "api_key": args.api_key,
        "region": args.region,
        "track_url": args.track_url,
        "ca_bundle": args.ca_bundle,
        **_options(args),
    }


def _run_drain(args: argparse.Namespace, out: _Output) -> int:
    settings = _settings(args, sends=True)  # validates everything before we start
    handler_arguments = _handler_arguments(args)
    bar = _Progress("drain", json_mode=out.json_mode)
    waiting_noted = False

    def progress(report: Any) -> None:
        nonlocal waiting_noted
        if report.lock_holder_pid is not None and not report.held_lock and not waiting_noted:
            waiting_noted = True
            pid = report.lock_holder_pid
            holder = f"pid {pid}" if pid > 0 else "another process"
            out.note(
                f"{holder} holds delivery.lock and delivers from this queue; "
                f"waiting up to {args.timeout:g} s for it"
            )
        done = report.queued_at_start - min(report.queued, report.queued_at_start)
        bar.update(
            done,
            report.queued_at_start,
            f"done ({report.queued:,} left, breaker {report.breaker or '-'})",
        )

    _show_library_warnings()
    started = time.monotonic()
    with stop_on_signals() as stop:
        try:
            report = drain(
                handler_arguments,
                settings.queue_dir,
                timeout=args.timeout,
                stop=stop,
                progress=progress,
            )
        finally:
            bar.finish()
    code = report.exit_code()
    if out.json_mode:
        out.json(report.to_dict())
    else:
        out.line(
            f"drain: {report.delivered} delivered, {report.dead_lettered} dead-lettered, "
            f"{report.queued} left (of {report.queued_at_start}) in "
            f"{time.monotonic() - started:.1f} s"
        )
    if code == ExitCode.LOCKED and settings.queue_url is not None:
        out.note(
            f"error: pid {report.lock_holder_pid} (see status for its host) held the "
            f"workspace's lease for the whole {args.timeout:g} s bound; it sends the "
            "fleet's events itself"
        )
    elif code == ExitCode.LOCKED:
        out.note(
            f"error: pid {report.lock_holder_pid} held delivery.lock for the whole "
            f"{args.timeout:g} s bound; that process delivers this queue itself"
        )
    elif code == ExitCode.AUTH:
        out.note(f"error: {_refusal_advice(report.auth_error or '')}")
    elif code == ExitCode.INCOMPLETE:
        out.note(
            f"{report.queued} event(s) still queued at the bound "
            f"(last error: {report.last_error or 'none'}); they stay on disk"
        )
    elif code == ExitCode.INTERRUPTED:
        out.note("interrupted: what was not sent stays on disk")
    return code


def _environment_options() -> dict[str, Any]:
    """Handler options from ``$CIO_LOGGING_OPTIONS`` (how a supervising handler passes
    its own to its sender child: never on the command line)."""
    text = os.environ.get(ENV_OPTIONS, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except ValueError:
        raise ConfigurationError(f"{ENV_OPTIONS} must be a JSON object") from None
    if not isinstance(options, dict):
        raise ConfigurationError(f"{ENV_OPTIONS} must be a JSON object")
    return options


def _run_deliver(args: argparse.Namespace, out: _Output) -> int:
    parent = os.environ.get(ENV_PARENT, "").strip()
    parent_pid = int(parent) if parent.isdigit() else None
    if parent_pid is not None and not die_with_parent(parent_pid):
        return ExitCode.OK  # the supervising application died before we started
    options: dict[str, Any] = {**_environment_options(), **_options(args)}
    settings = _settings(args, sends=True, options=options)  # validates everything first
    handler_arguments: dict[str, Any] = {
        "site_id": args.site_id,
        "api_key": args.api_key,
        "region": args.region,
        "track_url": args.track_url,
        "ca_bundle": args.ca_bundle,
        **options,
    }

    def waiting(pid: int) -> None:
        holder = f"pid {pid}" if pid > 0 else "another process"
        what = "the workspace's lease" if settings.queue_url else "delivery.lock"
        out.note(f"{holder} holds {what} and sends; this process takes over when it stops")

    _show_library_warnings()
    with stop_on_signals() as stop:
        report = deliver(
            handler_arguments,
            settings.queue_dir,
            stop=stop,
            parent_pid=parent_pid,
            waiting=waiting,
        )
    if out.json_mode:
        out.json(report.to_dict())
    else:
        left = "-" if report.queued is None else str(report.queued)
        out.note(
            f"deliver: stopped; {report.delivered} delivered, {report.dead_lettered} "
            f"dead-lettered, {left} left on disk, in {report.elapsed_seconds:.1f} s"
        )
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
