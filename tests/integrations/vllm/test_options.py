"""The vLLM connector's options (``kv_connector_extra_config``) and the model's fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiercache.demo_models import save_tiny
from tiercache.integrations.vllm import ConnectorConfigError, Options, model_fingerprint


def test_options_default_and_valid() -> None:
    assert Options.parse({}) == Options()
    o = Options.parse({"socket": "/s", "salt": "t", "save": "prompt", "min_tokens": 256})
    assert (o.socket, o.salt, o.save, o.min_tokens) == ("/s", "t", "prompt", 256)
    assert Options().async_load == "auto"
    assert Options.parse({"async_load": "never"}).async_load == "never"
    assert Options().attach == "auto"
    assert Options.parse({"attach": "never"}).attach == "never"


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"sockett": "/s"}, "sockett"),
        ({"save": "everything"}, "save"),
        ({"min_tokens": 0}, "min_tokens"),
        ({"block_tokens": True}, "block_tokens"),
        ({"salt": 7}, "salt"),
        ({"retry_seconds": -1}, "retry_seconds"),
        # JSON's true, NaN and Infinity (json.loads reads --kv-transfer-config)
        ({"retry_seconds": True}, "retry_seconds"),
        ({"retry_seconds": float("nan")}, "retry_seconds"),
        ({"retry_seconds": float("inf")}, "retry_seconds"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"timeout_seconds": True}, "timeout_seconds"),
        ({"timeout_seconds": float("nan")}, "timeout_seconds"),
        ({"timeout_seconds": "30"}, "timeout_seconds"),
        ({"min_tail_tokens": -1}, "min_tail_tokens"),
        ({"min_tail_tokens": True}, "min_tail_tokens"),
        ({"async_load": "sometimes"}, "async_load"),
        ({"attach": "always"}, "attach"),
    ],
)
def test_bad_options_name_the_key(extra: dict[str, object], names: str) -> None:
    with pytest.raises(ConnectorConfigError, match=names):
        Options.parse(extra)


def test_the_fingerprint_follows_the_weights(tmp_path: Path) -> None:
    a = save_tiny(tmp_path / "a", seed=0, num_hidden_layers=1)
    b = save_tiny(tmp_path / "b", seed=1, num_hidden_layers=1)
    assert model_fingerprint(str(a)) == model_fingerprint(str(a))
    assert model_fingerprint(str(a)) != model_fingerprint(str(b))
    assert model_fingerprint(str(a)).startswith("a@")


def test_the_fingerprint_is_remembered_until_a_weight_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "m", seed=0, num_hidden_layers=1)
    first = model_fingerprint(str(model))
    (memo,) = (tmp_path / "cache" / "tiercache" / "fingerprints").iterdir()
    # The remembered value is what a second start gets (here made recognisable).
    memo.write_text(memo.read_text().replace(first, "m@remembered"))
    assert model_fingerprint(str(model)) == "m@remembered"
    # A rewritten weight file (new size, mtime, inode) is hashed again.
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.unlink()
    weights.write_bytes(bytes(data))
    second = model_fingerprint(str(model))
    assert second not in (first, "m@remembered")
    # A cache that cannot be written (its directory is a file) only costs the hash.
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir" / "cache"))
    assert model_fingerprint(str(model)) == second


def test_a_hub_id_is_fingerprinted_by_its_revision_and_an_empty_dir_is_refused(
    tmp_path: Path,
) -> None:
    assert model_fingerprint("org/model", "abc123") == "org/model@abc123"
    assert model_fingerprint("org/model") == "org/model@unpinned"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConnectorConfigError, match="model_fingerprint"):
        model_fingerprint(str(tmp_path))


def test_store_dtype_defaults_to_exact_and_takes_the_quantized_formats() -> None:
    assert Options().store_dtype == "exact"
    assert Options.parse({"store_dtype": "int8"}).store_dtype == "int8"
    assert Options.parse({"store_dtype": "fp8_e4m3"}).store_dtype == "fp8_e4m3"


@pytest.mark.parametrize("value", ["int4", "fp8", "", 8, None])
def test_a_bad_store_dtype_names_the_key_and_the_formats(value: object) -> None:
    want = r"kv_connector_extra_config\.store_dtype must be one of exact, int8, fp8_e4m3"
    with pytest.raises(ConnectorConfigError, match=want):
        Options.parse({"store_dtype": value})
