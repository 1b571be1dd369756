"""The ``tiercache`` command line: sizing and bad input (the demo it runs: tests/daemon/test_demo.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import llama3_70b_config
from tiercache.daemon.cli import main
from tiercache.daemon.process import DaemonProcess


@pytest.fixture
def model_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(llama3_70b_config()))
    return path


def test_size_of_llama_3_70b_at_128k_tokens(
    model_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["size", "--model-config", str(model_config), "--tokens", "131072"]) == 0
    out = capsys.readouterr().out
    assert "bytes per token:  327,680" in out
    assert "42,949,672,960 bytes" in out and "42.9 GB" in out


CONFIGS = Path(__file__).parents[1] / "fixtures" / "model_configs"


def test_size_of_gemma_3_27b_prints_each_kv_cache_group_and_the_total(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["size", "--model-config", str(CONFIGS / "gemma-3-27b-it.json"), "--tokens", "8192"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:6] == [
        "model:            62 layers in 2 KV cache groups, bfloat16",
        "group sliding:    52 layers, window 1,024 tokens, 16 KV heads x head dim 128: "
        "425,984 bytes per token, holds 1,024 of 8,192 tokens = 436,207,616 bytes",
        "group full:       10 layers, full attention, 16 KV heads x head dim 128: "
        "81,920 bytes per token, holds 8,192 tokens = 671,088,640 bytes",
        "bytes per token:  507,904 (81,920 once past every window)",
        "block:            16 tokens = 8,126,464 bytes (one block of each group)",
        "total:            1,107,296,256 bytes (1.0 GiB; 1.1 GB) for 8,192 tokens x batch 1",
    ]


def test_size_of_deepseek_v3_counts_the_mla_latent(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["size", "--model-config", str(CONFIGS / "deepseek-v3.json"), "--tokens", "8192"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "group mla:        61 layers, MLA latent of 576 values: 70,272 bytes per token" in out
    assert "total:            575,668,224 bytes" in out


def test_size_reports_what_each_configured_tier_holds(
    model_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "tiercache.toml"
    cfg.write_text('[tiers.host]\nbytes = "32GiB"\n[tiers.disk]\nurl = "none"\n')
    assert (
        main(
            [
                "size",
                "--model-config",
                str(model_config),
                "--tokens",
                "1",
                "--dtype",
                "fp8",
                "--config",
                str(cfg),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "bytes per token:  163,840" in out
    # 32 GiB / (16 tokens x 163,840 B) = 13,107 whole blocks = 209,712 tokens
    assert "host tier:        32.0 GiB holds 209,712 tokens" in out
    assert "disk tier" not in out


def test_size_of_gemma_3_27b_counts_a_host_slot_of_the_largest_block_for_every_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "tiercache.toml"
    cfg.write_text(f'[tiers.host]\nbytes = "1GiB"\n[tiers.disk]\nurl = "{tmp_path / "d"}"\n')
    args = ["size", "--model-config", str(CONFIGS / "gemma-3-27b-it.json"), "--tokens", "1"]
    assert main([*args, "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    # host slots are one sliding block (6,815,744 B): 1 GiB is 157 slots, 64 of them the
    # sliding window's, 93 full blocks of 16 tokens
    assert "host tier:        1.0 GiB holds 1,488 tokens" in out
    # the disk stores each group's blocks at their own size: (64 GiB - 1,024 x 425,984 B)
    # // (16 x 81,920 B) = 52,096 full blocks
    assert "disk tier:        64.0 GiB holds 833,536 tokens" in out


@pytest.mark.parametrize(
    ("fmt", "line"),
    [
        # bf16: 16 x 327,680 B = 5,242,880 B a block; 1 GiB holds 204 of them
        ("exact", "host tier:        1.0 GiB holds 3,264 tokens (exact: 204 blocks of 5,242,880"),
        # int8: 2,621,440 B of data + 4 B x 80 layers x 2 x 8 heads of scales = 2,626,560 B
        ("int8", "host tier:        1.0 GiB holds 6,528 tokens (int8: 408 blocks of 2,626,560"),
        ("fp8_e4m3", "holds 6,528 tokens (fp8_e4m3: 408 blocks of 2,626,560 bytes)"),
    ],
)
def test_size_reports_blocks_per_tier_under_its_storage_format(
    model_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, line: str
) -> None:
    cfg = tmp_path / "tiercache.toml"
    cfg.write_text('[tiers.host]\nbytes = "1GiB"\n[tiers.disk]\nurl = "none"\n')
    args = ["size", "--model-config", str(model_config), "--tokens", "1", "--config", str(cfg)]
    args += ["--store-dtype", fmt]
    assert main(args) == 0
    assert line in capsys.readouterr().out


@pytest.mark.parametrize(
    ("slot_bytes", "line"),
    [
        # 1 GiB // 20 MiB = 51 slots, one 16-token block each, whatever the block's size
        (
            "20MiB",
            "host tier:        1.0 GiB holds 816 tokens (exact: 51 blocks of 5,242,880 bytes "
            "in slots of 20,971,520 bytes)",
        ),
        (
            "4MiB",
            "host tier:        1.0 GiB holds nothing: a block of 5,242,880 bytes is larger than "
            "[tiers.host] slot_bytes (4,194,304); the daemon refuses this model",
        ),
    ],
)
def test_size_counts_a_configured_host_slot_for_every_block_of_a_one_group_model(
    model_config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    slot_bytes: str,
    line: str,
) -> None:
    cfg = tmp_path / "tiercache.toml"
    cfg.write_text(
        f'[tiers.host]\nbytes = "1GiB"\nslot_bytes = "{slot_bytes}"\n'
        f'[tiers.disk]\nurl = "{tmp_path / "d"}"\nbytes = "1GiB"\n'
    )
    args = ["size", "--model-config", str(model_config), "--tokens", "1", "--config", str(cfg)]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    # the disk stores blocks at their own size
    assert out[-2:] == [
        line,
        "disk tier:        1.0 GiB holds 3,264 tokens (exact: 204 blocks of 5,242,880 bytes)",
    ]


def test_size_of_a_grouped_model_whose_blocks_a_configured_host_slot_cannot_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "tiercache.toml"
    cfg.write_text(
        '[tiers.host]\nbytes = "1GiB"\nslot_bytes = "4MiB"\n[tiers.disk]\nurl = "none"\n'
    )
    args = ["size", "--model-config", str(CONFIGS / "gemma-3-27b-it.json"), "--tokens", "1"]
    assert main([*args, "--config", str(cfg)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "host tier:        1.0 GiB holds nothing: a block of 6,815,744 bytes is larger than "
        "[tiers.host] slot_bytes (4,194,304); the daemon refuses this model"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["size", "--model-config", "/nonexistent/config.json", "--tokens", "1"],
            "model config not found",
        ),
        (["size", "--model-config", "MODEL", "--tokens", "0"], "--tokens must be positive"),
        (
            ["size", "--model-config", "MODEL", "--tokens", "1", "--dtype", "fp4"],
            "unsupported KV dtype 'fp4'",
        ),
        (
            ["size", "--model-config", "MODEL", "--tokens", "1", "--config", "BADCFG"],
            "tiers.host.bytes: bad size",
        ),
    ],
)
def test_bad_input_exits_2_naming_what_was_wrong(
    args: list[str],
    message: str,
    model_config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[tiers.host]\nbytes = "lots"\n')
    args = [str(model_config) if a == "MODEL" else str(bad) if a == "BADCFG" else a for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_retention_against_a_store_that_does_not_answer_exits_1_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = tmp_path / "secret"
    secret.write_text("not-a-secret\n")
    cfg = tmp_path / "tiercache.toml"
    cfg.write_text(
        '[tiers.disk]\nurl = "none"\n[tiers.remote]\nurl = "s3://bucket/prefix"\n'
        f'endpoint = "http://127.0.0.1:{port}"\nkey_id = "id"\nsecret_file = "{secret}"\n'
        "max_age = 60\n"
    )
    assert main(["retention", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(
        f"error: retention: remote tier s3://bucket/prefix at http://127.0.0.1:{port} "
        "did not list its blocks: "
    )
    assert not any("Traceback" in line or "Debug source" in line for line in err)
    # the tier's own log of the store it could not reach is one line too
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]


@pytest.mark.parametrize(
    ("flag", "logged", "not_logged"),
    [
        (["--log-level", "debug"], "DEBUG", None),
        (["--log-level", "error"], None, "INFO"),
        ([], "INFO", "DEBUG"),  # no flag: [daemon] log_level, "info" by default
    ],
)
def test_serve_logs_at_the_level_the_command_line_asks_over_the_configs(
    tmp_path: Path, flag: list[str], logged: str | None, not_logged: str | None
) -> None:
    d = DaemonProcess(
        tmp_path,
        {"TIERCACHE_TIERS_HOST__BYTES": "1MiB", "TIERCACHE_TIERS_DISK__URL": str(tmp_path / "d")},
    )
    d.args = [sys.executable, "-m", "tiercache.daemon.cli", *flag, "serve"]
    d.start()
    assert d.stop() == 0
    log = d.log.read_text()
    if logged is not None:
        assert f" {logged} " in log
    if not_logged is not None:
        assert f" {not_logged} " not in log
