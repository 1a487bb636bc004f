#!/usr/bin/env python3
"""Start, check and stop SnapMap's local stack: real servers, on 127.0.0.1 only.

Services, in the order they are listed everywhere:

    kafka     Apache Kafka 3.9, one KRaft broker+controller (jars from Maven Central)
    azurite   Azurite's Blob service (npm), the Azure Blob Storage emulator
    postgres  PostgreSQL for Dagster's run, event and schedule storage
    mongo     the MongoDB-compatible server that localstack/mongo/ installs

Usage:

    python localstack/stack.py up [--only NAMES | --without NAMES]
    python localstack/stack.py down | status | wipe [--all]    (same selection options)
    python localstack/stack.py start NAME... | stop NAME...
    python localstack/stack.py logs [NAME] [-n LINES] [-f]
    python localstack/stack.py env [--where]  # export lines; eval "$(... env)"

`up` installs what is missing on first use (Maven, npm, the mongo install script), starts
every selected server detached and waits, with a time limit, until each one answers a
real request. Data, logs and pid files live under <project>/.stack, or $SNAPMAP_STACK_DIR.
`down` and `stop` keep the data; `wipe` deletes it (and `wipe --all` the installs too).
Ports can be moved with SNAPMAP_KAFKA_PORT, SNAPMAP_KAFKA_CONTROLLER_PORT,
SNAPMAP_AZURITE_PORT, SNAPMAP_POSTGRES_PORT and SNAPMAP_MONGO_PORT.

Standard library only, so that it runs before the project's virtualenv exists. When the
Python Kafka client or pymongo can be imported, the readiness checks use them; otherwise
they use Kafka's own Java tools and a TCP connect.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import fcntl
import hashlib
import http.client
import importlib.util
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
PROJECT = Path(__file__).resolve().parent.parent
LOCALSTACK = PROJECT / "localstack"

MONGODB_DATABASE = "snapmap"
POSTGRES_USER = "postgres"
POSTGRES_DATABASE = "dagster"

# Azurite's built-in development account. Its key is published in Microsoft's Azurite
# documentation and is accepted only by the emulator, so it is no secret; it reaches the
# code only through the AZURE_STORAGE_CONNECTION_STRING that `env` exports.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

# (name, partitions) of the topics the pipeline uses; auto-creation is off on the broker.
KAFKA_TOPICS = (("photo-uploads", 3), ("photo-uploads.dlq", 1), ("event-updates", 3))

INSTALL_TIMEOUT = 900.0  # a cold Maven or npm download on a slow mirror
MONGO_INSTALL_TIMEOUT = 1800.0  # the mongo install script may build from source
STOP_TIMEOUT = 30.0  # Kafka's controlled shutdown takes a few seconds
LOCK_TIMEOUT = 1800.0  # another `up` may be doing a cold install
POLL_INTERVAL = 0.5

# The `postgres` system user runs PostgreSQL when this script runs as root, because
# initdb and postgres refuse to run as root (a server bug must not own the machine).
POSTGRES_SYSTEM_USER = "postgres"

# Files of this name mark a folder as ours, so that `wipe` never deletes anything else.
STACK_MARKER = ".snapmap-stack"


class StackError(Exception):
    """A failure to report to the user as one line, without a traceback."""


@dataclass(frozen=True)
class Config:
    """Where the stack lives and which ports it uses, read once from the environment."""

    root: Path
    kafka_port: int
    kafka_controller_port: int
    azurite_port: int
    postgres_port: int
    mongo_port: int

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Config:
        raw_root = env.get("SNAPMAP_STACK_DIR")
        if raw_root == "":
            # Like an empty port: the default folder may hold another stack's data.
            raise StackError(
                "SNAPMAP_STACK_DIR is set but empty; unset it to use the default folder, "
                "or set a folder"
            )
        root = Path(raw_root or PROJECT / ".stack").expanduser()
        return cls(
            root=root.resolve(),
            kafka_port=_port(env, "SNAPMAP_KAFKA_PORT", 29092),
            kafka_controller_port=_port(env, "SNAPMAP_KAFKA_CONTROLLER_PORT", 29093),
            azurite_port=_port(env, "SNAPMAP_AZURITE_PORT", 30000),
            postgres_port=_port(env, "SNAPMAP_POSTGRES_PORT", 25432),
            mongo_port=_port(env, "SNAPMAP_MONGO_PORT", 27317),
        )

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def lib_dir(self) -> Path:
        """Installed software (jars, node_modules): kept by `wipe`, removed by `wipe --all`."""
        return self.root / "lib"

    def connection_env(self) -> dict[str, str]:
        """The settings that the pipeline and its tests read, by variable name."""
        blob = f"http://{HOST}:{self.azurite_port}/{AZURITE_ACCOUNT}"
        return {
            "KAFKA_BOOTSTRAP_SERVERS": f"{HOST}:{self.kafka_port}",
            "MONGODB_URI": f"mongodb://{HOST}:{self.mongo_port}/",
            "MONGODB_DATABASE": MONGODB_DATABASE,
            "AZURE_STORAGE_CONNECTION_STRING": (
                f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                f"AccountKey={AZURITE_KEY};BlobEndpoint={blob};"
            ),
            "DAGSTER_POSTGRES_URL": (
                f"postgresql://{POSTGRES_USER}@{HOST}:{self.postgres_port}/{POSTGRES_DATABASE}"
            ),
        }


def _port(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    if raw == "":
        # Most likely a broken env file: the default port may be another stack's server.
        raise StackError(
            f"{name} is set but empty; unset it to use the default port, or set a port"
        )
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise StackError(f"{name}={raw!r} is not a TCP port number")
    port = int(raw)
    low, high = _ephemeral_range()
    if low <= port <= high:
        # A client reconnecting to a stopped server can be handed that server's port as its
        # own source port; the server then cannot bind it again until the socket times out.
        raise StackError(
            f"{name}={port} is inside this machine's ephemeral port range {low}-{high}; "
            f"pick a port below {low} (or above {high})"
        )
    return port


def _ephemeral_range() -> tuple[int, int]:
    """Linux's range for source ports (``net.ipv4.ip_local_port_range``), or IANA's elsewhere."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


# --------------------------------------------------------------------------- helpers


def say(line: str) -> None:
    """Print one line in one write: services start in threads and must not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def port_open(port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on HOST:port."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def file_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def last_line(path: Path) -> str:
    """The last non-blank line of a log, for a one-line error message."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:200]
    return ""


def run_logged(argv: list[str], log: Path, timeout: float, what: str, **kwargs) -> None:
    """Run an install or setup step to completion, its output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n$ {shlex.join(argv)}\n".encode())
        out.flush()
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                **kwargs,
            )
        except subprocess.TimeoutExpired:
            raise StackError(f"{what} took longer than {timeout:.0f}s; see {log}") from None
        except OSError as exc:
            raise StackError(f"{what} could not start: {exc}") from None
    if result.returncode != 0:
        raise StackError(f"{what} failed ({last_line(log)}); see {log}")


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_identity(pid: int) -> tuple[int, int] | None:
    """(session id, start time in clock ticks since boot) of a live process, or None.

    We start every server as the leader of its own session, so a live server's session id is
    its pid; the start time, from /proc, is fixed for the life of the process.
    """
    fields = proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[3]), int(fields[19])


def boot_time() -> float:
    """The wall-clock time of boot (``btime`` of /proc/stat), for pid files of older stacks."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise StackError("cannot read the boot time from /proc/stat")


def reap(pid: int) -> None:
    """Collect the exit status of a child of this process, so it does not linger."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def user_kwargs(user: str | None) -> dict:
    """subprocess arguments that run a program as `user` with only that user's group."""
    if not user:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def local_http_get(url: str, timeout: float) -> http.client.HTTPResponse:
    """GET without any proxy from the environment: the stack is only ever on loopback."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(url, timeout=timeout)


# --------------------------------------------------------------------------- services


@dataclass
class Launch:
    """How to start one server in the foreground (this script detaches it)."""

    argv: list[str]
    cwd: Path
    user: str | None = None  # run as this system user (only when we are root)


class Service:
    """One server of the stack. Subclasses fill in install, preparation and health."""

    name = ""
    start_timeout = 60.0
    stop_signal = signal.SIGTERM
    # Signal the server's whole process group, so that a launcher script that did not
    # `exec` its server does not leave the server behind.
    signal_group = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @property
    def ports(self) -> list[int]:
        raise NotImplementedError

    @property
    def address(self) -> str:
        return f"{HOST}:{self.ports[0]}"

    @property
    def data_paths(self) -> list[Path]:
        """What `wipe` deletes for this service."""
        raise NotImplementedError

    @property
    def pid_file(self) -> Path:
        return self.cfg.run_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.cfg.log_dir / f"{self.name}.log"

    @property
    def install_log(self) -> Path:
        return self.cfg.log_dir / f"install-{self.name}.log"

    def check_tools(self) -> None:
        """Raise StackError naming the first missing tool."""

    def install(self) -> None:
        """Install the server if it is not installed; fast when it is."""

    def prepare(self) -> None:
        """One-time initialisation of the data folder, and config written for this start."""

    def launch(self) -> Launch:
        raise NotImplementedError

    def is_ready(self) -> bool:
        """Whether the server answers a real request now (quick, never raises)."""
        raise NotImplementedError

    def after_start(self) -> str:
        """Idempotent setup once the server is ready; returns a note for the user."""
        return ""

    def install_is_current(self) -> bool:
        """False when the installed software no longer matches its lock or build files; a
        server still running from it keeps the old software until it is restarted."""
        return True

    def recorded_pid(self) -> list[int] | None:
        """The pid file's fields (pid, start ticks), or None when it is absent or not a pid."""
        try:
            recorded = [int(field) for field in self.pid_file.read_text().split()]
        except (OSError, ValueError):
            return None
        return recorded if 1 <= len(recorded) <= 2 else None

    def unreadable_pid_file(self) -> str | None:
        """Why this service's state is unknown: its pid file exists but holds no pid while one
        of its ports is taken, so the server it belonged to may still be running. None when
        the file is absent or readable, or when nothing listens on the ports (a stale file)."""
        if not self.pid_file.exists() or self.recorded_pid() is not None:
            return None
        taken = [port for port in self.ports if port_open(port)]
        if not taken:
            return None
        try:
            shown = repr(self.pid_file.read_text(errors="replace")[:40])
        except OSError as exc:
            shown = f"unreadable: {exc.strerror}"
        return (
            f"{self.name}: {self.pid_file} holds no pid ({shown}) while {HOST}:{taken[0]} is "
            "taken, perhaps by the server it belonged to, so this stack cannot tell whether "
            f"that server is its own; the file is left in place. Find the listener with "
            f"`ss -ltnp 'sport = :{taken[0]}'`, stop it if it is this stack's, then delete the file"
        )

    def running_pid(self) -> int | None:
        """The pid from our pid file if that process is still the one we started."""
        recorded = self.recorded_pid()
        if recorded is None:
            return None
        pid = recorded[0]
        reap(pid)
        identity = process_identity(pid)
        if identity is None or identity[0] != pid:
            return None
        if len(recorded) == 2:
            return pid if identity[1] == recorded[1] else None
        # A file holding the pid alone was written by an older version of this script, right
        # after it started its server. Being a session leader is not enough to be that server
        # (shells, other stacks' servers and PostgreSQL's workers lead sessions too), so the
        # older check applies to it: the process started at most 60 s before the file was
        # written and not after it.
        try:
            written = self.pid_file.stat().st_mtime
        except OSError:
            return None
        started = boot_time() + identity[1] / os.sysconf("SC_CLK_TCK")
        return pid if written - 60 <= started <= written + 2 else None

    def record_pid(self, pid: int) -> None:
        """Write the pid file: the pid and the process's start time in clock ticks since boot.

        The start time is what tells our server from a later process given the same pid. It is
        compared as recorded, never with the wall clock: a clock step (a VM resumed, NTP) must
        not make a running server look gone.
        """
        identity = process_identity(pid)
        if identity is not None:  # one that exited at once is reported by wait_ready
            # Written whole and renamed into place: a command killed mid-write (a test's time
            # limit) must not leave a truncated file behind a running server.
            partial = self.pid_file.with_name(self.pid_file.name + ".partial")
            partial.write_text(f"{pid} {identity[1]}\n")
            partial.replace(self.pid_file)


def java_binary() -> str:
    """The JDK's java: $JAVA_HOME's when set (as Kafka's own scripts do), else PATH's."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise StackError("kafka: no `java` on PATH (install a JDK 17, e.g. openjdk-17-jdk)")
    return found


def kafka_python_client():
    """The confluent_kafka module when it can be imported, else None."""
    try:
        import confluent_kafka  # optional: the project's virtualenv has it
    except ImportError:
        return None
    return confluent_kafka


class Kafka(Service):
    name = "kafka"
    # A restart reloads every partition before the group coordinator answers; with many
    # partitions on a busy 2-core machine that took over 90 s. Still a bound, never a hang.
    start_timeout = 240.0

    @property
    def ports(self) -> list[int]:
        return [self.cfg.kafka_port, self.cfg.kafka_controller_port]

    @property
    def home(self) -> Path:
        return self.cfg.root / "kafka"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def jars(self) -> Path:
        return self.cfg.lib_dir / "kafka"

    @property
    def data_paths(self) -> list[Path]:
        return [self.home]

    @property
    def pom(self) -> Path:
        return LOCALSTACK / "kafka" / "pom.xml"

    def check_tools(self) -> None:
        java_binary()
        if not self._installed() and not shutil.which("mvn"):
            raise StackError("kafka: no `mvn` on PATH to fetch the Kafka jars (install maven)")

    def _installed(self) -> bool:
        stamp = self.jars / ".pom-sha256"
        return stamp.is_file() and stamp.read_text().strip() == file_digest(self.pom)

    def install_is_current(self) -> bool:
        return self._installed()

    def install(self) -> None:
        if self._installed():
            return
        say("kafka: resolving the Kafka jars with Maven (first run only)")
        staging = self.jars.with_name("kafka.partial")
        shutil.rmtree(staging, ignore_errors=True)
        # Maven's own cache (~/.m2) makes a second install fast; the jars are copied to one
        # folder of ours so that the classpath is simply `folder/*`.
        run_logged(
            [
                "mvn",
                "-B",
                "-q",
                "-Dstyle.color=never",
                "-f",
                str(self.pom),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
            ],
            self.install_log,
            INSTALL_TIMEOUT,
            "kafka: Maven download of the Kafka jars",
        )
        if not any(staging.glob("kafka_2.13-*.jar")):
            raise StackError(f"kafka: Maven produced no kafka_2.13 jar; see {self.install_log}")
        (staging / ".pom-sha256").write_text(file_digest(self.pom) + "\n")
        shutil.rmtree(self.jars, ignore_errors=True)
        staging.rename(self.jars)

    def _java(self, main: str, *args: str, heap: str = "256m") -> list[str]:
        return [
            java_binary(),
            f"-Xmx{heap}",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.home / 'tools-log4j.properties'}",
            "-cp",
            f"{self.jars}/*",
            main,
            *args,
        ]

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        # Written on every start so that port overrides take effect; the data folder does
        # not record listener addresses, so moving ports keeps the data.
        server = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{cfg.kafka_controller_port}",
            "listeners": (
                f"PLAINTEXT://{HOST}:{cfg.kafka_port},CONTROLLER://{HOST}:"
                f"{cfg.kafka_controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://{HOST}:{cfg.kafka_port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # One broker: the internal topics cannot have more than one replica.
            "offsets.topic.replication.factor": "1",
            # One partition for the group-offsets topic: on a fresh broker the group
            # coordinator is ready in a second instead of after creating 50 partitions.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            # Topics are created by this script with their partition counts; a typo in a
            # topic name must fail rather than create a new topic.
            "auto.create.topics.enable": "false",
            # No other consumer will join within the default 3 s, so don't wait for one.
            "group.initial.rebalance.delay.ms": "0",
        }
        lines = [f"{key}={value}" for key, value in server.items()]
        (self.home / "server.properties").write_text("\n".join(lines) + "\n")
        quiet = ("kafka.request.logger", "state.change.logger")
        (self.home / "log4j.properties").write_text(_log4j_config("INFO", "System.out", quiet))
        (self.home / "tools-log4j.properties").write_text(_log4j_config("WARN", "System.err"))
        (self.home / "admin.properties").write_text(
            "request.timeout.ms=5000\ndefault.api.timeout.ms=10000\n"
        )

        if not (self.data_dir / "meta.properties").is_file():
            run_logged(
                self._java(
                    "kafka.tools.StorageTool",
                    "format",
                    "--ignore-formatted",
                    "--cluster-id",
                    _new_cluster_id(),
                    "--config",
                    str(self.home / "server.properties"),
                ),
                self.log_file,
                120.0,
                "kafka: formatting the KRaft storage",
            )

    def launch(self) -> Launch:
        argv = [
            java_binary(),
            "-Xms128m",
            "-Xmx512m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            # Plain IPv4 sockets: listeners then show as 127.0.0.1, not as mapped IPv6.
            "-Djava.net.preferIPv4Stack=true",
            f"-Dlog4j.configuration=file:{self.home / 'log4j.properties'}",
            "-cp",
            f"{self.jars}/*",
            "kafka.Kafka",
            str(self.home / "server.properties"),
        ]
        return Launch(argv=argv, cwd=self.home)

    def is_ready(self) -> bool:
        if not port_open(self.cfg.kafka_port):
            return False
        try:
            self.list_topics()
        except StackError:
            return False
        return True

    def list_topics(self) -> set[str]:
        """Topic names from a metadata request to the broker."""
        client = kafka_python_client()
        if client is not None:
            from confluent_kafka.admin import AdminClient

            try:
                metadata = self._admin(AdminClient).list_topics(timeout=5)
            except client.KafkaException as exc:
                raise StackError(f"kafka: metadata request failed: {exc}") from None
            if not metadata.brokers:
                raise StackError("kafka: metadata names no broker yet")
            return set(metadata.topics)
        out = self._topic_command("--list")
        return {line.strip() for line in out.splitlines() if line.strip()}

    def _admin(self, admin_class):
        # log_level 0: connection-refused chatter during startup is not news; failures are
        # reported through the exceptions and time limits instead.
        return admin_class(
            {"bootstrap.servers": self.address, "log_level": 0, "socket.timeout.ms": 5000}
        )

    def _topic_command(self, *args: str) -> str:
        argv = self._java(
            "org.apache.kafka.tools.TopicCommand",
            "--bootstrap-server",
            self.address,
            "--command-config",
            str(self.home / "admin.properties"),
            *args,
        )
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise StackError(f"kafka: topic tool timed out: {' '.join(args)}") from None
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise StackError(f"kafka: topic tool failed ({detail})")
        return result.stdout

    def after_start(self) -> str:
        existing = self.list_topics()
        missing = [(name, n) for name, n in KAFKA_TOPICS if name not in existing]
        client = kafka_python_client()
        if client is not None:
            self._wait_for_group_coordinator(client)
        if not missing:
            return ""
        if client is None:
            for name, partitions in missing:
                self._topic_command(
                    "--create",
                    "--if-not-exists",
                    "--topic",
                    name,
                    "--partitions",
                    str(partitions),
                    "--replication-factor",
                    "1",
                )
        else:
            self._create_topics(client, missing)
        return "created topics " + ", ".join(name for name, _ in missing)

    def _wait_for_group_coordinator(self, client, limit_s: float = 90.0) -> None:
        """The broker answers metadata before its group coordinator has loaded; the pipeline
        commits offsets from its first run, so `up` is ready only once a group answers."""
        consumer = client.Consumer(
            {"bootstrap.servers": f"{HOST}:{self.cfg.kafka_port}", "group.id": "snapmap-stack"}
        )
        deadline = time.monotonic() + limit_s
        try:
            while True:
                try:
                    consumer.committed([client.TopicPartition("__stack_probe", 0)], timeout=5)
                    return
                except client.KafkaException as exc:
                    if time.monotonic() > deadline:
                        raise StackError(f"kafka: group coordinator not ready: {exc}") from None
                    time.sleep(0.5)
        finally:
            consumer.close()

    def _create_topics(self, client, topics: list[tuple[str, int]]) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = self._admin(AdminClient)  # must outlive the futures it hands out
        # As the pipeline creates its topics (KafkaResource.ensure_topics): the broker refuses a
        # producer timestamp more than an hour ahead.
        limit = {"message.timestamp.after.max.ms": "3600000"}
        new = [
            NewTopic(name, num_partitions=n, replication_factor=1, config=limit)
            for name, n in topics
        ]
        for name, future in admin.create_topics(new, request_timeout=15).items():
            try:
                future.result(timeout=30)
            except client.KafkaException as exc:
                # Another `up` may have created it in between: that is the wanted state.
                if exc.args[0].code() != client.KafkaError.TOPIC_ALREADY_EXISTS:
                    raise StackError(f"kafka: cannot create topic {name}: {exc}") from None


def _log4j_config(level: str, target: str, quiet: tuple[str, ...] = ()) -> str:
    lines = [
        f"log4j.rootLogger={level}, out",
        "log4j.appender.out=org.apache.log4j.ConsoleAppender",
        f"log4j.appender.out.Target={target}",
        "log4j.appender.out.layout=org.apache.log4j.PatternLayout",
        "log4j.appender.out.layout.ConversionPattern=[%d] %p %m (%c)%n",
    ]
    lines += [f"log4j.logger.{name}=WARN" for name in quiet]
    return "\n".join(lines) + "\n"


def _new_cluster_id() -> str:
    """A Kafka cluster id: a random UUID in URL-safe base64 without padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka avoids these: they read as a CLI option
            return text


class Azurite(Service):
    name = "azurite"
    start_timeout = 30.0

    @property
    def ports(self) -> list[int]:
        return [self.cfg.azurite_port]

    @property
    def package_dir(self) -> Path:
        return LOCALSTACK / "azurite"

    @property
    def install_dir(self) -> Path:
        return self.cfg.lib_dir / "azurite"

    @property
    def data_dir(self) -> Path:
        return self.cfg.root / "azurite"

    @property
    def data_paths(self) -> list[Path]:
        return [self.data_dir]

    @property
    def entry_point(self) -> Path:
        return self.install_dir / "node_modules" / ".bin" / "azurite-blob"

    def _lock_digest(self) -> str:
        package = self.package_dir
        return file_digest(
            package / "package.json", package / "package-lock.json", package / "lookup_order.py"
        )

    def install_is_current(self) -> bool:
        return self._installed()

    def _rewrite_lookups(self) -> None:
        """Azurite 3.35.0's blob lookups scan every blob; see azurite/lookup_order.py."""
        spec = importlib.util.spec_from_file_location(
            "azurite_lookup_order", self.package_dir / "lookup_order.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            module.apply(self.install_dir)
        except module.LookupOrderError as exc:
            raise StackError(f"azurite: {exc}") from exc

    def _installed(self) -> bool:
        stamp = self.install_dir / ".lock-sha256"
        return (
            self.entry_point.exists()
            and stamp.is_file()
            and stamp.read_text().strip() == self._lock_digest()
        )

    def check_tools(self) -> None:
        if not shutil.which("node"):
            raise StackError("azurite: no `node` on PATH (install Node.js 20 or newer)")
        if not self._installed() and not shutil.which("npm"):
            raise StackError("azurite: no `npm` on PATH to install Azurite (install npm)")

    def install(self) -> None:
        if self._installed():
            return
        say("azurite: installing Azurite with npm ci (first run only)")
        shutil.rmtree(self.install_dir, ignore_errors=True)
        self.install_dir.mkdir(parents=True)
        # npm ci installs next to package.json; a copy keeps node_modules out of the tree.
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(self.package_dir / name, self.install_dir / name)
        run_logged(
            ["npm", "ci", "--omit=dev", "--no-audit", "--no-fund"],
            self.install_log,
            INSTALL_TIMEOUT,
            "azurite: npm install of Azurite",
            cwd=self.install_dir,
        )
        self._rewrite_lookups()
        (self.install_dir / ".lock-sha256").write_text(self._lock_digest() + "\n")

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def launch(self) -> Launch:
        argv = [
            shutil.which("node") or "node",
            str(self.entry_point),
            "--blobHost",
            HOST,
            "--blobPort",
            str(self.cfg.azurite_port),
            "--location",
            str(self.data_dir),
            "--disableTelemetry",
            # Newer SDKs send API versions that a pinned Azurite does not know yet.
            "--skipApiVersionCheck",
            "--loose",
        ]
        return Launch(argv=argv, cwd=self.data_dir)

    def is_ready(self) -> bool:
        url = f"http://{self.address}/{AZURITE_ACCOUNT}?comp=list"
        try:
            with local_http_get(url, timeout=2) as response:
                server = response.headers.get("Server", "")
        except urllib.error.HTTPError as exc:  # unauthenticated: 403 from Azurite is fine
            server = exc.headers.get("Server", "")
        except OSError:
            return False
        return server.startswith("Azurite")


class Postgres(Service):
    name = "postgres"
    start_timeout = 60.0
    # SIGTERM is PostgreSQL's "smart" shutdown, which waits for every client (a Dagster
    # daemon) to disconnect; SIGINT is the "fast" one: clients are cut, data is kept.
    stop_signal = signal.SIGINT
    signal_group = False  # the postmaster stops its own children in order

    @property
    def ports(self) -> list[int]:
        return [self.cfg.postgres_port]

    @property
    def data_dir(self) -> Path:
        return self.cfg.root / "postgres"

    @property
    def socket_dir(self) -> Path:
        return self.cfg.run_dir / "postgres"

    @property
    def data_paths(self) -> list[Path]:
        return [self.data_dir]

    def _system_user(self) -> str | None:
        return POSTGRES_SYSTEM_USER if os.geteuid() == 0 else None

    def bin_dir(self) -> Path | None:
        """The PostgreSQL programs: those matching an existing data folder, else the newest."""
        candidates = sorted(
            Path("/usr/lib/postgresql").glob("*/bin/initdb"),
            key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
        )
        version_file = self.data_dir / "PG_VERSION"
        if version_file.is_file():
            wanted = Path("/usr/lib/postgresql") / version_file.read_text().strip() / "bin"
            if (wanted / "postgres").is_file():
                return wanted
            raise StackError(
                f"postgres: {self.data_dir} was made by PostgreSQL "
                f"{version_file.read_text().strip()}, which is not installed; install it "
                "or `wipe --only postgres`"
            )
        if candidates:
            return candidates[-1].parent
        found = shutil.which("initdb")
        return Path(found).resolve().parent if found else None

    def check_tools(self) -> None:
        installed = self.bin_dir() is not None
        root = self._system_user() is not None
        if not installed and not (root and shutil.which("apt-get")):
            raise StackError(
                "postgres: no initdb in /usr/lib/postgresql/*/bin or on PATH; install the "
                "Debian package postgresql (`up` does so itself when run as root)"
            )
        if not root:
            return
        if installed:
            try:
                pwd.getpwnam(POSTGRES_SYSTEM_USER)
            except KeyError:
                raise StackError(
                    "postgres: as root it runs as the `postgres` system user, which is "
                    "missing (the Debian package postgresql creates it)"
                ) from None
        self._check_reachable_by_system_user()

    def _check_reachable_by_system_user(self) -> None:
        # The server runs as `postgres`, so every folder above its data must let others in.
        for folder in [self.cfg.root, *self.cfg.root.parents]:
            if folder.exists() and not folder.stat().st_mode & 0o001:
                raise StackError(
                    f"postgres: the `postgres` user cannot enter {folder}; chmod o+x it or "
                    "set SNAPMAP_STACK_DIR to a folder it can reach"
                )

    def install(self) -> None:
        if self.bin_dir() is not None:
            return
        # Only reached as root (check_tools stops a normal user): the local stack is meant
        # to install what it needs on a fresh machine.
        say("postgres: installing the Debian package postgresql (first run only)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "postgresql"]
        try:
            run_logged(install, self.install_log, INSTALL_TIMEOUT, "postgres: apt-get", env=env)
        except StackError:
            # A fresh machine may not have package lists yet.
            run_logged(
                ["apt-get", "update", "-q"],
                self.install_log,
                INSTALL_TIMEOUT,
                "postgres: apt-get update",
                env=env,
            )
            run_logged(install, self.install_log, INSTALL_TIMEOUT, "postgres: apt-get", env=env)
        if self.bin_dir() is None:
            raise StackError(f"postgres: no initdb even after apt-get; see {self.install_log}")

    def _own(self, path: Path) -> None:
        user = self._system_user()
        if user:
            shutil.chown(path, user=user, group=pwd.getpwnam(user).pw_gid)

    def prepare(self) -> None:
        bin_dir = self.bin_dir()
        for folder in (self.data_dir, self.socket_dir):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
            self._own(folder)
        if (self.data_dir / "PG_VERSION").is_file():
            return
        # trust: only clients on this machine can reach 127.0.0.1 and the socket, which
        # sits in a folder only the server's user can enter.
        run_logged(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                POSTGRES_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ],
            self.log_file,
            120.0,
            "postgres: initdb",
            cwd=self.data_dir,
            **user_kwargs(self._system_user()),
        )

    def launch(self) -> Launch:
        socket_path = self.socket_dir / f".s.PGSQL.{self.cfg.postgres_port}"
        # A Unix socket path is limited to 107 bytes; a deep stack folder gets TCP only.
        socket_dirs = str(self.socket_dir) if len(str(socket_path)) < 100 else ""
        argv = [
            str(self.bin_dir() / "postgres"),
            "-D",
            str(self.data_dir),
            "-c",
            f"listen_addresses={HOST}",
            "-c",
            f"port={self.cfg.postgres_port}",
            "-c",
            f"unix_socket_directories={socket_dirs}",
            "-c",
            "logging_collector=off",
        ]
        return Launch(argv=argv, cwd=self.data_dir, user=self._system_user())

    def psql(self, sql: str, database: str = "postgres") -> str:
        bin_dir = self.bin_dir()
        argv = [
            str(bin_dir / "psql"),
            "-X",
            "-A",
            "-t",
            "-q",
            "-h",
            HOST,
            "-p",
            str(self.cfg.postgres_port),
            "-U",
            POSTGRES_USER,
            "-d",
            database,
            "-c",
            sql,
        ]
        env = {**os.environ, "PGCONNECT_TIMEOUT": "3"}
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=15, env=env, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise StackError("postgres: psql timed out") from None
        if result.returncode != 0:
            raise StackError(f"postgres: psql failed: {result.stderr.strip()[:200]}")
        return result.stdout.strip()

    def is_ready(self) -> bool:
        if not port_open(self.cfg.postgres_port):
            return False
        try:
            return self.psql("select 1") == "1"
        except StackError:
            return False

    def after_start(self) -> str:
        exists = self.psql(f"select 1 from pg_database where datname = '{POSTGRES_DATABASE}'")
        if exists == "1":
            return ""
        self.psql(f"create database {POSTGRES_DATABASE}")
        return f"created database {POSTGRES_DATABASE}"


def mongo_source_stamp(scripts: Path) -> str:
    """The stamp ``scripts/install.sh`` gives a build of the server from ``scripts`` as they
    are now (``install.sh --stamp``); raises OSError or SubprocessError when it cannot tell."""
    return subprocess.run(
        ["bash", str(scripts / "install.sh"), "--stamp"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()


class Mongo(Service):
    """The MongoDB-compatible server, built and run by the scripts in localstack/mongo/.

    Their contract: `install.sh BUILD_DIR` is idempotent and exits non-zero with a one-line
    error; `run.sh BUILD_DIR HOST PORT DATA_DIR` runs the server in the foreground.
    """

    name = "mongo"
    # The server opens its store and rebuilds every non-unique index from the documents before
    # it listens: a store holding 300,000 photos took 44-53 s to open under load, a larger one
    # takes longer (docs/mongodb-compatible-server.md).
    start_timeout = 240.0

    @property
    def ports(self) -> list[int]:
        return [self.cfg.mongo_port]

    @property
    def scripts(self) -> Path:
        return LOCALSTACK / "mongo"

    @property
    def build_dir(self) -> Path:
        return self.cfg.root / "mongo-build"

    @property
    def data_dir(self) -> Path:
        return self.cfg.root / "mongo"

    @property
    def data_paths(self) -> list[Path]:
        return [self.data_dir]

    def check_tools(self) -> None:
        for script in ("install.sh", "run.sh"):
            if not (self.scripts / script).is_file():
                raise StackError(
                    f"mongo: localstack/mongo/{script} is missing, so the MongoDB-compatible "
                    "server is not available (use --without mongo)"
                )

    def install(self) -> None:
        self.build_dir.mkdir(parents=True, exist_ok=True)
        run_logged(
            ["bash", str(self.scripts / "install.sh"), str(self.build_dir)],
            self.install_log,
            MONGO_INSTALL_TIMEOUT,
            "mongo: localstack/mongo/install.sh",
        )

    def install_is_current(self) -> bool:
        """Whether the build's stamp is that of the pom and Java sources now (install.sh
        computes both; a server started from the build runs what the stamp says)."""
        try:
            built = (self.build_dir / "BUILD_STAMP").read_text().strip()
            now = mongo_source_stamp(self.scripts)
        except (OSError, subprocess.SubprocessError):
            return False
        return built == now

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def launch(self) -> Launch:
        argv = [
            "bash",
            str(self.scripts / "run.sh"),
            str(self.build_dir),
            HOST,
            str(self.cfg.mongo_port),
            str(self.data_dir),
        ]
        return Launch(argv=argv, cwd=self.data_dir)

    def is_ready(self) -> bool:
        if not port_open(self.cfg.mongo_port):
            return False
        try:
            import pymongo  # optional: the project's virtualenv has it
        except ImportError:
            return True
        uri = self.cfg.connection_env()["MONGODB_URI"]
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000)
        try:
            client.admin.command("ping")
            return True
        except pymongo.errors.PyMongoError:
            return False
        finally:
            client.close()


SERVICE_CLASSES = (Kafka, Azurite, Postgres, Mongo)
SERVICE_NAMES = tuple(cls.name for cls in SERVICE_CLASSES)


# --------------------------------------------------------------------------- lifecycle


def prepare_root(cfg: Config) -> None:
    """Create the stack folder, refusing to adopt a non-empty folder that is not ours."""
    marker = cfg.root / STACK_MARKER
    if cfg.root.exists() and not marker.exists() and any(cfg.root.iterdir()):
        raise StackError(f"{cfg.root} is not empty and is not a stack folder; pick another")
    for folder in (cfg.root, cfg.run_dir, cfg.log_dir, cfg.lib_dir):
        folder.mkdir(parents=True, exist_ok=True)
    marker.touch()


class StackLock:
    """One stack command at a time per stack folder (parallel test sessions call `up`)."""

    def __init__(self, cfg: Config):
        self.path = cfg.root / "stack.lock"
        self.handle = None

    def __enter__(self) -> StackLock:
        try:
            self.handle = self.path.open("a")
        except PermissionError:
            raise StackError(
                f"not permitted to open {self.path} (owned by {path_owner(self.path)}); run "
                "stack commands as the user who started the stack"
            ) from None
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(f"another stack command still holds {self.path}") from None
                time.sleep(POLL_INTERVAL)

    def __exit__(self, *exc_info) -> None:
        self.handle.close()


def start_service(svc: Service) -> str:
    """Bring one service up (or confirm it is up); returns the line to print."""
    began = time.monotonic()
    pid = svc.running_pid()
    if pid is not None:
        wait_ready(svc, None, pid)
        notes = [svc.after_start()]
        if not svc.install_is_current():
            notes.append(
                "it runs an older install: `scripts/stack stop` then `scripts/stack up` "
                "installs and starts the current one"
            )
        note = "; ".join(n for n in notes if n)
        return f"{svc.name}: up (pid {pid}) on {svc.address}" + (f"; {note}" if note else "")

    svc.install()
    svc.prepare()
    spec = svc.launch()
    svc.log_file.parent.mkdir(parents=True, exist_ok=True)
    with svc.log_file.open("ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(spec.argv)}\n".encode())
        log.flush()
        # A session of its own: the server outlives this script and a Ctrl-C in the shell
        # that ran `up` does not reach it; `down` signals it by pid.
        proc = subprocess.Popen(
            spec.argv,
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **user_kwargs(spec.user),
        )
    svc.record_pid(proc.pid)
    try:
        wait_ready(svc, proc, proc.pid)
        note = svc.after_start()
    except StackError:
        stop_pids([(svc, proc.pid)])
        raise
    took = time.monotonic() - began
    line = f"{svc.name}: started (pid {proc.pid}) on {svc.address} in {took:.1f}s"
    return line + (f"; {note}" if note else "")


def wait_ready(svc: Service, proc: subprocess.Popen | None, pid: int) -> None:
    deadline = time.monotonic() + svc.start_timeout
    while not svc.is_ready():
        exited = proc.poll() is not None if proc else svc.running_pid() != pid
        if exited:
            detail = last_line(svc.log_file)
            raise StackError(f"{svc.name}: exited while starting ({detail}); see {svc.log_file}")
        if time.monotonic() > deadline:
            raise StackError(
                f"{svc.name}: not ready after {svc.start_timeout:.0f}s; see {svc.log_file}"
            )
        time.sleep(POLL_INTERVAL)


def path_owner(path: Path) -> str:
    """The user name (or uid) that owns a file, for messages."""
    try:
        uid = path.stat().st_uid
    except OSError:
        return "another user"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def process_owner(pid: int) -> str:
    """The user name (or uid) that owns a process, for messages."""
    return path_owner(Path(f"/proc/{pid}"))


def send_stop(svc: Service, pid: int, sig: int, group: bool) -> bool:
    """Signal one server (its process group when ``group``); False when the OS refuses.

    A refusal (EPERM) means the process belongs to a user this command cannot signal: a
    stack started with sudo and stopped without it. Nothing else is signalled instead."""
    try:
        if group:
            os.killpg(pid, sig)  # pid is also the group id: setsid at start
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        say(
            f"{svc.name}: not permitted to signal pid {pid}, which runs as {process_owner(pid)}; "
            f"it keeps running and {svc.pid_file} is kept; stop it as that user (or as root)"
        )
        return False
    return True


def stop_pids(targets: list[tuple[Service, int]]) -> list[Service]:
    """Stop the given servers: their stop signal, then SIGKILL after STOP_TIMEOUT.

    Returns the services whose server this process was not permitted to signal; their pid
    files are kept, since those servers still run."""
    refused = [
        svc for svc, pid in targets if not send_stop(svc, pid, svc.stop_signal, svc.signal_group)
    ]
    targets = [(svc, pid) for svc, pid in targets if svc not in refused]
    deadline = time.monotonic() + STOP_TIMEOUT
    pending = list(targets)
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)
        pending = [(svc, pid) for svc, pid in pending if svc.running_pid() == pid]
    for svc, pid in pending:
        say(f"{svc.name}: did not stop within {STOP_TIMEOUT:.0f}s; killing it")
        if not send_stop(svc, pid, signal.SIGKILL, True):
            refused.append(svc)
    kill_deadline = time.monotonic() + 5
    while pending and time.monotonic() < kill_deadline:
        time.sleep(0.1)
        pending = [(svc, pid) for svc, pid in pending if svc.running_pid() == pid]
    for svc, _ in targets:
        if svc not in refused:
            svc.pid_file.unlink(missing_ok=True)
    return refused


def cmd_up(cfg: Config, services: list[Service], print_env: bool = True) -> int:
    """Start the servers; ``print_env``: end with the export lines (``up``, not ``start``)."""
    prepare_root(cfg)
    # The servers inherit this process's signal dispositions, and a Java server (Kafka, the
    # MongoDB-compatible server) keeps SIGTERM ignored when it starts with it ignored: it would
    # then outlive `down` until the SIGKILL fallback. Dagster leaves SIGTERM ignored in the
    # process that ran a job (it copies SIGINT's disposition to SIGTERM, and a test suite
    # started in the background has SIGINT ignored), and the fault tests restart servers from
    # that process, so the default is restored here for every server started below.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with StackLock(cfg):
        # Preflight everything before downloading anything: a missing tool or a taken port
        # is reported in one line before any time is spent.
        for svc in services:
            if svc.running_pid() is not None:
                continue
            problem = svc.unreadable_pid_file()
            if problem:
                raise StackError(problem)
            svc.check_tools()
            for port in svc.ports:
                if port_open(port):
                    raise StackError(
                        f"{svc.name}: port {HOST}:{port} is taken by a process this stack "
                        "did not start (see `ss -ltnp`)"
                    )

        failures = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(services)) as pool:
            futures = [pool.submit(start_service, svc) for svc in services]
            for future in futures:
                try:
                    say(future.result())
                except StackError as exc:
                    failures.append(str(exc))
    for failure in failures:
        print(f"stack: error: {failure}", file=sys.stderr, flush=True)
    if failures:
        return 1
    if print_env:
        print(format_env(cfg), flush=True)
    return 0


def cmd_down(cfg: Config, services: list[Service]) -> int:
    if not cfg.run_dir.is_dir():
        print("stack: nothing is running (no stack folder yet)")
        return 0
    with StackLock(cfg):
        pids = {svc.name: svc.running_pid() for svc in services}
        unknown = {
            svc.name: svc.unreadable_pid_file() for svc in services if pids[svc.name] is None
        }
        refused = stop_pids(
            [(svc, pids[svc.name]) for svc in services if pids[svc.name] is not None]
        )
        # Under the lock: a `start` waiting for it must not have its new pid file deleted.
        for svc in services:
            if svc not in refused and not unknown.get(svc.name):
                svc.pid_file.unlink(missing_ok=True)  # also a stale one, left by a crash
    for svc in services:
        pid = pids[svc.name]
        if unknown.get(svc.name):
            print(f"stack: error: {unknown[svc.name]}", file=sys.stderr)
        elif svc in refused:
            print(f"{svc.name}: still running (pid {pid})")
        else:
            print(f"{svc.name}: stopped (pid {pid})" if pid else f"{svc.name}: not running")
    return 1 if refused or any(unknown.values()) else 0


def cmd_status(cfg: Config, services: list[Service]) -> int:
    all_up = True
    for svc in services:
        pid = svc.running_pid()
        note = ""
        if pid is not None and svc.is_ready():
            state = "up"
        elif pid is not None:
            state, all_up = "starting", False
        elif svc.unreadable_pid_file():
            state, note, all_up = "unknown", "pid file holds no pid; its port is taken", False
        else:
            state, all_up = "down", False
            if any(port_open(port) for port in svc.ports):
                note = "port taken by another process"
        shown_pid = f"pid {pid}" if pid is not None else "-"
        line = f"{svc.name:<9} {state:<9} {shown_pid:<11} {svc.address}"
        print(f"{line}  ({note})" if note else line)
    return 0 if all_up else 1


def format_env(cfg: Config) -> str:
    return "\n".join(
        f"export {name}={shlex.quote(value)}" for name, value in cfg.connection_env().items()
    )


NO_EXPORT_LINES = "standard output is closed; the export lines were not written"


def write_env(cfg: Config) -> None:
    """Write ``format_env``'s lines to standard output, flushed. A caller evaluates them, so
    output that cannot be written (the descriptor closed, the reader gone) is a ``StackError``:
    the caller must not carry on with its shell's own settings."""
    try:
        sys.stdout.write(format_env(cfg) + "\n")
        sys.stdout.flush()
    except OSError:
        # The lines stay in the buffer: pointing the descriptor at /dev/null keeps Python's
        # flush at exit from failing again and turning the exit status to 120.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise StackError(NO_EXPORT_LINES) from None


def describe_env(cfg: Config) -> str:
    """One line for a person: the stack folder and the server addresses that ``format_env``'s
    settings point at, saying so when they are the defaults (a shell without SNAPMAP_STACK_DIR
    and SNAPMAP_*_PORT: easy to miss when a stack runs elsewhere)."""
    servers = ", ".join(
        f"{name} {HOST}:{port}"
        for name, port in (
            ("kafka", cfg.kafka_port),
            ("mongo", cfg.mongo_port),
            ("azurite", cfg.azurite_port),
            ("postgres", cfg.postgres_port),
        )
    )
    default = " (the default folder and ports)" if cfg == Config.from_env({}) else ""
    return f"stack: settings for the stack in {cfg.root}: {servers}{default}"


def cmd_wipe(cfg: Config, services: list[Service], everything: bool) -> int:
    if not cfg.root.exists():
        return 0
    if not (cfg.root / STACK_MARKER).exists():
        raise StackError(f"{cfg.root} has no {STACK_MARKER} file; not deleting anything in it")
    if cmd_down(cfg, services) != 0:
        raise StackError("a server may still be running (see above); not deleting its data")
    if everything:
        shutil.rmtree(cfg.root)
        print(f"stack: deleted {cfg.root}")
        return 0
    for svc in services:
        for path in svc.data_paths:
            shutil.rmtree(path, ignore_errors=True)
        svc.log_file.unlink(missing_ok=True)
        print(f"{svc.name}: data deleted")
    return 0


def cmd_logs(cfg: Config, name: str | None, lines: int, follow: bool) -> int:
    if name is None:
        logs = sorted(cfg.log_dir.glob("*.log")) if cfg.log_dir.is_dir() else []
        if not logs:
            raise StackError(f"no logs in {cfg.log_dir} yet")
    else:
        logs = [cfg.log_dir / f"{name}.log"]
        if not logs[0].is_file():
            raise StackError(f"{name}: no log at {logs[0]} yet")
    if follow:
        # Runs until the user stops it with Ctrl-C, which is what following a log means.
        return subprocess.run(["tail", "-n", str(lines), "-F", *map(str, logs)]).returncode
    for log in logs:
        if len(logs) > 1:
            print(f"==> {log} <==")
        print("\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    return 0


# --------------------------------------------------------------------------- command line


def parse_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SERVICE_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown service {', '.join(unknown)} (services: {', '.join(SERVICE_NAMES)})"
        )
    return names


def select(cfg: Config, args: argparse.Namespace) -> list[Service]:
    names = list(SERVICE_NAMES)
    if getattr(args, "names", None):
        names = [name for name in SERVICE_NAMES if name in args.names]
    if getattr(args, "only", None):
        names = [name for name in names if name in args.only]
    if getattr(args, "without", None):
        names = [name for name in names if name not in args.without]
    if not names:
        raise StackError("no service selected")
    return [cls(cfg) for cls in SERVICE_CLASSES if cls.name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stack", description="SnapMap's local stack of servers on 127.0.0.1."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def selectable(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text)
        group = sub.add_mutually_exclusive_group()
        group.add_argument(
            "--only", type=parse_names, metavar="NAMES", help="comma-separated services to act on"
        )
        group.add_argument(
            "--without",
            type=parse_names,
            metavar="NAMES",
            help="comma-separated services to leave alone",
        )
        return sub

    selectable("up", "install if needed, start and wait until every server answers")
    selectable("down", "stop the servers this stack started; data is kept")
    selectable("status", "one line per server; exit 1 unless all are up")
    wipe = selectable("wipe", "stop the servers and delete their data")
    wipe.add_argument("--all", action="store_true", help="delete the installs too")
    for name, text in (("start", "start these servers"), ("stop", "stop these servers")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("names", nargs="+", choices=SERVICE_NAMES, metavar="NAME")
    logs = commands.add_parser("logs", help="print (or follow) a server's log")
    logs.add_argument("name", nargs="?", choices=SERVICE_NAMES, metavar="NAME")
    logs.add_argument("-n", "--lines", type=int, default=50)
    logs.add_argument("-f", "--follow", action="store_true")
    env = commands.add_parser("env", help="print export lines with the connection settings")
    env.add_argument(
        "--where",
        action="store_true",
        help="also write one line to stderr naming the stack folder and the ports",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = Config.from_env(dict(os.environ))
        if args.command == "env":
            # With standard error closed (sys.stderr None, or a write that fails), the line
            # for a person is left out: the export lines are what the caller evaluates.
            if sys.stdout is None:
                raise StackError(NO_EXPORT_LINES)
            if args.where and sys.stderr is not None:
                try:
                    print(describe_env(cfg), file=sys.stderr, flush=True)
                except OSError:
                    # The unwritten line stays in the buffer; dropping the stream keeps
                    # Python's flush at exit from failing and turning the exit status to 120.
                    sys.stderr = None
            write_env(cfg)
            return 0
        if args.command == "logs":
            return cmd_logs(cfg, args.name, args.lines, args.follow)
        services = select(cfg, args)
        if args.command in ("up", "start"):
            return cmd_up(cfg, services, print_env=args.command == "up")
        if args.command in ("down", "stop"):
            return cmd_down(cfg, services)
        if args.command == "status":
            return cmd_status(cfg, services)
        if args.command == "wipe":
            if args.all and len(services) != len(SERVICE_NAMES):
                raise StackError("wipe --all deletes the whole stack; drop --only/--without")
            return cmd_wipe(cfg, services, args.all)
    except StackError as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`stack status | head`): stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
