"""The pytest plugin of :mod:`cio_logging.testing`, registered as the ``pytest11`` entry
point ``cio_logging``.

It is active only where the ``testing`` extra is installed (``pip install
'cio-logging[testing]'``): pytest loads this module wherever cio-logging is installed,
and without trustme (which the simulator needs) it registers nothing, so the
application's pytest sessions are left as they were. Active, it adds one fixture,
``cio_simulator``, and no hook. With ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set, load it
with ``-p cio_logging.pytest_plugin``.
"""

from __future__ import annotations

import importlib.util

import pytest

#: The name the fixtures are registered under.
FIXTURES_PLUGIN = "cio_logging.fixtures"


def testing_extra_installed() -> bool:
    """Whether what the ``testing`` extra installs (trustme, beside pytest) can be imported."""
    return importlib.util.find_spec("trustme") is not None


def pytest_configure(config: pytest.Config) -> None:
    if testing_extra_installed() and not config.pluginmanager.has_plugin(FIXTURES_PLUGIN):
        from . import _pytest_fixtures

        config.pluginmanager.register(_pytest_fixtures, FIXTURES_PLUGIN)
