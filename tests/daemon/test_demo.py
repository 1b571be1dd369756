"""``tiercache demo`` (the README's main job): a chat resumed from a real daemon, each turn the
same reply as recomputing it, and the turn after the restart resumed from disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiercache.daemon.cli import main


@pytest.mark.slow
def test_demo_resumes_every_turn_with_the_same_reply_and_one_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIERCACHE_TIERS_DISK__URL", str(tmp_path / "disk"))
    monkeypatch.setenv("TIERCACHE_TIERS_HOST__BYTES", "64MiB")
    assert main(["demo", "--turns", "3", "--context-tokens", "256", "--reply-tokens", "8"]) == 0
    rows = [
        line.split() for line in capsys.readouterr().out.splitlines() if line[:4].strip().isdigit()
    ]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert [r[3] for r in rows] == ["-", "host", "disk"]  # turn 3 follows the restart
    assert all(r[-1] == "yes" for r in rows)
    assert all(int(r[2]) > 0 for r in rows[1:])
