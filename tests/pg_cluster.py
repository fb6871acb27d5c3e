"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary directory, a free
port on 127.0.0.1, run as the ``postgres`` user (via runuser) when the tests run as root,
because initdb and postgres refuse root."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), Path("/usr/lib/postgresql/16/bin")]

#: The role the library connects as, with a password every test watches for leaks.
APP_USER = "cio_app"
APP_PASSWORD = "pg-Secret-7f3a9c1e"


def server_binaries() -> Path | None:
    """The directory of initdb and pg_ctl, or None when PostgreSQL is not installed."""
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for directory in [*BIN_DIRS, *installed]:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """One cluster; :meth:`start` and :meth:`stop` may be called again (an outage)."""

    def __init__(
        self,
        binaries: Path,
        *,
        settings: str = "",
        replica_of: Cluster | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        """``settings``: lines added to postgresql.auto.conf; ``files``: written into
        the data directory (0600, the server's), before the start (certificates);
        ``replica_of``: a streaming replica of that cluster (``pg_basebackup -R``),
        with its roles and databases, instead of a new one."""
        self.binaries = binaries
        self.root = Path(tempfile.mkdtemp(prefix="cio-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        self.sockets.mkdir()
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        if replica_of is not None:
            self._run(
                "pg_basebackup",
                "-h",
                str(replica_of.sockets),
                "-p",
                str(replica_of.port),
                "-U",
                "postgres",
                "-D",
                str(self.data),
                "-R",  # standby.signal and primary_conninfo: a streaming replica
                "-X",
                "stream",
                "--checkpoint=fast",  # not a spread checkpoint: a minute and a half here
                "--no-sync",
            )
        else:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            )
            with (self.data / "postgresql.auto.conf").open("a") as conf:
                conf.write(
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "max_connections = 200\nlog_min_messages = fatal\n"
                )
        with (self.data / "postgresql.auto.conf").open("a") as conf:
            conf.write(settings)
        for name, content in (files or {}).items():
            path = self.data / name
            path.write_bytes(content)
            path.chmod(0o600)
            if self._as_postgres:
                os.chown(path, user.pw_uid, user.pw_gid)
        self.start()
        if replica_of is None:
            with self.admin() as conn:
                conn.execute(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'")
                conn.execute(f"CREATE DATABASE cio OWNER {APP_USER}")

    def promote(self) -> None:
        """A replica becomes a primary (``pg_ctl promote``), waiting until it is."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.binaries / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=self.root, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1"
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection over the Unix socket."""
        return psycopg.connect(
            host=str(self.sockets), port=self.port, user="postgres", dbname=dbname, autocommit=True
        )

    def url(self, dbname: str = "cio", **query: str) -> str:
        """The library's URL: the application role, with its password, over TCP."""
        tail = "&".join(f"{key}={value}" for key, value in query.items())
        base = f"postgresql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{self.port}/{dbname}"
        return f"{base}?{tail}" if tail else base

    def new_database(self, name: str) -> str:
        """A fresh empty database owned by the application role; its URL."""
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {APP_USER}")
        return self.url(name)

    def destroy(self) -> None:
        for _ in range(3):
            try:
                self.stop("immediate")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)


def pgbouncer_binary() -> Path | None:
    """Debian's pgbouncer, or None when it is not installed."""
    for candidate in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


class Bouncer:
    """A PgBouncer in transaction pooling mode in front of ``cluster``, on a free port.

    Few server connections for many clients (``pool_size``), so that statements of
    different clients share server sessions, as in production: a prepared statement or
    a ``SET`` left behind by one client is seen by the next. Run as the ``postgres``
    user when the tests run as root (pgbouncer refuses root).
    """

    def __init__(self, binary: Path, cluster: Cluster, *, pool_size: int = 4) -> None:
        self.binary = binary
        self.cluster = cluster
        self.root = Path(tempfile.mkdtemp(prefix="cio-pgbouncer-"))
        self.port = free_port()
        config = self.root / "pgbouncer.ini"
        users = self.root / "userlist.txt"
        users.write_text(f'"{APP_USER}" "{APP_PASSWORD}"\n"postgres" ""\n')
        config.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={cluster.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {users}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            "max_client_conn = 500\n"
            "max_db_connections = 0\n"
            "server_lifetime = 3600\n"
            "server_idle_timeout = 600\n"
            "query_wait_timeout = 60\n"
            f"logfile = {self.root / 'pgbouncer.log'}\n"
            f"pidfile = {self.root / 'pgbouncer.pid'}\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
        )
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            for path in (self.root, config, users):
                os.chown(path, user.pw_uid, user.pw_gid)
            users.chmod(0o600)
        self._process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        command = [str(self.binary), "-q", str(self.root / "pgbouncer.ini")]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        self._process = subprocess.Popen(
            command, cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                error = self._process.stderr.read() if self._process.stderr else b""
                raise RuntimeError(f"pgbouncer exited: {error.decode(errors='replace')}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("pgbouncer did not listen within 30 s")

    def url(self, dbname: str = "cio", **query: str) -> str:
        """The library's URL through the pooler: same role and password."""
        return self.cluster.url(dbname, **query).replace(
            f"@127.0.0.1:{self.cluster.port}/", f"@127.0.0.1:{self.port}/"
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if process is not None and process.stderr is not None:
            process.stderr.close()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
