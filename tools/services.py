"""``make services`` / ``make services-stop``: the shared services a team runs the pipeline
against, on this machine, on 127.0.0.1 only:

- PostgreSQL (the system's server binaries, e.g. Debian's ``postgresql-15``), holding two
  databases: ``mlflow`` (runs and the model registry) and ``prefect`` (flow runs, concurrency
  limits);
- an MLflow tracking server on it with proxied artifact storage (clients upload and download
  artifacts through the server, ``mlflow-artifacts:/`` URIs; the files live in one folder);
- a Prefect server on it.

All state is under one git-ignored folder (``.services/``): each service's data, its log and
its pid file, and ``env``, the exports that point a shell at the services. ``start`` is
idempotent (a service that already answers is left alone), waits until every service answers
its health check (or fails naming the log to read), and prints the exports. Usage::

    python -m tools.services start     # or: make services
    python -m tools.services status
    python -m tools.services env       # the exports again:  eval "$(python -m tools.services env)"
    python -m tools.services stop      # or: make services-stop

Settings (environment): ``GRPO_SERVICES_DIR`` (.services), ``GRPO_PG_PORT`` (55432),
``GRPO_MLFLOW_PORT`` (55000; MLflow's own default 5000 stays free for ``mlflow ui``),
``GRPO_PREFECT_PORT`` (54200; Prefect's default is 4200), ``GRPO_MLFLOW_WORKERS`` (2),
``GRPO_SERVICES_TIMEOUT`` (180 s per service), ``GRPO_PG_BIN`` (the folder of ``pg_ctl``;
found on PATH or under /usr/lib/postgresql/*/bin). Run as root (a container), PostgreSQL's
commands run as the ``postgres`` user, which owns the database folder (PostgreSQL refuses root).
MLflow talks to PostgreSQL through psycopg 3 (``pip install -e ".[services]"``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service did not start or stop; the message names its log file."""


@dataclass(frozen=True)
class Settings:
    home: Path
    pg_port: int
    mlflow_port: int
    prefect_port: int
    mlflow_workers: int
    timeout: float

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        home = Path(env("GRPO_SERVICES_DIR", str(ROOT / ".services"))).resolve()
        return cls(
            home=home,
            pg_port=int(env("GRPO_PG_PORT", "55432")),
            mlflow_port=int(env("GRPO_MLFLOW_PORT", "55000")),
            prefect_port=int(env("GRPO_PREFECT_PORT", "54200")),
            mlflow_workers=int(env("GRPO_MLFLOW_WORKERS", "2")),
            timeout=float(env("GRPO_SERVICES_TIMEOUT", "180")),
        )

    @property
    def pg_dir(self) -> Path:
        return postgres_dir(self.home)

    @property
    def pg_log(self) -> Path:
        return self.pg_dir / "postgres.log"

    def database_url(self, name: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@{HOST}:{self.pg_port}/{name}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    def exports(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.mlflow_uri, "PREFECT_API_URL": self.prefect_api_url}


# --------------------------------------------------------------------------- PostgreSQL


def pg_bin(tool: str) -> str:
    """The path of a PostgreSQL server program (pg_ctl, initdb, psql, ...)."""
    folder = os.environ.get("GRPO_PG_BIN")
    candidates = [Path(folder)] if folder else []
    if not folder and shutil.which("pg_ctl"):
        candidates.append(Path(shutil.which("pg_ctl")).parent)  # type: ignore[arg-type]
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for c in candidates:
        if (c / tool).exists():
            return str(c / tool)
    raise ServiceError(
        f"PostgreSQL's {tool} not found (looked in {[str(c) for c in candidates] or 'PATH'}); "
        "install the server (Debian: apt-get install postgresql) or set GRPO_PG_BIN"
    )


@functools.lru_cache
def postgres_dir(home: Path) -> Path:
    """``home/postgres``; but as root, when the ``postgres`` user cannot reach ``home`` (a parent
    folder closed to others, e.g. a checkout under a 0700 ``/root``), a folder of its own under
    the system's temporary directory, named after ``home`` (the same one every time)."""
    default = home / "postgres"
    if os.geteuid() != 0:
        return default
    existing = next(p for p in (home, *home.parents) if p.exists())
    reach = subprocess.run(as_pg_owner(["test", "-x", str(existing)]), capture_output=True, cwd="/")
    if reach.returncode == 0:
        return default
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"grpo-services-{digest}" / "postgres"


def as_pg_owner(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its commands as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def run_pg(cmd: list[str], what: str, log: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(as_pg_owner(cmd), capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        raise ServiceError(
            f"PostgreSQL: {what} failed (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-800:]}\n  log: {log}"
        )
    return proc


def pg_running(s: Settings) -> bool:
    data = s.pg_dir / "data"
    if not (data / "PG_VERSION").exists():
        return False
    status = subprocess.run(as_pg_owner([pg_bin("pg_ctl"), "-D", str(data), "status"]),
                            capture_output=True, cwd="/")  # fmt: skip
    return status.returncode == 0


def start_postgres(s: Settings) -> str:
    """initdb once (trust auth, on 127.0.0.1 and a socket in its own folder only), start, and
    create the ``mlflow`` and ``prefect`` databases when missing."""
    data = s.pg_dir / "data"
    if pg_running(s):
        ensure_databases(s)
        return "already running"
    s.pg_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(s.pg_dir, "postgres", "postgres")
        if not s.pg_dir.is_relative_to(s.home):
            print(f"services: the postgres user cannot reach {s.home}; its data is in {s.pg_dir}")
    if not (data / "PG_VERSION").exists():
        run_pg([pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                "-E", "UTF8", "--no-instructions"], "initdb", s.pg_log)  # fmt: skip
    check_port_free(s.pg_port, "GRPO_PG_PORT", s.pg_log)
    options = f"-k '{s.pg_dir}' -p {s.pg_port} -h {HOST}"
    run_pg([pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(s.pg_log),
            "-w", "-t", str(int(s.timeout)), "start"], "pg_ctl start", s.pg_log)  # fmt: skip
    ensure_databases(s)
    return "started"


def ensure_databases(s: Settings) -> None:
    psql = [pg_bin("psql"), "-h", HOST, "-p", str(s.pg_port), "-U", "postgres", "-tA"]
    for name in ("mlflow", "prefect"):
        query = f"SELECT 1 FROM pg_database WHERE datname = '{name}'"
        found = run_pg([*psql, "-c", query], "psql", s.pg_log).stdout.strip()
        if found != "1":
            run_pg([*psql, "-c", f"CREATE DATABASE {name}"], f"CREATE DATABASE {name}", s.pg_log)


def stop_postgres(s: Settings) -> str:
    if not pg_running(s):
        return "not running"
    data = str(s.pg_dir / "data")
    run_pg([pg_bin("pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"], "pg_ctl stop", s.pg_log)
    return "stopped"


# --------------------------------------------------------------------------- the servers


@dataclass(frozen=True)
class Server:
    """A server process started here: its command, environment, health URL and pid/log files."""

    name: str
    command: list[str]
    env: dict[str, str]
    health: str
    port: int
    port_setting: str
    home: Path

    @property
    def log(self) -> Path:
        return self.home / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        return self.home / f"{self.name}.pid"


def servers(s: Settings) -> list[Server]:
    bin_dir = Path(sys.executable).parent
    artifacts = s.home / "mlflow" / "artifacts"
    mlflow = Server(
        "mlflow",
        [str(bin_dir / "mlflow"), "server", "--backend-store-uri", s.database_url("mlflow"),
         "--artifacts-destination", str(artifacts), "--host", HOST,
         "--port", str(s.mlflow_port), "--workers", str(s.mlflow_workers)],
        # no job runner: it serves GenAI scorers and trace archival, which the pipeline does not
        # use, and costs 8 processes (~2 GB) here
        {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
         "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        f"{s.mlflow_uri}/health", s.mlflow_port, "GRPO_MLFLOW_PORT", s.home,
    )  # fmt: skip
    prefect = Server(
        "prefect",
        [str(bin_dir / "prefect"), "server", "start", "--host", HOST,
         "--port", str(s.prefect_port)],
        {
            "PREFECT_HOME": str(s.home / "prefect"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": s.database_url("prefect", "postgresql+asyncpg"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": s.prefect_api_url,
        },
        f"{s.prefect_api_url}/health", s.prefect_port, "GRPO_PREFECT_PORT", s.home,
    )  # fmt: skip
    return [mlflow, prefect]


def answers(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def check_port_free(port: int, setting: str, log: Path) -> None:
    with socket.socket() as sock:
        if sock.connect_ex((HOST, port)) == 0:
            raise ServiceError(
                f"port {port} on {HOST} is taken by another program; choose another with "
                f"{setting}=PORT (log: {log})"
            )


def read_pid(server: Server) -> int | None:
    """The pid in the server's pid file when that process is alive and is this server."""
    try:
        pid = int(server.pid_file.read_text().strip())
        command = subprocess.run(["ps", "-o", "command=", "-p", str(pid)],
                                 capture_output=True, text=True).stdout  # fmt: skip
    except (OSError, ValueError):
        return None
    return pid if server.command[0] in command else None


def launch_server(server: Server) -> bool:
    """Start the server in its own session (so a stop reaches its workers) unless it is already
    running; returns whether it was started here."""
    if read_pid(server) is not None:
        return False
    check_port_free(server.port, server.port_setting, server.log)
    server.log.parent.mkdir(parents=True, exist_ok=True)
    with open(server.log, "ab") as log:
        proc = subprocess.Popen(
            server.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **server.env}, cwd=server.home, start_new_session=True,
        )  # fmt: skip
    server.pid_file.write_text(f"{proc.pid}\n")
    return True


def wait_healthy(group: list[Server], timeout: float) -> dict[str, float]:
    """Poll every server's health URL until all answer; returns the seconds each took. Fails
    naming the log of one that exits or does not answer in ``timeout`` s."""
    began, took = time.monotonic(), {}
    while len(took) < len(group):
        for server in group:
            if server.name in took:
                continue
            if answers(server.health, timeout=2.0):
                took[server.name] = time.monotonic() - began
            elif read_pid(server) is None:
                raise ServiceError(f"{server.name} exited while starting; see {server.log}:\n"
                                   + tail(server.log))  # fmt: skip
            elif time.monotonic() - began > timeout:
                raise ServiceError(
                    f"{server.name} did not answer {server.health} within {timeout:.0f} s "
                    f"(GRPO_SERVICES_TIMEOUT); see {server.log}:\n" + tail(server.log)
                )
        time.sleep(0.25)
    return took


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_server(server: Server, grace: float = 30.0) -> str:
    """SIGTERM to the server's process group (its workers too), SIGKILL after ``grace`` s."""
    pid = read_pid(server)
    if pid is None:
        server.pid_file.unlink(missing_ok=True)
        return "not running"
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and group_alive(pid):
        time.sleep(0.2)
    if group_alive(pid):
        os.killpg(pid, signal.SIGKILL)
    server.pid_file.unlink(missing_ok=True)
    return "stopped"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------- commands


def write_env(s: Settings) -> Path:
    path = s.home / "env"
    text = "".join(f"export {k}={v}\n" for k, v in s.exports().items())
    tmp = path.with_name(".env.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def start(s: Settings) -> None:
    """PostgreSQL first (both servers keep their state in it), then both servers at once."""
    s.home.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    state = start_postgres(s)
    print(f"postgres  {state:15s} {time.monotonic() - began:5.1f} s  {s.database_url('')}  "
          f"(log {s.pg_log})", flush=True)  # fmt: skip
    group = servers(s)
    launched = {server.name: launch_server(server) for server in group}
    took = wait_healthy(group, s.timeout)
    for server in group:
        state = "started" if launched[server.name] else "already running"
        print(f"{server.name:9s} {state:15s} {took[server.name]:5.1f} s  {server.health}  "
              f"(log {server.log})")  # fmt: skip
    env_file = write_env(s)
    print(f"\nPoint a shell at them (also in {env_file}):")
    for key, value in s.exports().items():
        print(f"  export {key}={value}")


def stop(s: Settings) -> None:
    for server in reversed(servers(s)):
        print(f"{server.name:9s} {stop_server(server)}", flush=True)
    print(f"postgres  {stop_postgres(s)}")


def status(s: Settings) -> int:
    up = pg_running(s)
    print(f"postgres  {'running' if up else 'not running'}  {s.database_url('')}")
    for server in servers(s):
        ok = answers(server.health)
        up = up and ok
        print(f"{server.name:9s} {'answers' if ok else 'not answering'}  {server.health}")
    return 0 if up else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.services", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("command", choices=("start", "stop", "status", "env"))
    args = parser.parse_args(argv)
    s = Settings.from_env()
    try:
        if args.command == "start":
            start(s)
        elif args.command == "stop":
            stop(s)
        elif args.command == "status":
            return status(s)
        else:
            print("".join(f"export {k}={v}\n" for k, v in s.exports().items()), end="")
    except ServiceError as exc:
        print(f"services: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
