"""Fleet mode's ``queue_url``: its password read in every form it is given, and kept out
of every text we let out.

A password may come percent-encoded (``p%40ss``), or as typed (``p@ss:w/rd?#%``), which
libpq cannot parse: it stops the user information at the first ``@`` or ``/`` and then
quotes the pieces (parts of the password) in its errors. :func:`normalized` reads such
a URL the way its writer meant it (the user information ends at the last ``@`` that is
followed by hosts) and percent-encodes the password, so libpq gets a URL it reads
right. A password that is already valid percent-encoding is left as it is (so
``%41`` is read as ``A``).

Every form of every password seen (as given, encoded, decoded; also a ``password=``
parameter and ``$PGPASSWORD``) is remembered, and :func:`scrub` replaces each with
``***`` in any text: our exceptions, our log lines, the driver's log lines.

No import of the driver here: the settings use it.
"""

from __future__ import annotations

import os
import re
import threading
from urllib.parse import quote, unquote, urlsplit, urlunsplit

_REDACTED = "***"
# A password this short would turn every occurrence of common letters into ***; it is
# still hidden where the URL is shown (display_url), which replaces it by position.
_SHORTEST_SCRUBBED = 4

_PASSWORDS: set[str] = set()
_PASSWORDS_GUARD = threading.Lock()

# One host of a host list: a name, an IPv4 address or a bracketed IPv6 address, with an
# optional port; hosts separated by commas. What follows the user information.
_HOST = r"(?:\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9._~%-]*)(?::\d*)?"
_HOSTS = re.compile(rf"{_HOST}(?:,{_HOST})*")
# What a percent-encoded password may hold (RFC 3986 userinfo, less ":").
_ENCODED = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*")


def _split_authority(rest: str) -> tuple[str, str] | None:
    """``(userinfo, after)`` of the text after ``scheme://`` when it holds user
    information, read as its writer meant it; None when it holds none."""
    # As libpq reads it: up to the first "@", if no "/" or "?" comes before it.
    standard = re.match(r"([^@/?#]*)@", rest)
    if standard is not None:
        userinfo = standard.group(1)
        after = rest[standard.end() :]
        password = userinfo.partition(":")[2]
        hosts = re.match(r"[^/?#]*", after)
        if _ENCODED.fullmatch(password) and hosts and _HOSTS.fullmatch(hosts.group(0)):
            return userinfo, after
    # As typed: the last "@" followed by a host list ends the user information.
    for match in reversed(list(re.finditer("@", rest))):
        after = rest[match.end() :]
        hosts = re.match(r"[^/?#]*", after)
        if hosts is not None and hosts.group(0) and _HOSTS.fullmatch(hosts.group(0)):
            return rest[: match.start()], after
    return None


def normalized(url: str) -> str:
    """``url`` with its password percent-encoded when it was given as typed (so libpq
    reads it right), every form of it remembered for :func:`scrub`."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        remember(url)
        return url
    split = _split_authority(rest)
    if split is None:
        remember(url)
        return url
    userinfo, after = split
    user, colon, password = userinfo.partition(":")
    if colon and password and not _ENCODED.fullmatch(password):
        _add(password)
        password = quote(password, safe="")
        url = f"{scheme}://{user}:{password}@{after}"
    remember(url)
    return url


def remember(url: str) -> None:
    """Remember the password of ``url`` (and ``$PGPASSWORD``) for :func:`scrub`."""
    _, separator, rest = url.partition("://")
    if separator:
        split = _split_authority(rest)
        if split is not None:
            password = split[0].partition(":")[2]
            if password:
                _add(password)
    # A password given as a query parameter (password=...) or in a keyword string.
    for match in re.finditer(r"(?:[?&\s]|^)password=([^&\s]+)", url):
        _add(match.group(1))
    environment = os.environ.get("PGPASSWORD")
    if environment:
        _add(environment)


def _add(password: str) -> None:
    forms = {password, unquote(password), quote(unquote(password), safe="")}
    with _PASSWORDS_GUARD:
        _PASSWORDS.update(form for form in forms if len(form) >= _SHORTEST_SCRUBBED)


def scrub(text: str) -> str:
    """``text`` with every known queue password replaced by ``***``."""
    with _PASSWORDS_GUARD:
        passwords = sorted(_PASSWORDS, key=len, reverse=True)
    for password in passwords:
        if password in text:
            text = text.replace(password, _REDACTED)
    return text


def known() -> bool:
    """Whether any password is remembered (scrubbing has something to do)."""
    return bool(_PASSWORDS)


def display_url(url: str) -> str:
    """The URL for people: ``postgresql://user:***@host/db`` (a ``password=``
    parameter hidden too)."""
    url = normalized(url)
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not at or not colon:
        return scrub(url)
    return scrub(urlunsplit((parts.scheme, f"{user}:{_REDACTED}@{hosts}", *parts[2:])))


def _reset_guard_in_child() -> None:
    global _PASSWORDS_GUARD
    _PASSWORDS_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_reset_guard_in_child)

__all__ = ["display_url", "known", "normalized", "remember", "scrub"]
