"""A real Mosquitto for tests: started from the shipped ops config, killed and restarted on demand.

The broker runs ``ops/mosquitto/mosquitto.conf`` with only its paths and port
rewritten, and the ``ops/mosquitto/acl`` file as it is, so the tests prove the
files operators install. Its users are made with ``mosquitto_passwd -b``; a
TLS listener uses a CA and server certificate made with ``openssl`` in the
tmp dir. ``TcpProxy`` sits between a client and the broker so a test can cut
one connection (a network failure, the Last Will's trigger) while the broker
and every other client stay up.

Rejected: an in-process fake broker (it would prove nothing about Mosquitto's
ACL, Last Will, retained or v5 property handling, which is what breaks in
production).
"""

from __future__ import annotations

import asyncio
import getpass
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tiercache.daemon.config import MqttConfig

OPS = Path(__file__).resolve().parents[2] / "ops" / "mosquitto"
# user -> password; `tiercache` is the daemon, `operator` commands, `guest` is in no ACL rule.
USERS = {"tiercache": "daemon-secret", "operator": "operator-secret", "guest": "guest-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(*cmd: str | Path, cwd: Path) -> None:
    subprocess.run([str(c) for c in cmd], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d: Path, name: str) -> Path:
    """A self-signed CA (``<name>.crt``, ``<name>.key``) in ``d``."""
    _run(
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    return d / f"{name}.crt"


def make_server_cert(d: Path, ca: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost signed by CA ``ca``: (cert, key)."""
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _run(
        "openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
        cwd=d,
    )  # fmt: skip
    _run(
        "openssl", "x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
        cwd=d,
    )  # fmt: skip
    return d / "server.crt", d / "server.key"


class Mosquitto:
    """One broker process on free loopback ports (plain, and TLS when ``tls``)."""

    def __init__(self, d: Path, *, tls: bool = False) -> None:
        self.dir = d
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.ca = make_ca(d, "ca") if tls else None
        self.proc: subprocess.Popen[bytes] | None = None
        passwd = d / "passwd"
        for i, (user, password) in enumerate(USERS.items()):
            _run(
                "mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", passwd, user, password, cwd=d
            )
            (d / f"{user}.password").write_text(password + "\n")
        conf = (OPS / "mosquitto.conf").read_text()
        for key, value in (
            ("password_file", str(passwd)),
            ("acl_file", str(OPS / "acl")),
            ("listener", f"{self.port} 127.0.0.1"),
        ):
            conf, n = re.subn(rf"^{key} .*$", f"{key} {value}", conf, count=1, flags=re.M)
            assert n == 1, f"ops/mosquitto/mosquitto.conf has no `{key}` line"
        # As root, Mosquitto would switch to user `mosquitto`, who cannot read the tmp dir.
        conf += f"\nuser {getpass.getuser()}\nlog_dest file {d / 'mosquitto.log'}\nlog_type all\n"
        if tls:
            cert, cert_key = make_server_cert(d, "ca")
            conf += (
                f"\nlistener {self.tls_port} 127.0.0.1\n"
                f"cafile {self.ca}\ncertfile {cert}\nkeyfile {cert_key}\n"
            )
        self.conf = d / "mosquitto.conf"
        self.conf.write_text(conf)

    def start(self) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "stderr").open("ab"),
        )
        deadline = time.monotonic() + 10
        for port in (self.port, self.tls_port):
            while port is not None:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"mosquitto exited with {self.proc.returncode}: {self.log()}"
                    )
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"mosquitto not listening on {port}: {self.log()}"
                        ) from None
                    time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a word to its clients (and forgets retained state)."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def restart(self) -> None:
        self.kill()
        self.start()

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
            self.proc = None

    def log(self) -> str:
        files = (self.dir / "mosquitto.log", self.dir / "stderr")
        return "\n".join(f.read_text(errors="replace")[-3000:] for f in files if f.exists())

    def config(self, user: str | None = "tiercache", *, node: str, port: int | None = None,
               tls_ca: Path | None = None) -> MqttConfig:  # fmt: skip
        """A client's [mqtt] settings; ``user=None`` logs in anonymously."""
        return MqttConfig(
            host="127.0.0.1",
            port=port if port is not None else self.port,
            prefix="tiercache",
            node=node,
            username=user or "",
            password_file=str(self.dir / f"{user}.password") if user else "",
            tls_ca=str(tls_ca) if tls_ca else "",
        )


def running_broker(d: Path, *, tls: bool = False) -> Iterator[Mosquitto]:
    """Start a broker in ``d``, yield it, stop it (the body of the fixtures below)."""
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)")
    if tls and shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    broker = Mosquitto(d, tls=tls)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# Named apart from their fixture names, so a test module imports them without its
# parameters shadowing the import (or move them to a conftest.py).
@pytest.fixture(scope="session", name="mosquitto")
def mosquitto_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker (plain and TLS listeners) for every test that does not kill it."""
    yield from running_broker(tmp_path_factory.mktemp("mosquitto"), tls=True)


@pytest.fixture(name="own_mosquitto")
def own_mosquitto_fixture(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of this test's own, free to be killed and restarted."""
    d = tmp_path / "mosquitto"
    d.mkdir()
    yield from running_broker(d)


class TcpProxy:
    """Forwards loopback TCP connections to ``target``; ``cut()`` drops them all and refuses new ones.

    To the broker a cut looks like a client whose network died: the socket
    closes without an MQTT DISCONNECT, so the broker publishes the Will.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        # Both transports of every proxied connection, to abort them on cut().
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._open):
            writer.transport.abort()  # RST, not a polite FIN after pending data
        self._open.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            self._open.discard(writer)
            writer.transport.abort()


def mqtt_env(cfg: MqttConfig) -> dict[str, str]:
    """The ``TIERCACHE_MQTT__*`` overrides that point a daemon process at ``cfg``'s broker."""
    return {
        "TIERCACHE_MQTT__HOST": cfg.host,
        "TIERCACHE_MQTT__PORT": str(cfg.port),
        "TIERCACHE_MQTT__NODE": cfg.node,
        "TIERCACHE_MQTT__USERNAME": cfg.username,
        "TIERCACHE_MQTT__PASSWORD_FILE": cfg.password_file,
    }
