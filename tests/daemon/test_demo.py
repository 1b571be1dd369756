"""``tiercache demo`` (the README's main job): a chat resumed from a real daemon, each turn the
same reply as recomputing it, and the turn after the restart resumed from disk."""

from __future__ import annotations

import fcntl
import warnings
from pathlib import Path

import pytest

from tiercache.daemon.cli import main


@pytest.mark.slow
def test_demo_resumes_every_turn_with_the_same_reply_and_one_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIERCACHE_TIERS_DISK__URL", str(tmp_path / "disk"))
    monkeypatch.setenv("TIERCACHE_TIERS_HOST__BYTES", "64MiB")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["demo", "--turns", "3", "--context-tokens", "256", "--reply-tokens", "8"]) == 0
    # transformers 5.25 (what `pip install tiercache[hf]` gets) warns, between the table's rows,
    # on every generate(past_key_values=...): the demo passes the cache by its current name.
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    rows = [
        line.split() for line in capsys.readouterr().out.splitlines() if line[:4].strip().isdigit()
    ]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert [r[3] for r in rows] == ["-", "host", "disk"]  # turn 3 follows the restart
    assert all(r[-1] == "yes" for r in rows)
    assert all(int(r[2]) > 0 for r in rows[1:])


@pytest.mark.slow
def test_a_demo_whose_disk_tier_another_daemon_holds_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The README's order: `tiercache serve` running on the default disk tier, then the demo,
    # whose daemon takes the same [tiers.disk] url. The lock is what that daemon holds.
    disk = tmp_path / "disk"
    disk.mkdir()
    monkeypatch.setenv("TIERCACHE_TIERS_DISK__URL", str(disk))
    monkeypatch.setenv("TIERCACHE_TIERS_HOST__BYTES", "64MiB")
    with open(disk / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code = main(["demo", "--turns", "1", "--context-tokens", "64", "--reply-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines()[-1] == (
        f"error: the demo's tiercache daemon did not start: disk tier {disk} is in use by "
        "another process; give each daemon its own [tiers.disk] url"
    )
    assert "Traceback" not in err
