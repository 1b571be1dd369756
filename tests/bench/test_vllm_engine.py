"""The engine process the vLLM tests and benchmark start (``tiercache.bench.vllm_engine``),
without running an engine: its command line, an engine that fails (its exit status and its
log's tail come back), and one that runs past its time (killed, not left behind). (Engines
that run: tests/integrations/vllm/test_connector.py and tests/bench/test_vllm_resume.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiercache.bench.vllm_engine import launch, main


def running_with(arg: str) -> list[int]:
    """The processes whose command line has ``arg``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if arg.encode() in cmdline:
                pids.append(int(proc.name))
    return pids


def test_its_command_line_takes_a_job_and_an_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["job.json"]) == 2
    assert (
        "usage: python -m tiercache.bench.vllm_engine JOB.json OUT.json" in capsys.readouterr().err
    )


def test_an_engine_that_runs_past_its_time_is_killed(tmp_path: Path) -> None:
    job = {"model": str(tmp_path / "model"), "prompts": [{"tokens": [1, 2, 3]}]}
    with pytest.raises(TimeoutError, match="vLLM engine 'late' ran past 0 s"):
        launch(job, tmp_path / "engines", "late", timeout=0.2)
    assert (tmp_path / "engines" / "late.job.json").is_file()
    assert not running_with(str(tmp_path / "engines" / "late.job.json"))


@pytest.mark.slow  # the engine process imports vLLM before it fails
def test_an_engine_that_fails_says_which_with_its_exit_status_and_log(tmp_path: Path) -> None:
    job = {"model": str(tmp_path / "no-such-model"), "prompts": [{"tokens": [1, 2, 3]}]}
    with pytest.raises(RuntimeError) as e:
        launch(job, tmp_path / "engines", "broken", timeout=300)
    message = str(e.value)
    assert message.startswith("vLLM engine 'broken' failed (exit 1):")
    assert "no-such-model" in message  # the log's tail: why it failed
    log = (tmp_path / "engines" / "broken.log").read_text()
    assert message.endswith(log[-6000:])
    assert not (tmp_path / "engines" / "broken.out.json").exists()
