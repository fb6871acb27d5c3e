"""An ``argparse`` parser whose usage errors are one line, for every ``cio-logging`` command.

argparse prints the whole usage (six to ten lines of options) before a usage error, so
the error itself, the one line an operator needs, scrolls by at the bottom. Here a
usage error is ``cio-logging: error: <command>: <message> (see <command> --help)`` on
stderr and exit code 2; the usage is printed by ``--help`` only. With ``--json`` the
same error also goes to stdout as ``{"error": ..., "exit_code": 2}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import NoReturn

#: The exit code of a usage error, as argparse and every command use it.
USAGE_EXIT_CODE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, with each usage error on one line (sub-parsers inherit the class)."""

    #: Set by the command before parsing: answer in JSON too.
    json_wanted = False

    def error(self, message: str) -> NoReturn:
        message = _plainer(message)
        command = self.prog.removeprefix("cio-logging").strip()
        where = f"{command}: " if command else ""
        line = f"{where}{message} (see {self.prog} --help)"
        if OneLineParser.json_wanted:
            print(json.dumps({"error": line, "exit_code": USAGE_EXIT_CODE}))
        print(f"cio-logging: error: {line}", file=sys.stderr, flush=True)
        sys.exit(USAGE_EXIT_CODE)


# argparse names a missing or unknown subcommand by its metavar, "{demo,simulator,...}".
_CHOICES = re.compile(r"^argument \{([^}]*)\}: invalid choice: ('[^']*')")
_REQUIRED = re.compile(r"^the following arguments are required: \{([^}]*)\}$")


def _plainer(message: str) -> str:
    """argparse's wording for a missing or unknown command, said plainly."""
    unknown = _CHOICES.match(message)
    if unknown:
        choices = unknown.group(1).replace(",", ", ")
        return f"unknown command {unknown.group(2)} (choose from {choices})"
    missing = _REQUIRED.match(message)
    if missing:
        return f"a command is required (one of {missing.group(1).replace(',', ', ')})"
    return message
