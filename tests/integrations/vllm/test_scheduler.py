"""The vLLM connector's scheduler side (``tiercache.integrations.vllm.scheduler``)."""

from __future__ import annotations

import pytest

from tiercache.integrations.vllm.scheduler import _session


class _Request:
    def __init__(self, params: dict[str, object] | None) -> None:
        self.request_id = "r1"
        self.kv_transfer_params = params


def test_a_request_names_its_session_and_a_bad_name_is_ignored_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert _session(_Request({"session_id": "chat-42"})) == "chat-42"  # type: ignore[arg-type]
    assert _session(_Request(None)) is None  # type: ignore[arg-type]
    assert _session(_Request({"session_id": 7})) is None  # type: ignore[arg-type]
    assert _session(_Request({"session_id": ""})) is None  # type: ignore[arg-type]
    assert caplog.text.count("kv_transfer_params.session_id must be a non-empty string") == 2
