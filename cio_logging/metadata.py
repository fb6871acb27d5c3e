"""The installed versions of this package and the SDK, for the User-Agent and telemetry."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def installed_version(distribution: str) -> str:
    """The distribution's version, or "unknown" for a vendored copy or a bare path.

    Never raises: a failing lookup used to break every request and the constructor.
    """
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


PACKAGE_VERSION = installed_version("cio-logging")
SDK_VERSION = installed_version("customerio")
