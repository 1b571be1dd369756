"""``tiercache serve`` as a child process: what the demo, the benchmarks and the fault campaigns
start, stop, kill -9 and restart.

Settings go in as ``TIERCACHE_*`` environment overrides on top of the caller's
environment (and an optional config file), so the child reads them with the
same loader as any daemon. The socket lives in the caller's work directory;
metrics and MQTT are off unless the overrides turn them on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


class DaemonStartError(RuntimeError):
    """The daemon exited, or never opened its socket, before it served. ``reason`` is one line
    saying why (the daemon's own ``error:`` line where it printed one), for a caller that shows
    it to a person: the log itself may live in a directory that is gone by then."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _reason(log_tail: str, code: int | None) -> str:
    """The line of a failed daemon's log that says why it stopped."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")
    return lines[-1] if lines else f"it exited with status {code} and logged nothing"


class DaemonProcess:
    def __init__(
        self, workdir: Path, env: Mapping[str, str] | None = None, config_path: str | None = None
    ) -> None:
        self.socket = workdir / "tiercache.sock"
        self.log = (
            workdir / "daemon.log"
        )  # a file, not a pipe: an unread pipe would block the daemon
        self.env = {
            **os.environ,
            "TIERCACHE_DAEMON__SOCKET": str(self.socket),
            "TIERCACHE_METRICS__LISTEN": "",
            "TIERCACHE_MQTT__HOST": "",
            **(env or {}),
        }
        self.args = [sys.executable, "-m", "tiercache.daemon.cli", "serve"]
        if config_path:
            self.args += ["--config", config_path]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon is not running"
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        """Start the daemon and wait until its socket accepts clients."""
        self.socket.unlink(missing_ok=True)  # what a killed daemon leaves behind
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stderr=log)
        deadline = time.monotonic() + timeout
        # The socket file appears when the daemon binds it, a moment before it listens: a
        # client in that moment is refused. Started means a connection is accepted.
        while not self._accepts():
            if (code := self.proc.poll()) is not None:
                tail = self.log.read_text(errors="replace")[-4000:]
                raise DaemonStartError(
                    f"the tiercache daemon did not start:\n{tail}", _reason(tail, code)
                )
            if time.monotonic() > deadline:
                self.kill()
                why = f"it did not open {self.socket} in {timeout:.0f} s"
                raise DaemonStartError(f"the tiercache daemon did not start: {why}", why)
            time.sleep(0.02)

    def _accepts(self) -> bool:
        if not self.socket.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except (ConnectionRefusedError, FileNotFoundError):
                return False
        return True

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain and flush) and wait; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> DaemonProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
