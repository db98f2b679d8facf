"""Flower for the tests: the in-process reference of a config, a Grid that delivers messages to
a ClientApp in this process, and real Flower processes on 127.0.0.1 (a SuperLink, SuperNodes and
``flwr run``), each started in its own process group and stopped, with every child it started,
by PID.

Flower detaches some children (the SuperLink starts ``flower-superexec`` in a new session, and
a SuperNode's ``flwr-clientapp`` can outlive a killed parent), so every process started here
carries an environment tag, and teardown kills each tagged PID it finds in /proc.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from tiny import tiny_overrides

from fedpgp.config import RunConfig, load_config
from fedpgp.experiment import build_experiment
from fedpgp.federation.inprocess import run_inprocess
from fedpgp.methods.base import Tensors
from fedpgp.report import build_results

REPO = Path(__file__).resolve().parents[1]
TAG_VAR = "FEDPGP_FLOWER_TEST_TAG"


def flower_config(data_root: Path, **extra: object) -> RunConfig:
    """The tiny FedPGP config of the Flower tests: 2 rounds, evaluated after the last, on CPU
    (every runtime on one device, so that floats can be compared)."""
    values: dict[str, object] = {"rounds": 2, "eval_every": 2, "device": "cpu", **extra}
    return load_config(None, tiny_overrides(data_root, **values))


@dataclass(frozen=True)
class Reference:
    """The in-process run of a config: the config (also as a YAML file), its results.json
    content and its final GLOBAL tensors."""

    cfg: RunConfig
    config_file: Path
    results: dict
    global_tensors: Tensors


@functools.cache
def reference_run(data_root: Path, folder: Path) -> Reference:
    """flower_config(data_root) run in process, once per test session."""
    cfg = flower_config(data_root)
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "flower-tiny.yaml"
    config_file.write_text(cfg.to_yaml())
    rows, zeroshot, server = run_inprocess(build_experiment(cfg))
    results = build_results(cfg.to_dict(), rows, zeroshot)
    return Reference(cfg, config_file, results, server.global_tensors)


def array_names(messages_file: Path, direction: str | None = None) -> list[str]:
    """Every array name in every message of a ServerApp's messages.jsonl (only those
    ``sent`` or ``received`` when ``direction`` says so)."""
    names = []
    for line in messages_file.read_text().splitlines():
        entry = json.loads(line)
        if direction is None or entry["direction"] == direction:
            for record in entry.get("arrays", {}).values():
                names.extend(record)
    return names


Tamper = Callable[[int, Message, Message], Message]


class LoopbackGrid(Grid):
    """A Grid that hands each message to a ClientApp in this process, with one Context per
    node (what a SuperNode keeps between messages), and lets a test alter a node's replies.
    A new LoopbackGrid is a restarted federation: new contexts, the same state dir."""

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        partitions: dict[int, int],
        tamper: Tamper | None = None,
    ) -> None:
        self.client_app = client_app
        self.tamper = tamper
        self.contexts = {
            node: Context(
                run_id=7,
                node_id=node,
                node_config={"partition-id": p, "num-partitions": 2},
                state=RecordDict(),
                run_config={},
            )
            for node, p in partitions.items()
        }

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            # Flower's grids give each message its id when pushing it (metadata has no setter).
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = message.metadata.dst_node_id
            reply = self.client_app(message, self.contexts[node])
            if self.tamper is not None:
                reply = self.tamper(node, message, reply)
            replies.append(reply)
        return replies


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Messages stamp the run and sender from the process's task identity, which a Flower
    runtime sets (run_simulation sets the same three values); restored afterwards."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, seconds: float) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _tagged_pids(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


class Processes:
    """Processes started by one test, all stopped by :meth:`close`."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        self.env = {**env, TAG_VAR: self.tag}
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        """Start ``argv`` in a new process group, output to ``<logs>/<name>.log``."""
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.logs,
            )
        self.started.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL ``proc``'s whole process group (a SuperNode with its SuperExec and
        ClientApp processes) and reap it."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def kill_tagged(self, wanted: Callable[[list[str]], bool]) -> list[int]:
        """SIGKILL every tagged process whose command line ``wanted`` accepts; their PIDs."""
        killed = []
        for pid in _tagged_pids(self.tag):
            if wanted(_cmdline(pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        return killed

    def close(self) -> None:
        """Kill every group started here, then every other process carrying the tag."""
        for proc in self.started:
            if proc.poll() is None:
                self.kill(proc)
        for _ in range(3):
            pids = _tagged_pids(self.tag)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment the Flower daemons need: this venv's bin first on PATH (they start
    ``flower-superexec`` by bare name), no update check, no telemetry, a private FLWR_HOME."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # Flower posts usage telemetry to its servers by default; tests talk to 127.0.0.1 only.
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path) -> Certificates:
    """An EC CA and a server certificate it signs, valid for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpgp test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class Federation:
    """A SuperLink and SuperNodes on 127.0.0.1, and ``flwr run`` of this repository's App."""

    def __init__(self, root: Path, certificates: Certificates | None = None) -> None:
        self.root = root
        self.certificates = certificates
        self.flwr_home = root / "flwr-home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.processes = Processes(root / "logs", flower_env(self.flwr_home))
        self.port = free_port()
        self.nodes: dict[int, subprocess.Popen] = {}
        self.node_ports: dict[int, int] = {}
        self._write_flower_config()

    def _write_flower_config(self) -> None:
        security = (
            "insecure = true"
            if self.certificates is None
            else f'root-certificates = "{self.certificates.ca.resolve()}"'
        )
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "testlink"\n\n[superlink.testlink]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}\n'
        )

    def start_superlink(self, database: Path | None = None, node_auth: bool = False) -> None:
        """The SuperLink; with ``database`` its state lives in that SQLite file (and so
        survives a restart), with ``node_auth`` only registered SuperNodes may connect."""
        argv = [
            "flower-superlink",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if database is not None:
            argv += ["--database", str(database)]
        if node_auth:
            argv.append("--enable-supernode-auth")
        if self.certificates is None:
            argv.append("--insecure")
        else:
            c = self.certificates
            argv += [
                "--ssl-ca-certfile",
                str(c.ca),
                "--ssl-certfile",
                str(c.cert),
                "--ssl-keyfile",
                str(c.key),
            ]
        self.superlink = self.processes.start("superlink", argv)
        wait_for_port(self.port, 60)

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink with the SuperExec it started and every ServerApp process."""
        link = self.superlink.pid
        self.processes.kill(self.superlink)
        self.processes.kill_tagged(
            lambda argv: (
                any("flwr-serverapp" in a for a in argv)
                or ("--parent-pid" in argv and str(link) in argv)
            )
        )

    def kill_serverapp(self) -> list[int]:
        """SIGKILL every ServerApp process (what the SuperLink's SuperExec started)."""
        return self.processes.kill_tagged(lambda argv: any("flwr-serverapp" in a for a in argv))

    def start_supernode(
        self, partition: int, partitions: int, state_dir: Path, auth_key: Path | None = None
    ) -> subprocess.Popen:
        """SuperNode for ``partition``; a restart reuses its runtime port and state dir. With
        ``auth_key`` it authenticates with that private key."""
        port = self.node_ports.setdefault(partition, free_port())
        node_config = (
            f'partition-id={partition} num-partitions={partitions} state-dir="{state_dir}"'
        )
        argv = [
            "flower-supernode",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--node-config",
            node_config,
        ]
        if self.certificates is None:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.certificates.ca)]
        if auth_key is not None:
            argv += ["--auth-supernode-private-key", str(auth_key)]
        self.nodes[partition] = self.processes.start(f"supernode-{partition}", argv)
        return self.nodes[partition]

    def kill_supernode(self, partition: int) -> None:
        self.processes.kill(self.nodes.pop(partition))

    def flwr_run(self, run_config: dict[str, str]) -> subprocess.Popen:
        """``flwr run <repo> testlink --stream`` with ``run_config`` (values are TOML strings)."""
        argv = ["flwr", "run", str(REPO), "testlink", "--stream"]
        for key, value in run_config.items():
            argv += ["--run-config", f"{key}={json.dumps(value)}"]
        return self.processes.start("flwr-run", argv)

    def close(self) -> None:
        self.processes.close()
