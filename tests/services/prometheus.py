"""A real Prometheus server for tests: started on a free loopback port, queried over its HTTP API.

The exporter, the rules and the dashboard are only proven when the Prometheus
that operators run scrapes and evaluates them; a text-format check alone
misses label mismatches in joins, wrong metric suffixes and ranges that never
fill. ``running_prometheus`` writes a config (scrape interval 1 s) into a temp
directory, starts the ``prometheus`` binary (skipping the test where it is not
installed), waits until it is ready and stops it afterwards.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


class PromQLError(AssertionError):
    """Prometheus refused a query (bad syntax, bad types); the message has its reason."""


@dataclass(frozen=True, slots=True)
class Series:
    labels: dict[str, str]
    value: float


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        data = urllib.parse.urlencode(params).encode() if params else None
        try:
            with urllib.request.urlopen(self.url + path, data=data, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:
            body = json.load(e)  # 400/422 carry {"status": "error", "error": ...}
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[Series]:
        """An instant query now: every series with its labels and value (NaN included)."""
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] == "scalar":
            return [Series({}, float(data["result"][1]))]
        return [Series(r["metric"], float(r["value"][1])) for r in data["result"]]

    def finite(self, expr: str) -> list[Series]:
        return [s for s in self.query(expr) if math.isfinite(s.value)]

    def wait_for_data(self, expr: str, timeout: float = 30.0) -> list[Series]:
        """Poll until ``expr`` returns a series with a finite value (rate windows fill up)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.finite(expr)
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self._get("/api/v1/targets")["activeTargets"]
        return active

    def rule_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self._get("/api/v1/rules")["groups"]
        return groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _config(targets: Sequence[str], rule_files: Sequence[Path]) -> str:
    # JSON is YAML: no YAML writer needed.
    return json.dumps(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p.resolve()) for p in rule_files],
            "scrape_configs": [
                {"job_name": "tiercache", "static_configs": [{"targets": list(targets)}]}
            ],
        },
        indent=2,
    )


@contextmanager
def running_prometheus(
    tmp: Path, targets: Sequence[str], rule_files: Sequence[Path] = (), ready_timeout: float = 20.0
) -> Iterator[PrometheusServer]:
    """A Prometheus scraping ``targets`` ("host:port") every second, with ``rule_files`` loaded."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "prometheus.yml"
    config.write_text(_config(targets, rule_files))
    for _attempt in range(3):  # the free port can be taken between probe and bind
        port = free_port()
        log = tmp / f"prometheus-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = PrometheusServer(f"http://127.0.0.1:{port}", proc, log)
        try:
            if _wait_ready(server, ready_timeout):
                break
        except BaseException:
            _stop(proc)
            raise
        _stop(proc)
    else:
        raise RuntimeError(f"prometheus did not start; its log:\n{log.read_text()}")
    try:
        yield server
    finally:
        _stop(proc)


def _wait_ready(server: PrometheusServer, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(server.url + "/-/ready", timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``promtool`` (skipping where it is not installed); output is stdout and stderr."""
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return subprocess.run(
        [PROMTOOL, *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
