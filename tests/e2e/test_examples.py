"""Every example runs against the simulator, as a user would run it."""

from __future__ import annotations

import logging
import logging.config
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.simulator import TrackAPISimulator

from ..helpers import PROJECT_ROOT, PYTHON, child_environment

EXAMPLES = PROJECT_ROOT / "examples"


def test_plain_script(simulator: TrackAPISimulator, queue_dir: Path) -> None:
    subprocess.run(
        [PYTHON, str(EXAMPLES / "plain_script.py")],
        check=True,
        timeout=60,
        env=child_environment(simulator, queue_dir),
    )
    received = {(e.name, e.customer_id, e.anonymous_id) for e in simulator.accepted}
    assert received == {
        ("signup", "user-42", None),
        ("purchase", "user-42", None),
        ("viewed_pricing", None, "visitor-7"),
    }


def test_yaml_dictconfig(
    simulator: TrackAPISimulator, queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in child_environment(simulator, queue_dir).items():
        if key.startswith(("CUSTOMERIO_", "CIO_LOGGING_")):
            monkeypatch.setenv(key, value)
    config = yaml.safe_load((EXAMPLES / "logging.yaml").read_text())
    logging.config.dictConfig(config)
    events = logging.getLogger("app.events")
    events.info("purchase", extra=cio_event("user-1", amount=5))
    (handler,) = events.handlers
    assert isinstance(handler, CustomerIOHandler)
    handler.flush()
    assert [(e.name, e.data) for e in simulator.accepted] == [("purchase", {"amount": 5})]


def test_django_logging_setting(simulator: TrackAPISimulator, queue_dir: Path) -> None:
    """Django itself applies LOGGING at setup, in a fresh interpreter."""
    script = textwrap.dedent(f"""
        import logging, sys
        sys.path.insert(0, {str(EXAMPLES)!r})
        import django
        from django.conf import settings
        import django_settings
        settings.configure(LOGGING=django_settings.LOGGING, INSTALLED_APPS=[])
        django.setup()
        from cio_logging import cio_event
        logging.getLogger("app.events").info("purchase", extra=cio_event("7", amount=12))
    """)
    subprocess.run(
        [PYTHON, "-c", script], check=True, timeout=60, env=child_environment(simulator, queue_dir)
    )
    assert [(e.name, e.customer_id) for e in simulator.accepted] == [("purchase", "7")]
