"""A smoke test of an installed cio-logging (run by .ci/check-package from the wheel).

Usage: python smoke_test.py WORKDIR. Every module of the package imports (or names the
optional dependency it needs), its data files are there, a handler delivers to the
simulator and dead-letters a rejected event, and the operator commands read the queue.
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import logging
import pkgutil
import subprocess
import sys
from pathlib import Path

import cio_logging
from cio_logging import CustomerIOHandler, cio_event, cio_identify
from cio_logging.simulator import TrackAPISimulator


def check_modules() -> None:
    for module in pkgutil.walk_packages(cio_logging.__path__, "cio_logging."):
        if module.name.endswith(".__main__"):  # runs the command line when imported
            continue
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] == "cio_logging":
                raise  # a module of the package itself is missing from the wheel
            print(f"smoke: {module.name} needs the optional {exc.name}")


def check_data() -> None:
    root = importlib.resources.files("cio_logging")
    assert root.joinpath("py.typed").is_file(), "py.typed is missing"
    sql = root.joinpath("store", "sql")
    assert sql.joinpath("queries.sql").read_text(encoding="utf-8").strip()
    migrations = [p.name for p in sql.joinpath("migrations").iterdir() if p.name.endswith(".sql")]
    assert migrations, "no migrations in the wheel"


def check_delivery(workdir: Path) -> Path:
    queue_dir = workdir / "queue"
    with TrackAPISimulator(state_dir=workdir / "simulator") as simulator:
        simulator.poison("bad_event")
        handler = CustomerIOHandler(
            site_id=simulator.site_id,
            api_key=simulator.api_key,
            track_url=simulator.url,
            ca_bundle=simulator.ca_file,
            queue_dir=queue_dir,
            flush_interval=0.05,
        )
        log = logging.getLogger("smoke.events")
        log.propagate = False
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        log.info("identify", extra=cio_identify("user-1", plan="pro"))
        log.info("purchase", extra=cio_event("user-1", amount=9.99))
        log.info("bad_event", extra=cio_event("user-1"))
        handler.flush()
        status = handler.status()
        log.removeHandler(handler)
        handler.close()
        names = sorted(call.name for call in simulator.accepted)
    assert names == ["identify", "purchase"], names
    assert status["dead_letters"] == 1, status
    assert status["queued"] == 0, status
    return queue_dir


def check_commands(queue_dir: Path) -> None:
    script = Path(sys.executable).parent / "cio-logging"
    status = subprocess.run(
        [str(script), "--json", "status", "--queue-dir", str(queue_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(status.stdout)
    assert report["dead_letters"] == 1, report
    listing = subprocess.run(
        [str(script), "dlq", "list", "--queue-dir", str(queue_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "bad_event" in listing.stdout, listing.stdout


def main() -> None:
    workdir = Path(sys.argv[1])
    workdir.mkdir(parents=True, exist_ok=True)
    check_modules()
    check_data()
    queue_dir = check_delivery(workdir)
    check_commands(queue_dir)
    print(f"smoke: cio-logging {cio_logging.__version__} from {Path(cio_logging.__file__).parent}")


if __name__ == "__main__":
    main()
