"""README.md works as written: every Python block is run, and the CLI synopsis is real.

Each ```python block runs in its own interpreter, with the environment a handler reads
(``CUSTOMERIO_SITE_ID``/``API_KEY``, ``CIO_LOGGING_TRACK_URL``, ``CIO_LOGGING_CA_BUNDLE``,
``CIO_LOGGING_QUEUE_DIR`` in tmp) pointing at a running simulator. It must exit 0, and
every event it logs must arrive. A block that cannot run as written is marked on the line
before it with ``<!-- not-run: reason -->``: it is compiled, then skipped with that reason.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from cio_logging.cli import _parser, main
from cio_logging.simulator import TrackAPISimulator

from ..helpers import PROJECT_ROOT, PYTHON, child_environment

README = PROJECT_ROOT / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->$")
_LOG_METHODS = frozenset({"debug", "info", "warning", "error", "critical", "exception", "log"})


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # of the opening fence, 1-based
    code: str
    not_run: str | None  # the reason, when marked


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block, with the not-run reason of the line before it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None or not opening.group(1):
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = _NOT_RUN.match(before.strip())
        code = "\n".join(lines[index + 1 : end]) + "\n"
        blocks.append(Block(opening.group(1), index + 1, code, marker and marker.group(1)))
        index = end + 1
    return blocks


# The helpers that tag a record, and the name the call arrives with: a person call's
# own, or (None) the event's or view's name (name=, else the message).
_HELPERS = {
    "cio_event": None,
    "cio_page": None,
    "cio_screen": None,
    "cio_identify": "identify",
    "cio_delete": "delete",
    "cio_suppress": "suppress",
    "cio_unsuppress": "unsuppress",
}


def logged_event_names(code: str) -> list[str]:
    """The names of the calls a block logs: ``log.info("name", extra=cio_event(...))``,
    and the same with any other helper (a view's name is its second argument)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(code)):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _LOG_METHODS
        ):
            continue
        extra = next((k.value for k in node.keywords if k.arg == "extra"), None)
        helper = getattr(extra.func, "id", None) if isinstance(extra, ast.Call) else None
        if not isinstance(extra, ast.Call) or helper not in _HELPERS:
            continue
        own = _HELPERS[helper]
        if own is not None:
            names.append(own)
            continue
        named = next((k.value for k in extra.keywords if k.arg == "name"), None)
        if named is None and helper in ("cio_page", "cio_screen") and len(extra.args) > 1:
            named = extra.args[1]
        message = named if named is not None else node.args[0]
        assert isinstance(message, ast.Constant), ast.unparse(node)
        names.append(str(message.value))
    return names


PYTHON_BLOCKS = [block for block in readme_blocks(README.read_text()) if block.language == "python"]


class TestReadmePythonBlocks:
    """Every ```python block in README.md runs as written and delivers what it logs."""

    def test_there_are_blocks_and_the_first_one_logs_an_event(self) -> None:
        assert len(PYTHON_BLOCKS) >= 3
        assert logged_event_names(PYTHON_BLOCKS[0].code) == ["purchase"]

    @pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"line-{b.line}" for b in PYTHON_BLOCKS])
    def test_block_runs_and_its_events_arrive(
        self, block: Block, simulator: TrackAPISimulator, tmp_path: Path
    ) -> None:
        compile(block.code, f"README.md:{block.line}", "exec")  # even a block not run
        if block.not_run is not None:
            assert block.not_run, f"README.md:{block.line}: a not-run marker needs a reason"
            pytest.skip(f"README.md line {block.line} is marked not-run: {block.not_run}")
        result = subprocess.run(
            [PYTHON, "-c", block.code],
            cwd=tmp_path,
            env=child_environment(simulator, tmp_path / "queue"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"README.md:{block.line}\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        names = logged_event_names(block.code)
        # The block's process has exited: logging.shutdown() delivered what it logged.
        assert sorted(event.name for event in simulator.accepted) == sorted(names), (
            f"README.md:{block.line}: logged {names}, the simulator accepted "
            f"{[event.name for event in simulator.accepted]}\n{result.stderr}"
        )


class TestReadmeCommandSynopsis:
    """The operator CLI's synopsis names only commands and flags that exist."""

    def synopsis(self) -> list[list[str]]:
        block = next(
            b
            for b in readme_blocks(README.read_text())
            if b.language == "bash" and b.code.startswith("cio-logging status")
        )
        return [
            shlex.split(line.partition("#")[0].replace("[", " ").replace("]", " "))
            for line in block.code.splitlines()
            if line.strip()
        ]

    def test_every_command_and_flag_in_the_synopsis_exists(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        lines = self.synopsis()
        assert len(lines) >= 7
        for words in lines:
            assert words[0] == "cio-logging"
            command = [w for w in words[1:3] if w.islower() and not w.startswith("-")]
            with pytest.raises(SystemExit) as exit_:
                main([*command, "--help"])
            assert exit_.value.code == 0
            usage = capsys.readouterr().out
            for flag in (w.split("|")[0] for w in words if w.startswith("--")):
                assert re.search(rf"(^|\s){re.escape(flag)}\b", usage), (command, flag)

    def test_every_command_quoted_in_the_text_parses(self) -> None:
        """`cio-logging ...` in the prose (the runbook's steps): real commands and flags."""
        quoted = re.findall(r"`(cio-logging [^`]*)`", README.read_text())
        assert len(quoted) >= 8
        for text in quoted:
            words = shlex.split(text.replace("[", " ").replace("]", " "))[1:]
            if words[0] == "simulator":  # its own parser: checked through --help elsewhere
                continue
            if "--version" in words:
                with pytest.raises(SystemExit) as exit_:
                    _parser().parse_args(words)
                assert exit_.value.code == 0, text
            else:
                _parser().parse_args(words)  # a bad flag or value: SystemExit(2)
