"""A test run only by e2e/test_secrets.TestTheOutputCheck, in a pytest of its own.

Not named ``test_*.py``, so the default run does not collect it: it leaks the key on
purpose, to show that conftest's output check catches a leak.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from cio_logging import CustomerIOHandler
from cio_logging.simulator import TrackAPISimulator

from ..helpers import CANARY_BASIC, CANARY_KEY, CANARY_SITE, PYTHON


def test_output_check_probe(canary: TrackAPISimulator) -> None:
    """Run by the self-check below: does what CIO_TEST_OUTPUT_PROBE says."""
    kind = os.environ["CIO_TEST_OUTPUT_PROBE"]
    if kind == "print":
        print(f"key is {CANARY_KEY}")
    elif kind == "log":
        logging.getLogger("cio_logging.probe").debug("authorization: Basic %s", CANARY_BASIC)
    elif kind == "input":
        # The key as an input only: a handler built with it, nothing printed.
        handler = CustomerIOHandler(
            site_id=CANARY_SITE, api_key=CANARY_KEY, track_url=canary.url, ca_bundle=canary.ca_file,
            queue_dir=str(Path(os.environ["CIO_TEST_PROBE_QUEUE"])),
        )  # fmt: skip
        handler.close()
        subprocess.run([PYTHON, "-c", "print('quiet')"], env={"KEY": CANARY_KEY}, check=True)
