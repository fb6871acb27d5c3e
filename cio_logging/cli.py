"""The ``cio-logging`` command.

Subcommands: ``demo`` (the main job: the whole path against the embedded simulator)
and ``simulator`` (run the Track API simulator for manual testing). Operator commands
(status, dead letters, replay, drain) build on the same modules.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cio-logging", description="Customer.io events through Python logging: demo and tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the end-to-end demo against the simulator")
    demo.add_argument(
        "--outage-seconds",
        type=float,
        default=4.0,
        help="how long the simulated outage lasts (default 4)",
    )
    commands.add_parser("simulator", help="run the Track API simulator", add_help=False)
    args, rest = parser.parse_known_args(argv)

    if args.command == "simulator":
        from .simulator import run_from_command_line

        return run_from_command_line(rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.command == "demo":
        from .demo import run_demo

        # Show the library's own warnings (delivery failures, refused events) briefly.
        logging.basicConfig(
            level=logging.WARNING,
            stream=sys.stdout,
            format="[%(asctime)s]   (%(name)s log) %(message)s",
            datefmt="%H:%M:%S",
        )
        return run_demo(outage_seconds=args.outage_seconds)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
