"""MkDocs hook: the command line's options, generated from its argparse parser.

A line ``{{ cli_options("dlq replay") }}`` in a page becomes a table of that command's
own options, with their help text, as ``cio-logging dlq replay --help`` gives them;
``{{ cli_options("common") }}`` is the table of the options every operator command
shares. The reference can then never name an option that does not exist, nor miss one.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from cio_logging.cli import _parser

_MARKER = re.compile(r'^\{\{ cli_options\("([a-z ]+)"\) \}\}$', re.MULTILINE)
# The group every operator command inherits from the same parent parser.
_COMMON_GROUP = "queue and credentials (as the handler resolves them)"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return _MARKER.sub(lambda match: options_table(match.group(1)), markdown)


def options_table(command: str) -> str:
    """The markdown table of ``command``'s options (``"common"``: the shared ones)."""
    if command == "common":
        parser = _command_parser("status")
        actions = _group_actions(parser, _COMMON_GROUP)
    else:
        parser = _command_parser(command)
        common = {id(a) for a in _group_actions(parser, _COMMON_GROUP)}
        actions = [a for a in parser._actions if id(a) not in common]
    rows = [
        f"| {_invocation(action)} | {_help(action)} |"
        for action in actions
        if action.help is not argparse.SUPPRESS and "--help" not in action.option_strings
    ]
    if not rows:
        return f"`cio-logging {command}` has no options of its own."
    return "\n".join(["| option | meaning |", "| --- | --- |", *rows])


def _command_parser(command: str) -> argparse.ArgumentParser:
    parser = _parser()
    for word in command.split():
        parser = _subparsers(parser)[word]
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise KeyError(f"{parser.prog} has no subcommands")


def _group_actions(parser: argparse.ArgumentParser, title: str) -> list[argparse.Action]:
    for group in parser._action_groups:
        if group.title == title:
            return list(group._group_actions)
    return []


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:  # a positional argument
        return f"`{action.metavar or action.dest.upper()}`"
    if action.nargs == 0:
        return ", ".join(f"`{option}`" for option in action.option_strings)
    if action.choices is not None:
        value = "|".join(str(choice) for choice in action.choices)
    else:
        value = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return ", ".join(f"`{option} {value}`" for option in action.option_strings)


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace("%(default)s", str(action.default))
    return text.replace("|", "\\|").replace("\n", " ")
