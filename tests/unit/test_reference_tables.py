"""The reference's tables list everything the code has, and nothing else.

docs/reference/settings.md (every setting of the handler), docs/reference/telemetry.md
(every metric) and docs/reference/queue-directory.md (every file in a queue directory)
are written for a reader, so they are not generated; these tests keep them whole: a new
option, metric or file without a row, or a row for one that is gone, fails.
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

from cio_logging import CustomerIOHandler, cio_event, config

from ..helpers import PROJECT_ROOT

SETTINGS_PAGE = PROJECT_ROOT / "docs" / "reference" / "settings.md"
TELEMETRY_PAGE = PROJECT_ROOT / "docs" / "reference" / "telemetry.md"
QUEUE_DIRECTORY_PAGE = PROJECT_ROOT / "docs" / "reference" / "queue-directory.md"


def documented_settings() -> set[str]:
    names: set[str] = set()
    for cell in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \|", SETTINGS_PAGE.read_text(), re.M):
        names.update(re.findall(r"`(\w+)`", cell))
    return names


class TestSettingsReference:
    """The settings table and the handler agree."""

    def test_every_setting_has_a_row_and_every_row_a_setting(self) -> None:
        arguments = {
            name
            for name, parameter in inspect.signature(CustomerIOHandler).parameters.items()
            if parameter.kind is not inspect.Parameter.VAR_KEYWORD
        }
        options = {*config.TUNABLE_OPTIONS, *config._OTHER_OPTIONS}
        documented = documented_settings()
        assert sorted((arguments | options) - documented) == [], "settings without a row"
        assert sorted(documented - (arguments | options)) == [], "rows without a setting"


class TestMetricsReference:
    """The metrics table and the instruments the handler creates agree."""

    def test_every_instrument_has_a_row_and_every_row_an_instrument(self) -> None:
        source = (PROJECT_ROOT / "cio_logging" / "telemetry.py").read_text()
        created = set(re.findall(r'create_\w+\(\s*"(cio\.[\w.]+)"', source))
        assert len(created) >= 10
        rows = re.findall(r"^\| ((?:`cio\.[\w.]+`(?:, )?)+) \|", TELEMETRY_PAGE.read_text(), re.M)
        documented = {name for cell in rows for name in re.findall(r"`([\w.]+)`", cell)}
        assert sorted(created - documented) == [], "metrics without a row"
        assert sorted(documented - created) == [], "rows without a metric"


def queue_directory_layout() -> tuple[set[str], set[str]]:
    """The names in the page's layout drawing, and those in its table's first column."""
    page = QUEUE_DIRECTORY_PAGE.read_text()
    drawing = page.split("```text", 1)[1].split("```", 1)[0]
    drawn = set(re.findall(r"[─└├│ ]+ ?([.\w<>-]+/?)", drawing))
    rows = re.findall(r"^\| (`[^|]+`) \|", page, re.M)
    tabled = {name for cell in rows for name in re.findall(r"`([^`]+)`", cell)}
    return drawn, tabled


class TestQueueDirectoryReference:
    """Every file the library puts in a queue directory is drawn and has a row."""

    def test_every_file_name_in_the_code_is_documented(self) -> None:
        # The names the package joins to a directory: lock and record files by their
        # literal, directories by `<directory> / "name"` (the demo's own work
        # directory and the simulator's are not a queue directory's).
        names: set[str] = set()
        for source in (PROJECT_ROOT / "cio_logging").rglob("*.py"):
            text = source.read_text()
            names.update(re.findall(r'"([\w.]+\.(?:lock|json))"', text))
            names.update(
                f"{name}/"
                for name in re.findall(r'(?:queue_dir(?:_path)?|\.parent) / "(\w+)"', text)
            )
        assert {"workspace.json", "state.json", "delivery.lock", "wal/", "spill/"} <= names
        drawn, tabled = queue_directory_layout()
        documented = drawn | {name.rsplit("/", 1)[-1] for name in tabled}
        assert sorted(names - documented) == [], "files of a queue directory not documented"

    def test_every_file_a_handler_leaves_is_drawn(self, tmp_path: Path) -> None:
        queue_dir = tmp_path / "queue"
        handler = CustomerIOHandler(
            "site", "key", queue_dir=queue_dir, track_url="https://127.0.0.1:9", deliver="none"
        )
        log = logging.getLogger("test.reference.queue_directory")
        log.propagate = False
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        try:
            log.info("purchase", extra=cio_event("user-1", amount=1))
            handler.commit()
        finally:
            log.removeHandler(handler)
            handler.close()
        drawn, _ = queue_directory_layout()
        left = {f"{path.name}/" if path.is_dir() else path.name for path in queue_dir.rglob("*")}
        # SQLite's journal files are drawn on one line, as "cache.db-wal, -shm".
        left -= {"cache.db-wal", "cache.db-shm"}
        assert {"wal/", "dead/", "workspace.json"} <= left
        assert sorted(left - drawn) == [], "files a handler leaves, not in the drawing"
