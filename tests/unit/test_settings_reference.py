"""docs/reference/settings.md lists every setting the handler takes, and nothing else.

The table is written for a reader, so it is not generated; this test keeps it whole:
a new option without a row (or a row for an option that is gone) fails here.
"""

from __future__ import annotations

import inspect
import re

from cio_logging import CustomerIOHandler, config

from ..helpers import PROJECT_ROOT

SETTINGS_PAGE = PROJECT_ROOT / "docs" / "reference" / "settings.md"


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
