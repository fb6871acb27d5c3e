"""Settings: argument, environment, default; validation at construction."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from cio_logging import ConfigurationError, CustomerIOHandler
from cio_logging.config import Settings, resolve_settings

ENV = {"CUSTOMERIO_SITE_ID": "site-env", "CUSTOMERIO_API_KEY": "key-env-123456"}


def resolve(environ: dict[str, str] | None = None, **kwargs: Any) -> Settings:
    arguments: dict[str, Any] = {
        "region": None,
        "queue_dir": None,
        "track_url": None,
        "ca_bundle": None,
        "options": {},
    }
    site_id = kwargs.pop("site_id", None)
    api_key = kwargs.pop("api_key", None)
    arguments.update(kwargs)
    return resolve_settings(
        site_id, api_key, environ=ENV if environ is None else environ, **arguments
    )


class TestCredentials:
    """Credentials come from arguments or the environment, and are required."""

    def test_from_environment(self) -> None:
        settings = resolve()
        assert (settings.site_id, settings.api_key) == ("site-env", "key-env-123456")

    def test_arguments_win(self) -> None:
        settings = resolve(site_id="site-arg", api_key="key-arg")
        assert (settings.site_id, settings.api_key) == ("site-arg", "key-arg")

    @pytest.mark.parametrize("missing", ["CUSTOMERIO_SITE_ID", "CUSTOMERIO_API_KEY"])
    def test_missing_credential_names_the_variable(self, missing: str) -> None:
        environ = {k: v for k, v in ENV.items() if k != missing}
        with pytest.raises(ConfigurationError, match=missing):
            resolve(environ)

    def test_repr_hides_the_api_key(self) -> None:
        assert "key-env-123456" not in repr(resolve())

    def test_handler_constructor_raises_configuration_error(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.delenv("CUSTOMERIO_SITE_ID", raising=False)
        monkeypatch.delenv("CUSTOMERIO_API_KEY", raising=False)
        with pytest.raises(ConfigurationError, match="site_id is missing"):
            CustomerIOHandler(queue_dir=tmp_path)


class TestEndpoint:
    """Region and track_url decide where events go."""

    def test_us_by_default(self) -> None:
        assert resolve().endpoint.base_url == "https://track.customer.io"

    def test_eu_from_environment(self) -> None:
        settings = resolve({**ENV, "CUSTOMERIO_REGION": "EU"})
        assert settings.endpoint.base_url == "https://track-eu.customer.io"

    def test_track_url_replaces_the_host(self) -> None:
        settings = resolve(track_url="https://127.0.0.1:8443")
        assert (settings.endpoint.host, settings.endpoint.port) == ("127.0.0.1", 8443)

    def test_track_url_from_environment(self) -> None:
        settings = resolve({**ENV, "CIO_LOGGING_TRACK_URL": "https://proxy.internal:9000/"})
        assert settings.endpoint.base_url == "https://proxy.internal:9000"

    @pytest.mark.parametrize(
        ("url", "words"),
        [
            ("http://127.0.0.1:8443", "https://"),
            ("https://host/prefix", "not a path"),
            ("https://user:pw@host", "credentials"),
            ("https://host:99999", "invalid port"),
            ("https://", "no valid host"),
        ],
    )
    def test_bad_track_url(self, url: str, words: str) -> None:
        with pytest.raises(ConfigurationError, match=words):
            resolve(track_url=url)

    def test_bad_region(self) -> None:
        with pytest.raises(ConfigurationError, match="region"):
            resolve(region="mars")

    def test_missing_ca_bundle(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError, match="does not exist"):
            resolve(ca_bundle=tmp_path / "nope.pem")


class TestQueueDir:
    """The queue directory is persistent and per user, per workspace."""

    def test_default_is_persistent_per_user(self, tmp_path: Path) -> None:
        settings = resolve({**ENV, "XDG_STATE_HOME": str(tmp_path / "state")})
        assert settings.queue_dir.parent == tmp_path / "state" / "cio_logging"

    def test_default_without_xdg_is_under_home(self) -> None:
        settings = resolve()
        assert settings.queue_dir.is_relative_to(Path.home() / ".local" / "state")
        assert not settings.queue_dir.is_relative_to(tempfile.gettempdir())

    def test_default_differs_per_workspace(self) -> None:
        assert resolve(site_id="a").queue_dir != resolve(site_id="b").queue_dir

    def test_environment_then_argument(self, tmp_path: Path) -> None:
        from_env = resolve({**ENV, "CIO_LOGGING_QUEUE_DIR": str(tmp_path / "env")})
        assert from_env.queue_dir == tmp_path / "env"
        from_arg = resolve(
            {**ENV, "CIO_LOGGING_QUEUE_DIR": str(tmp_path / "env")}, queue_dir=tmp_path / "arg"
        )
        assert from_arg.queue_dir == tmp_path / "arg"


class TestOptions:
    """Tunables are validated, including the strings dictConfig may pass."""

    def test_defaults(self) -> None:
        settings = resolve()
        assert (settings.request_timeout, settings.flush_timeout, settings.batch_size) == (
            5.0,
            10.0,
            1000,
        )
        assert (settings.commit_interval, settings.max_in_flight) == (0.05, 4)
        assert settings.max_buffer_bytes == 64 << 20
        assert settings.fsync is False

    def test_numeric_strings_and_booleans(self) -> None:
        settings = resolve(options={"request_timeout": "2.5", "fsync": "yes"})
        assert (settings.request_timeout, settings.fsync) == (2.5, True)

    @pytest.mark.parametrize(
        ("options", "words"),
        [
            ({"flush_timout": 1}, "unknown option"),
            ({"request_timeout": 0}, "between"),
            ({"request_timeout": "soon"}, "must be a number"),
            ({"batch_size": True}, "not a boolean"),
            ({"fsync": "maybe"}, "true or false"),
        ],
    )
    def test_bad_option(self, options: dict[str, Any], words: str) -> None:
        with pytest.raises(ConfigurationError, match=words):
            resolve(options=options)
