"""What every benchmark shares: side-by-side timing in alternating order, the machine's facts,
the JSON and PNG it writes, and the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from tiercache.bench.common import (
    cli,
    in_memory_fs,
    machine,
    side_by_side,
    size_label,
    timed,
    write,
)


def test_side_by_side_alternates_which_goes_first_and_reports_medians() -> None:
    order: list[str] = []
    ours_times = iter([1.0, 2.0, 4.0])
    base_times = iter([2.0, 2.0, 2.0])

    def ours() -> float:
        order.append("ours")
        return next(ours_times)

    def base() -> float:
        order.append("base")
        return next(base_times)

    got = side_by_side(ours, base, reps=3)
    assert order == ["ours", "base", "base", "ours", "ours", "base"]
    assert got == {"ours_s": 2.0, "base_s": 2.0, "ratio": 1.0}  # ratios 2, 1, 0.5


def test_timed_measures_the_call() -> None:
    calls = []
    assert timed(lambda: calls.append(1)) >= 0.0
    assert calls == [1]


def test_machine_names_the_software_and_the_cpus() -> None:
    m = machine()
    assert {"date", "python", "torch", "zarr", "cpus", "cpu", "cuda"} <= set(m)
    assert m["cpus"] >= 1


def test_write_puts_the_result_with_its_name_and_machine_next_to_a_png(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    json_path, png_path = write(tmp_path / "out", "thing", {"rows": [1, 2]}, fig)
    plt.close(fig)
    result = json.loads(json_path.read_text())
    assert result["benchmark"] == "thing" and result["rows"] == [1, 2]
    assert "machine" in result
    assert png_path == tmp_path / "out" / "thing.png"
    assert png_path.read_bytes().startswith(b"\x89PNG")


def test_cli_passes_out_and_quick_to_the_run_and_prints_its_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[Path, bool]] = []

    def run(out: Path, quick: bool) -> dict[str, Any]:
        seen.append((out, quick))
        return {"n": 3}

    assert (
        cli(
            "A benchmark.\n\nMore.",
            run,
            lambda r: f"report n={r['n']}",
            ["--out", str(tmp_path), "--quick"],
        )
        == 0
    )
    assert seen == [(tmp_path, True)]
    assert "report n=3" in capsys.readouterr().out
    cli(None, run, lambda r: "", [])
    assert seen[-1] == (Path("bench-out"), False)


@pytest.mark.parametrize("out", ["results.json", "results.json/sub"])
def test_cli_refuses_an_out_that_is_a_file_before_measuring(
    tmp_path: Path, out: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The file was found only when the results were written, after the whole run.
    (tmp_path / "results.json").write_text("{}")
    ran: list[Path] = []
    with pytest.raises(SystemExit) as e:
        cli(None, lambda o, q: ran.append(o) or {}, lambda r: "", ["--out", str(tmp_path / out)])
    assert e.value.code == 2 and not ran
    assert f"--out: {tmp_path / 'results.json'} is a file, not a directory" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("n", "label"),
    [(512 * 2**10, "512 KiB"), (2**20, "1 MiB"), (64 * 2**20, "64 MiB"), (2**10, "1 KiB")],
)
def test_size_label(n: int, label: str) -> None:
    assert size_label(n) == label


def test_in_memory_fs_names_tmpfs_where_the_page_cache_cannot_be_dropped() -> None:
    # A "cold" read from tmpfs is as warm as any: the cold benchmarks must say so.
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    if not any(m[1] == "/dev/shm" and m[2] == "tmpfs" for m in mounts):
        pytest.skip("/dev/shm is not a tmpfs here")
    assert in_memory_fs(Path("/dev/shm")) == "tmpfs"
    assert in_memory_fs(Path("/dev/shm/a/file/not/there")) == "tmpfs"
    assert in_memory_fs(Path("/proc/self")) is None  # procfs: not a file system of files
