"""Handler settings: argument, then environment variable, then default, validated up front.

Everything here runs in the handler's constructor, so a bad setting raises
:class:`~cio_logging.errors.ConfigurationError` while ``dictConfig`` runs, never at
the first event.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigurationError

ENV_SITE_ID = "CUSTOMERIO_SITE_ID"
ENV_API_KEY = "CUSTOMERIO_API_KEY"
ENV_REGION = "CUSTOMERIO_REGION"
ENV_QUEUE_DIR = "CIO_LOGGING_QUEUE_DIR"
ENV_TRACK_URL = "CIO_LOGGING_TRACK_URL"
ENV_CA_BUNDLE = "CIO_LOGGING_CA_BUNDLE"
ENV_QUEUE_URL = "CIO_LOGGING_QUEUE_URL"
ENV_API = "CIO_LOGGING_API"
ENV_CDP_API_KEY = "CUSTOMERIO_CDP_API_KEY"

TRACK_HOSTS = {"us": "track.customer.io", "eu": "track-eu.customer.io"}
PIPELINES_HOSTS = {"us": "cdp.customer.io", "eu": "cdp-eu.customer.io"}
#: The two APIs: the Track API (the default) and the Data Pipelines API.
TRACK, PIPELINES = "track", "pipelines"
APIS = (TRACK, PIPELINES)
_PIPELINES_PATH = "/v1"

ENV_DEGRADATION = "CIO_LOGGING_DEGRADATION"
ENV_DELIVER = "CIO_LOGGING_DELIVER"

#: Who sends: the handler's own flush thread, a ``cio-logging deliver`` child the
#: handler supervises, or nobody in this process (a sender runs elsewhere).
DELIVER_THREAD, DELIVER_PROCESS, DELIVER_NONE = "thread", "process", "none"
DELIVER_MODES = (DELIVER_THREAD, DELIVER_PROCESS, DELIVER_NONE)

#: Degradation levels, from no shedding to dropping every event at emit.
FULL, ESSENTIAL_ONLY, DISABLED = "full", "essential_only", "disabled"
DEGRADATION_LEVELS = (FULL, ESSENTIAL_ONLY, DISABLED)
#: The reference design's essential events: shed last, kept in essential-only mode.
DEFAULT_ESSENTIAL_EVENTS = frozenset({"signup", "purchase", "subscription_changed"})

# Tunables that may be passed as keyword options (dictConfig passes every unknown
# handler key as a keyword). name -> (default, minimum, maximum).
_NUMERIC_OPTIONS: dict[str, tuple[float, float, float]] = {
    # How long flush() waits for the queue to empty.
    "flush_timeout": (10.0, 0.0, 3600.0),
    # How long close() waits for an in-flight request before leaving it to the WAL.
    "close_timeout": (5.0, 0.0, 600.0),
    # The reference design's call timeout: one HTTP request to Customer.io.
    "request_timeout": (5.0, 0.1, 300.0),
    # How often the worker looks at the queue when nothing wakes it (other processes'
    # events, retries that came due).
    "flush_interval": (1.0, 0.01, 60.0),
    # Events per v2 batch request; the 500 KB request limit applies as well.
    "batch_size": (1000, 1, 10_000),
    # Requests in flight at once while the breaker is closed: with a long round trip,
    # one at a time would cap delivery at batch_size per round trip.
    "max_in_flight": (4, 1, 32),
    # Non-essential events are committed to disk by a background writer within this
    # many seconds (a SIGKILL loses at most that much); essential events are committed
    # before emit returns. 0 commits every event before emit returns.
    "commit_interval": (0.05, 0.0, 10.0),
    # Memory for events not yet on disk: the commit buffer, and the fallback while
    # the disk fails. Past it non-essential events are shed at emit, essential ones
    # past twice it.
    "max_buffer_bytes": (64 << 20, 1 << 16, 1 << 40),
    # Retry policy: exponential backoff with jitter from 1 s up to this.
    "max_backoff": (60.0, 0.01, 3600.0),
    # After this many failed attempts an event goes to the dead-letter store.
    "max_attempts": (8, 1, 10_000),
    # Past this age (seconds since logged) Customer.io no longer triggers campaigns.
    "max_event_age": (72 * 3600.0, 1.0, 365 * 24 * 3600.0),
    # The longest Retry-After honoured.
    "max_retry_after": (600.0, 0.0, 86_400.0),
    # While the credentials are refused (401/403), how often to try again.
    "auth_retry_interval": (60.0, 0.01, 3600.0),
    # Circuit breaker (the reference design's opossum settings).
    "error_threshold": (0.5, 0.01, 1.0),
    "volume_threshold": (10, 1, 1_000_000),
    "consecutive_failures": (5, 1, 1_000_000),
    "reset_timeout": (30.0, 0.01, 3600.0),
    "breaker_window": (10.0, 0.1, 3600.0),
    # Client-side request-rate cap, across v1 and v2. Customer.io documents 1,000/s
    # "not strictly enforced" (older documents said 100/s): stay well below.
    "max_requests_per_second": (50, 1, 1000),
    # Disk protection: past the soft limit non-essential events are shed at emit;
    # essential ones only past the hard limit.
    "max_queue_bytes": (1 << 30, 1 << 20, 1 << 50),
    "hard_max_queue_bytes": (2 << 30, 1 << 20, 1 << 50),
    # The reference design's periodic breaker report: log status() on the
    # cio_logging.status logger this often (seconds); 0 switches it off.
    "status_log_interval": (0.0, 0.0, 86_400.0),
    # Fleet mode (queue_url): how long a sender's lease lasts without a renewal, so
    # the longest a workspace goes without a sender after its sender died.
    "lease_seconds": (15.0, 1.0, 3600.0),
    # Fleet mode: how long a commit to PostgreSQL may take before the rows go to the
    # local spill directory instead (the caller never waits longer).
    "database_timeout": (1.0, 0.05, 60.0),
}
_BOOLEAN_OPTIONS: dict[str, bool] = {
    # fsync every commit (SQLite synchronous=FULL): survives power loss, costs ~4x per
    # write. Without it a committed event survives any process crash, not an OS crash.
    "fsync": False,
    # Commit buffered events on SIGTERM before the process ends (see
    # CustomerIOHandler.install_signal_handlers); the handler must be built on the
    # main thread.
    "signal_handlers": False,
}
#: Every numeric and boolean option, by name (what a sender child is handed).
TUNABLE_OPTIONS = (*_NUMERIC_OPTIONS, *_BOOLEAN_OPTIONS)
_OTHER_OPTIONS = ("degradation", "essential_events", "queue_url", "api", "deliver")


@dataclass(frozen=True)
class Endpoint:
    """Where the API lives: ``https://host[:port]``, and for the Pipelines API the path
    its routes hang off (``/v1``; the SDK builds the Track API's paths itself)."""

    host: str
    port: int
    path: str = ""

    @property
    def base_url(self) -> str:
        return f"https://{self.host}" if self.port == 443 else f"https://{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """Validated handler settings. The API key never appears in the repr."""

    site_id: str
    api_key: str = field(repr=False)
    region: str
    endpoint: Endpoint
    queue_dir: Path
    ca_bundle: Path | None
    # The PostgreSQL URL of fleet mode (None: the diskcache store). It carries the
    # password: never in the repr (see queue_url_for_display).
    queue_url: str | None = field(repr=False)
    flush_timeout: float
    close_timeout: float
    request_timeout: float
    flush_interval: float
    batch_size: int
    max_in_flight: int
    commit_interval: float
    max_buffer_bytes: int
    max_backoff: float
    max_attempts: int
    max_event_age: float
    max_retry_after: float
    auth_retry_interval: float
    error_threshold: float
    volume_threshold: int
    consecutive_failures: int
    reset_timeout: float
    breaker_window: float
    max_requests_per_second: float
    max_queue_bytes: int
    hard_max_queue_bytes: int
    status_log_interval: float
    fsync: bool
    signal_handlers: bool
    degradation: str
    essential_events: frozenset[str]
    lease_seconds: float = 15.0
    database_timeout: float = 1.0
    #: "track" or "pipelines" (then ``site_id`` is empty: the API key names the source).
    api: str = TRACK
    #: "thread", "process" or "none" (see :data:`DELIVER_MODES`).
    deliver: str = DELIVER_THREAD

    @property
    def account(self) -> str:
        """Whose events these are: the site id, or for the Pipelines API a digest of
        the source's API key (never the key itself: it names directories and rows)."""
        if self.api == TRACK:
            return self.site_id
        return "cdp-" + hashlib.sha256(self.api_key.encode()).hexdigest()[:16]

    @property
    def workspace(self) -> str:
        """The key of this workspace's rows in a shared store: account and endpoint."""
        return f"{self.account}@{self.endpoint.base_url}{self.endpoint.path}"


def resolve_settings(
    site_id: str | None,
    api_key: str | None,
    *,
    region: str | None,
    queue_dir: str | os.PathLike[str] | None,
    track_url: str | None,
    ca_bundle: str | os.PathLike[str] | None,
    options: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build :class:`Settings` from the constructor's arguments and the environment.

    Raises:
        ConfigurationError: a credential is missing, or a value is out of range or of
            the wrong type, or an option is unknown.
    """
    env = os.environ if environ is None else environ
    known_options = {*_NUMERIC_OPTIONS, *_BOOLEAN_OPTIONS, *_OTHER_OPTIONS}
    unknown = sorted(set(options) - known_options)
    if unknown:
        known = ", ".join(sorted(known_options))
        raise ConfigurationError(f"unknown option(s) {', '.join(unknown)}; known: {known}")

    api = _api(options.get("api", env.get(ENV_API) or TRACK))
    if api == TRACK:
        site = _credential("site_id", site_id, env.get(ENV_SITE_ID), ENV_SITE_ID)
        key = _credential("api_key", api_key, env.get(ENV_API_KEY), ENV_API_KEY)
    else:
        site = ""  # a Pipelines source is named by its key alone
        key = _credential("api_key", api_key, env.get(ENV_CDP_API_KEY), ENV_CDP_API_KEY)
    region_name = _region(region if region is not None else env.get(ENV_REGION, "us"))
    endpoint = _endpoint(track_url or env.get(ENV_TRACK_URL) or None, region_name, api)
    bundle = _ca_bundle(ca_bundle if ca_bundle is not None else env.get(ENV_CA_BUNDLE) or None)
    chosen_dir = queue_dir if queue_dir is not None else env.get(ENV_QUEUE_DIR) or None
    if chosen_dir:
        directory = Path(chosen_dir).expanduser()
    elif api == TRACK:
        directory = default_queue_dir(site, endpoint, env)
    else:
        account = "cdp-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        directory = default_queue_dir(account, endpoint, env)

    numbers = {
        name: _number(name, options.get(name, spec[0]), spec)
        for name, spec in _NUMERIC_OPTIONS.items()
    }
    flags = {
        name: _boolean(name, options.get(name, default))
        for name, default in _BOOLEAN_OPTIONS.items()
    }
    if numbers["hard_max_queue_bytes"] < numbers["max_queue_bytes"]:
        raise ConfigurationError("hard_max_queue_bytes must not be below max_queue_bytes")
    return Settings(
        site_id=site,
        api_key=key,
        region=region_name,
        endpoint=endpoint,
        queue_dir=directory,
        ca_bundle=bundle,
        queue_url=_queue_url(options.get("queue_url", env.get(ENV_QUEUE_URL) or None)),
        flush_timeout=numbers["flush_timeout"],
        close_timeout=numbers["close_timeout"],
        request_timeout=numbers["request_timeout"],
        flush_interval=numbers["flush_interval"],
        batch_size=int(numbers["batch_size"]),
        max_in_flight=int(numbers["max_in_flight"]),
        commit_interval=numbers["commit_interval"],
        max_buffer_bytes=int(numbers["max_buffer_bytes"]),
        max_backoff=numbers["max_backoff"],
        max_attempts=int(numbers["max_attempts"]),
        max_event_age=numbers["max_event_age"],
        max_retry_after=numbers["max_retry_after"],
        auth_retry_interval=numbers["auth_retry_interval"],
        error_threshold=numbers["error_threshold"],
        volume_threshold=int(numbers["volume_threshold"]),
        consecutive_failures=int(numbers["consecutive_failures"]),
        reset_timeout=numbers["reset_timeout"],
        breaker_window=numbers["breaker_window"],
        max_requests_per_second=numbers["max_requests_per_second"],
        max_queue_bytes=int(numbers["max_queue_bytes"]),
        hard_max_queue_bytes=int(numbers["hard_max_queue_bytes"]),
        status_log_interval=numbers["status_log_interval"],
        fsync=flags["fsync"],
        signal_handlers=flags["signal_handlers"],
        degradation=degradation_level(options.get("degradation", env.get(ENV_DEGRADATION, FULL))),
        essential_events=_event_names(options.get("essential_events", DEFAULT_ESSENTIAL_EVENTS)),
        lease_seconds=numbers["lease_seconds"],
        database_timeout=numbers["database_timeout"],
        api=api,
        deliver=deliver_mode(options.get("deliver", env.get(ENV_DELIVER) or DELIVER_THREAD)),
    )


def default_queue_dir(site_id: str, endpoint: Endpoint, environ: Mapping[str, str]) -> Path:
    """A persistent per-user directory, one per workspace and endpoint.

    Never a temporary directory: the queue must outlive the process and a reboot.
    Keyed by site id and endpoint so that two applications sending to different
    workspaces (or a demo against the simulator) never deliver each other's events
    with the wrong credentials.
    """
    state_home = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    digest = hashlib.sha256(f"{site_id}\0{endpoint.base_url}".encode()).hexdigest()[:16]
    return Path(state_home) / "cio_logging" / digest


def degradation_level(value: object) -> str:
    """Validate a degradation level ("full", "essential_only" or "disabled").

    Raises:
        ConfigurationError: any other value.
    """
    level = str(value).strip().lower().replace("-", "_")
    if level not in DEGRADATION_LEVELS:
        raise ConfigurationError(
            f"degradation must be one of {', '.join(DEGRADATION_LEVELS)}, not {value!r}"
        )
    return level


def deliver_mode(value: object) -> str:
    """Validate a delivery mode ("thread", "process" or "none").

    Raises:
        ConfigurationError: any other value.
    """
    mode = str(value).strip().lower()
    if mode not in DELIVER_MODES:
        raise ConfigurationError(
            f"deliver must be one of {', '.join(DELIVER_MODES)}, not {value!r}"
        )
    return mode


def _event_names(value: object) -> frozenset[str]:
    # A list from code, YAML or dictConfig, or "a,b,c" from an environment variable.
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple | set | frozenset) or not all(
        isinstance(name, str) for name in names
    ):
        raise ConfigurationError(f"essential_events must be a list of event names, not {value!r}")
    return frozenset(name.strip() for name in names if name.strip())


def _credential(name: str, given: str | None, from_env: str | None, env_name: str) -> str:
    value = given if given is not None else from_env
    if value is None or not str(value).strip():
        raise ConfigurationError(f"{name} is missing: pass {name}= or set {env_name}")
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string, not {type(value).__name__}")
    return value.strip()


def _region(value: object) -> str:
    region = str(value).strip().lower()
    if region not in TRACK_HOSTS:
        raise ConfigurationError(f"region must be 'us' or 'eu', not {value!r}")
    return region


# Letters, digits, dots, hyphens, and underscores: not valid in an internet host name,
# but common in the names docker-compose and Kubernetes give services (my_service),
# which resolvers and TLS certificates accept; or an IPv6 literal.
_HOST_PATTERN = re.compile(r"^[A-Za-z0-9._\-]+$|^\[[0-9A-Fa-f:.]+\]$")


def _api(value: object) -> str:
    api = str(value).strip().lower()
    if api not in APIS:
        raise ConfigurationError(f"api must be one of {', '.join(APIS)}, not {value!r}")
    return api


def _endpoint(track_url: str | None, region: str, api: str = TRACK) -> Endpoint:
    # The messages below never quote the URL: it may carry credentials.
    if track_url is None:
        if api == PIPELINES:
            return Endpoint(PIPELINES_HOSTS[region], 443, _PIPELINES_PATH)
        return Endpoint(TRACK_HOSTS[region], 443)
    if not isinstance(track_url, str):
        raise ConfigurationError(f"track_url must be a string, not {type(track_url).__name__}")
    parts = urlsplit(track_url.strip())
    if parts.username or parts.password:
        raise ConfigurationError("track_url must not carry credentials; use site_id/api_key")
    if parts.scheme != "https":
        # The SDK always speaks https; saying so here beats a confusing TLS error later.
        raise ConfigurationError(
            f"track_url must start with https://, not {parts.scheme or 'no scheme'}"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError("track_url takes no query or fragment")
    path = parts.path.rstrip("/")
    if api == TRACK and path:
        # The SDK builds /api/v1 and /api/v2 itself and ignores any prefix for batches.
        raise ConfigurationError("track_url takes a scheme, host and port only, not a path")
    if api == PIPELINES and not path:
        path = _PIPELINES_PATH  # https://cdp.customer.io means its /v1 routes
    try:
        port = parts.port or 443
    except ValueError:
        raise ConfigurationError("track_url has an invalid port") from None
    host = parts.hostname or ""
    if not host or not _HOST_PATTERN.match(host if ":" not in host else f"[{host}]"):
        raise ConfigurationError("track_url has no valid host")
    return Endpoint(host if ":" not in host else f"[{host}]", port, path)


def _queue_url(value: object) -> str | None:
    """A ``postgresql://`` URL, or None for the diskcache store. The message of a bad
    one never repeats it: it may hold a password."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigurationError("queue_url must be a string")
    scheme = value.split(":", 1)[0].lower()
    if scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(
            "queue_url must be a postgresql:// URL (leave it unset for the local store)"
        )
    # A password given as typed (p@ss:w/rd?) is percent-encoded, so libpq reads the URL
    # as meant instead of quoting pieces of the password in its errors.
    from .store.queue_url import normalized

    return normalized(value)


def _ca_bundle(value: str | os.PathLike[str] | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigurationError(f"ca_bundle {str(path)!r} does not exist")
    return path


def _number(name: str, value: object, spec: tuple[float, float, float]) -> float:
    _, low, high = spec
    if isinstance(value, bool):
        raise ConfigurationError(f"{name} must be a number, not a boolean")
    try:
        number = float(value)  # type: ignore[arg-type]  # dictConfig may hand us "2.5"
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name} must be a number, not {value!r}") from None
    if not low <= number <= high:
        raise ConfigurationError(f"{name} must be between {low:g} and {high:g}, not {value!r}")
    return number


def _boolean(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "1", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"false", "0", "no", "off"}:
        return False
    raise ConfigurationError(f"{name} must be true or false, not {value!r}")
