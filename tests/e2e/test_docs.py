"""README.md and every page of docs/ work as written: their code blocks run.

Each page is a session, as a reader would have it: its blocks run in order, in one
working directory of their own, with ``HOME`` there too and the four variables the
simulator prints (``CUSTOMERIO_SITE_ID``, ``CUSTOMERIO_API_KEY``,
``CIO_LOGGING_TRACK_URL``, ``CIO_LOGGING_CA_BUNDLE``) pointing at a running simulator,
and the test environment's ``bin`` first on ``PATH`` (``cio-logging``, ``python``).

- ```python: runs in its own interpreter; it must exit 0, and the calls it logs (found
  in its code, and in the page's files it imports) must be the ones the simulator
  accepted meanwhile.
- ```bash: runs with ``bash -eu -o pipefail``; it must exit 0.
- ```ini, ```yaml, ```json, ```toml: parsed; a block is written to a file for later
  blocks with ``<!-- file: NAME -->`` on the line before it (a python block too).
- ```text: output or a drawing; never run.
- ``<!-- synopsis -->``: a command synopsis (``[--by event|reason]``): every command
  and option in it must exist.
- ``<!-- not-run: reason -->``: compiled or parsed, not run. Every such block is listed
  in NOT_RUN below, so marking one is a visible decision.
- A block that is only ``--8<-- "path"`` is included from that repository file at
  build time; the file must exist (its own tests run it).
"""

from __future__ import annotations

import ast
import configparser
import importlib.util
import json
import os
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cio_logging.cli import _parser, main
from cio_logging.simulator import TrackAPISimulator, run_from_command_line

from ..helpers import PROJECT_ROOT, PYTHON

DOCS = PROJECT_ROOT / "docs"
PAGES = [PROJECT_ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
RUNNABLE = ("python", "bash")
PARSED = ("ini", "yaml", "json", "toml")

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*(not-run|file|synopsis)\s*(?::\s*(.*?))?\s*-->$")
_INCLUDE = re.compile(r'^--8<-- "([^"]+)"$')
_LOG_METHODS = frozenset({"debug", "info", "warning", "error", "critical", "exception", "log"})

#: Every block marked not-run: (page, its first line). A block that can run must run;
#: one that cannot is marked, with its reason, and listed here.
NOT_RUN = {
    ("README.md", "# 1. The demo, with the simulator: no credentials, no set-up."),
    ("README.md", "# Customer.io: Settings > API credentials > Track API keys"),
    ("README.md", '.venv/bin/pip install -e ".[docs]" && .venv/bin/mkdocs serve'),
    ("README.md", ".venv/bin/pytest                                 # the default suite"),
    ("docs/index.md", 'python3 -m venv .venv && .venv/bin/pip install -e ".[simulator]"'),
    ("docs/index.md", "# Customer.io: Settings > API credentials > Track API keys"),
    ("docs/tutorial.md", 'python3 -m venv .venv && .venv/bin/pip install -e ".[simulator]"'),
    ("docs/tutorial.md", "cio-logging simulator --state-dir sim"),
    ("docs/tutorial.md", "export CUSTOMERIO_SITE_ID=sim-site CUSTOMERIO_API_KEY=sim-key"),
    ("docs/tutorial.md", "unset CIO_LOGGING_TRACK_URL CIO_LOGGING_CA_BUNDLE"),
    ("docs/tutorial.md", 'pip install -e ".[otel]"'),
    ("docs/tutorial.md", "prometheus --config.file=prometheus.yml"),
    ("docs/how-to/django.md", "import logging"),
    ("docs/how-to/flask.md", "waitress-serve --port 8000 shop:app"),
    ("docs/how-to/fastapi-uvicorn.md", "uvicorn shop:app --workers 2"),
    ("docs/how-to/gunicorn.md", "gunicorn --preload --workers 4 shop:app"),
    ("docs/how-to/gunicorn.md", "gunicorn --worker-class gevent --workers 4 shop:app"),
    ("docs/how-to/celery.md", "celery -A tasks worker --pool prefork --concurrency 4"),
    ("docs/how-to/structlog.md", 'log.info("purchase", extra=cio_event("user-42", amount=9.99))'),
    ("docs/how-to/structlog.md", 'log.info("purchase", **cio_event("user-42", amount=9.99))'),
    ("docs/how-to/fleet.md", "from cio_logging import CustomerIOHandler"),
    ("docs/how-to/fleet.md", 'psql -c "SELECT count(*), event FROM cio_dead_letter GROUP BY'),
    ("docs/how-to/sender-process.md", "# /etc/systemd/system/myapp-cio-deliver.service"),
    ("docs/how-to/sender-process.md", "spec:"),
    ("docs/how-to/opentelemetry-collector.md", "import logging"),
    ("docs/how-to/opentelemetry-collector.md", "otelcol-contrib --config"),
    ("docs/how-to/pipelines-api.md", "from cio_logging import CustomerIOHandler"),
    ("docs/how-to/testing.md", "import logging"),
    ("docs/how-to/simulator.md", "cio-logging simulator --state-dir sim"),
    ("docs/reference/settings.md", "from cio_logging import CustomerIOHandler"),
}


@dataclass(frozen=True)
class Block:
    page: str  # relative to the project root
    language: str
    line: int  # of the opening fence, 1-based
    code: str
    marker: str | None  # "not-run", "file" or "synopsis"
    argument: str | None  # the not-run reason, the file name

    @property
    def first_line(self) -> str:
        return self.code.splitlines()[0] if self.code.strip() else ""

    @property
    def include(self) -> str | None:
        match = _INCLUDE.match(self.code.strip())
        return match and match.group(1)

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def page_blocks(path: Path) -> list[Block]:
    """Every fenced block of a page (at the start of a line), with the marker before it."""
    page = str(path.relative_to(PROJECT_ROOT))
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = _MARKER.match(before.strip())
        blocks.append(
            Block(
                page=page,
                language=opening.group(1),
                line=index + 1,
                code="\n".join(lines[index + 1 : end]) + "\n",
                marker=marker and marker.group(1),
                argument=marker and marker.group(2),
            )
        )
        index = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in page_blocks(page)]


# -- what each block logs ------------------------------------------------------------------

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
    "cio_add_device": "add_device",
    "cio_delete_device": "delete_device",
    "cio_merge": "merge",
    "cio_add_relationships": "add_relationships",
    "cio_delete_relationships": "delete_relationships",
    "cio_group": "group",
    "cio_alias": "alias",
}


def logged_event_names(code: str) -> list[str]:
    """The names of the calls code logs: ``log.info("name", extra=cio_event(...))``,
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
        if isinstance(message, ast.Constant):
            names.append(str(message.value))
        else:  # a name computed at run time: count the call, whatever its name
            names.append("*")
    return names


def imported_modules(code: str) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


def expected_names(block: Block, files: dict[str, str]) -> list[str]:
    """What a python block delivers: what it logs, itself and through the page's files it
    imports, when a ``CustomerIOHandler`` is configured (in the block, or in a file the
    page wrote before it: a settings module, an INI file); else nothing (a capture)."""
    if not any("CustomerIOHandler" in text for text in (block.code, *files.values())):
        return []
    names = logged_event_names(block.code)
    for module in imported_modules(block.code):
        source = files.get(f"{module}.py")
        if source is not None:
            names += logged_event_names(source)
    return names


# -- running a page ----------------------------------------------------------------------


def page_environment(sim: TrackAPISimulator, home: Path) -> dict[str, str]:
    """A reader's shell after pasting the simulator's export line, nothing more."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CIO_LOGGING_", "CUSTOMERIO_", "XDG_", "PYTHON"))
    }
    env.update(
        {
            "HOME": str(home),
            "PATH": os.pathsep.join([str(Path(PYTHON).parent), env.get("PATH", "")]),
            "CUSTOMERIO_SITE_ID": sim.site_id,
            "CUSTOMERIO_API_KEY": sim.api_key,
            "CIO_LOGGING_TRACK_URL": sim.url,
            "CIO_LOGGING_CA_BUNDLE": sim.ca_file,
        }
    )
    return env


def parse(block: Block, text: str) -> None:
    """Compile or parse a block for its language; raises when it is not valid."""
    if block.language == "python":
        compile(text, str(block), "exec")
    elif block.language == "ini":
        configparser.ConfigParser(interpolation=None).read_string(text)
    elif block.language == "yaml":
        list(yaml.safe_load_all(text))
    elif block.language == "json":
        json.loads(text)
    elif block.language == "toml":
        tomllib.loads(text)


def run_page(page: Path, sim: TrackAPISimulator, workdir: Path) -> None:
    home = workdir / "home"
    home.mkdir(parents=True)
    env = page_environment(sim, home)
    files: dict[str, str] = {}
    for block in page_blocks(page):
        if block.marker == "file":
            assert block.argument, f"{block}: a file marker needs a name"
            (workdir / block.argument).write_text(block.code, encoding="utf-8")
            files[block.argument] = block.code
        if block.marker is not None or block.language not in RUNNABLE:
            continue
        if block.language == "bash":
            command = ["bash", "-eu", "-o", "pipefail", "-c", block.code]
        else:
            command = [PYTHON, "-c", block.code]
            sim.clear()
        result = subprocess.run(
            command, cwd=workdir, env=env, capture_output=True, text=True, timeout=90
        )
        shown = f"{block}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        assert result.returncode == 0, shown
        assert "Traceback" not in result.stderr, shown
        if block.language == "python":
            names = expected_names(block, files)
            # The block's process has exited: logging.shutdown() delivered what it logged.
            accepted = [event.name for event in sim.accepted]
            if "*" in names:
                assert len(accepted) == len(names), f"{shown}\naccepted {accepted}"
            else:
                assert sorted(accepted) == sorted(names), f"{shown}\naccepted {accepted}"


PAGES_WITH_RUNNABLE_BLOCKS = [
    page
    for page in PAGES
    if any(b.marker is None and b.language in RUNNABLE for b in page_blocks(page))
]


class TestEveryBlockRuns:
    """Each page's blocks run in order, as a reader would run them."""

    @pytest.mark.parametrize(
        "page",
        PAGES_WITH_RUNNABLE_BLOCKS,
        ids=[str(p.relative_to(PROJECT_ROOT)) for p in PAGES_WITH_RUNNABLE_BLOCKS],
    )
    def test_page_runs_as_written(
        self, page: Path, simulator: TrackAPISimulator, tmp_path: Path
    ) -> None:
        run_page(page, simulator, tmp_path / "reader")


class TestEveryBlockIsAccountedFor:
    """No block is silently skipped: each runs, is parsed, or is marked and listed."""

    def test_there_are_pages_and_blocks(self) -> None:
        assert len(PAGES) >= 30
        assert sum(b.language == "python" and b.marker is None for b in ALL_BLOCKS) >= 12
        readme = page_blocks(PROJECT_ROOT / "README.md")
        first_python = next(b for b in readme if b.language == "python")
        assert logged_event_names(first_python.code) == ["purchase"]

    @pytest.mark.parametrize("block", ALL_BLOCKS, ids=[str(b) for b in ALL_BLOCKS])
    def test_block_is_valid_for_its_language(self, block: Block) -> None:
        assert block.language, f"{block}: name the block's language after the fence"
        if block.include is not None:
            included = PROJECT_ROOT / block.include
            assert included.is_file(), f"{block}: includes {block.include}, which is missing"
            parse(block, included.read_text(encoding="utf-8"))
            return
        parse(block, block.code)
        if block.language not in (*RUNNABLE, "text"):
            assert block.marker in ("file", "not-run"), (
                f"{block}: a {block.language} block is written to a file for later blocks "
                "(<!-- file: NAME -->) or marked <!-- not-run: reason -->"
            )

    def test_code_fits_the_page(self) -> None:
        """No line of a site's code block is wider than the page shows (88 characters
        beside both sidebars at 1280 pixels): a reader would have to scroll for it."""
        wide = [
            f"{block}+{number}: {len(line)} characters"
            for block in ALL_BLOCKS
            if block.page.startswith("docs/")
            for number, line in enumerate(block.code.splitlines(), 1)
            if len(line) > 88
        ]
        assert not wide, wide

    def test_no_page_reads_like_internal_notes(self) -> None:
        """Written for a reader: no issue numbers, to-dos or work-in-progress asides."""
        notes = re.compile(
            r"\bissues? \d+|\bTODO\b|\bFIXME\b|\bXXX\b|planned, not built|not proven"
            r"|of the issue's targets|our reading",
            re.IGNORECASE,
        )
        found = [
            f"{page.relative_to(PROJECT_ROOT)}:{number}: {match.group(0)}"
            for page in PAGES
            for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
            for match in notes.finditer(line)
        ]
        assert not found, found

    def test_blocks_not_run_are_the_listed_ones(self) -> None:
        marked = [b for b in ALL_BLOCKS if b.marker == "not-run"]
        for block in marked:
            assert block.argument, f"{block}: a not-run marker needs a reason"
        unlisted = [str(b) for b in marked if not any(_matches(b, *entry) for entry in NOT_RUN)]
        assert not unlisted, f"marked not-run but not in NOT_RUN: {unlisted}"
        stale = [entry for entry in NOT_RUN if not any(_matches(b, *entry) for b in marked)]
        assert not stale, f"in NOT_RUN but no longer marked: {sorted(stale)}"

    def test_the_cli_option_tables_name_real_commands(self) -> None:
        spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
        assert spec is not None
        assert spec.loader is not None
        hooks = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hooks)
        for page in PAGES:
            for command in re.findall(r'\{\{ cli_options\("([a-z ]+)"\) \}\}', page.read_text()):
                assert "| option | meaning |" in hooks.options_table(command), (page, command)


def _matches(block: Block, page: str, first_line: str) -> bool:
    return block.page == page and block.first_line.startswith(first_line)


class TestCommandsInTheText:
    """Every ``cio-logging ...`` the pages show names commands and options that exist."""

    def synopsis_lines(self) -> list[list[str]]:
        lines = []
        for block in ALL_BLOCKS:
            if block.marker != "synopsis":
                continue
            joined: list[str] = []
            for line in block.code.splitlines():
                if line.startswith(" ") and joined:  # a long command, continued
                    joined[-1] += line
                elif line.strip():
                    joined.append(line)
            for line in joined:
                text = line.partition("#")[0].replace("[", " ").replace("]", " ")
                lines.append(shlex.split(text))
        return lines

    def test_every_command_and_option_in_a_synopsis_exists(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        lines = self.synopsis_lines()
        assert len(lines) >= 9
        for words in lines:
            assert words[0] == "cio-logging"
            command = [w for w in words[1:3] if w.islower() and not w.startswith("-")]
            if command == ["simulator"]:  # a parser of its own
                parse, arguments = run_from_command_line, ["--help"]
            else:
                parse, arguments = main, [*command, "--help"]
            with pytest.raises(SystemExit) as exit_:
                parse(arguments)
            assert exit_.value.code == 0
            usage = capsys.readouterr().out
            for option in (w.split("|")[0] for w in words if w.startswith("--")):
                assert re.search(rf"(^|\s){re.escape(option)}\b", usage), (command, option)

    def test_every_command_quoted_in_the_text_parses(self) -> None:
        """`cio-logging ...` in the prose (the runbook's steps): real commands and options."""
        pattern = re.compile(r"`(cio-logging [^`]*)`")
        quoted = [text for page in PAGES for text in pattern.findall(page.read_text())]
        assert len(quoted) >= 20
        for text in quoted:
            words = shlex.split(text.replace("[", " ").replace("]", " ").replace("…", ""))[1:]
            if not words or words[0] == "simulator":  # its own parser
                continue
            if "--version" in words:
                with pytest.raises(SystemExit) as exit_:
                    _parser().parse_args(words)
                assert exit_.value.code == 0, text
            else:
                _parser().parse_args(words)  # a bad command, option or value: SystemExit(2)
