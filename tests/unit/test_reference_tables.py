"""The reference's tables list everything the code has, and nothing else.

docs/reference/settings.md (every setting of the handler) and docs/reference/telemetry.md
(every metric) are written for a reader, so they are not generated; these tests keep
them whole: a new option or metric without a row, or a row for one that is gone, fails.
"""

from __future__ import annotations

import inspect
import re

from cio_logging import CustomerIOHandler, config

from ..helpers import PROJECT_ROOT

SETTINGS_PAGE = PROJECT_ROOT / "docs" / "reference" / "settings.md"
TELEMETRY_PAGE = PROJECT_ROOT / "docs" / "reference" / "telemetry.md"


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
