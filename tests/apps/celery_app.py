"""A Celery application run by tests/e2e/test_servers.py as a prefork worker.

The broker is kombu's filesystem transport (``CIO_TEST_BROKER_DIR``): no broker server.
The handler is configured the way a Celery user would, chosen by ``CIO_TEST_CELERY_SETUP``:

``worker_process_init``
    each pool child builds its own handler when it starts, and flushes and closes it
    on ``worker_process_shutdown`` (pool children leave through ``os._exit``, so
    ``logging.shutdown`` never runs there); the main worker process has none.
``setup_logging``
    the main process configures logging with ``dictConfig`` in Celery's
    ``setup_logging`` signal (which also stops Celery from touching the root logger);
    the pool children are forked from it and inherit the handler.

Each ``log_purchase`` task logs one essential event (its emit returns once it is
committed), then appends ``<event id> <pid>`` to ``CIO_TEST_ACK_FILE``: the events the
task acknowledged as logged.
"""

from __future__ import annotations

import logging
import logging.config
import os
import time
from typing import Any

from celery import Celery, signals
from ulid import ULID

from cio_logging import CustomerIOHandler

BROKER_DIR = os.environ.get("CIO_TEST_BROKER_DIR", "broker")
SETUP = os.environ.get("CIO_TEST_CELERY_SETUP", "worker_process_init")
PAUSE = float(os.environ.get("CIO_TEST_TASK_PAUSE", "0"))
HANDLER_OPTIONS: dict[str, Any] = {
    "flush_interval": 0.05,
    "max_backoff": 0.2,
    "request_timeout": 2,
    "flush_timeout": 15,
    "reset_timeout": 0.5,
    "max_attempts": 1000,
}


def broker_settings(broker_dir: str) -> dict[str, Any]:
    """One folder in and out: producer and worker share it."""
    return {
        "broker_url": "filesystem://",
        "broker_transport_options": {
            "data_folder_in": broker_dir,
            "data_folder_out": broker_dir,
            "control_folder": broker_dir,  # default: ./control, beside the project
            "polling_interval": 0.05,
        },
        # The filesystem transport has no fanout: no remote control, gossip or mingle.
        "worker_enable_remote_control": False,
        "worker_prefetch_multiplier": 1,
    }


app = Celery("celery_app")
app.conf.update(broker_settings(BROKER_DIR))
logger = logging.getLogger("celery_app.events")


def configure_logging(**kwargs: Any) -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {
                "customerio": {"class": "cio_logging.CustomerIOHandler", **HANDLER_OPTIONS},
                "console": {"class": "logging.StreamHandler"},
            },
            "loggers": {
                "celery_app.events": {
                    "handlers": ["customerio"],
                    "level": "INFO",
                    "propagate": False,
                },
            },
            "root": {"handlers": ["console"], "level": "INFO"},
        }
    )


# A receiver of setup_logging replaces Celery's own logging set-up: connect it only then.
if SETUP == "setup_logging":
    signals.setup_logging.connect(configure_logging)


def start_event_logging(**kwargs: Any) -> None:
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(CustomerIOHandler(**HANDLER_OPTIONS))


def stop_event_logging(**kwargs: Any) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.flush()  # as logging.shutdown would: wait (flush_timeout) for delivery
        handler.close()  # what is still unsent stays on disk for the next process


if SETUP == "worker_process_init":
    signals.worker_process_init.connect(start_event_logging)
    signals.worker_process_shutdown.connect(stop_event_logging)


def log_purchase(number: int) -> str:
    event_id = str(ULID())
    tag = {"customer_id": f"task-{os.getpid()}", "id": event_id, "data": {"n": number}}
    logger.info("purchase", extra={"cio": tag})
    line = f"{event_id} {os.getpid()}\n".encode()
    descriptor = os.open(os.environ["CIO_TEST_ACK_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(descriptor, line)  # one short write: lines from 4 processes never interleave
    finally:
        os.close(descriptor)
    if PAUSE:
        time.sleep(PAUSE)
    return event_id


app.task(name="log_purchase")(log_purchase)
