"""The errors the cache reports (tiercache/errors.py): one class per thing that can go wrong, each
a ``CacheError``, and the stable code the socket server gives each (``daemon/server.py``)."""

from __future__ import annotations

import pytest

from tiercache import errors
from tiercache.daemon.server import _classify
from tiercache.errors import (
    BlockShapeError,
    CacheError,
    Draining,
    LeaseError,
    NoRoom,
    SessionPinned,
    UnknownSession,
)
from tiercache.ipc import IpcError
from tiercache.keys import TokenError
from tiercache.spec import SpecError

ERRORS = [BlockShapeError, UnknownSession, SessionPinned, NoRoom, Draining, LeaseError]


def test_the_module_defines_exactly_these_errors() -> None:
    defined = {
        v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, BaseException)
    }
    assert defined == {CacheError, *ERRORS}


@pytest.mark.parametrize("kind", ERRORS)
def test_every_error_is_a_cache_error_and_a_runtime_error(kind: type[CacheError]) -> None:
    assert issubclass(kind, CacheError)
    assert issubclass(kind, RuntimeError)


def test_a_shape_error_is_also_a_value_error() -> None:
    assert issubclass(BlockShapeError, ValueError)


def test_an_unknown_session_is_a_key_error_whose_message_is_not_quoted() -> None:
    err = UnknownSession("unknown session 'chat-1'")
    assert isinstance(err, KeyError)
    assert str(err) == "unknown session 'chat-1'"  # a plain KeyError would show it in quotes
    assert str(KeyError("unknown session 'chat-1'")) == "\"unknown session 'chat-1'\""


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BlockShapeError("out must be uint8"), "bad_shape"),
        (TokenError("token ids must be non-negative"), "bad_tokens"),
        (SpecError("head_dim must be positive"), "bad_spec"),
        (UnknownSession("unknown session 'x'"), "unknown_session"),
        (SessionPinned("session 'x' is pinned; unpin it first"), "session_pinned"),
        (Draining("the cache is draining"), "draining"),
        (NoRoom("host tier is full"), "no_room"),
        (IpcError("not a CUDA tensor"), "ipc_failed"),
        (ValueError("ttl must be positive seconds, got 0"), "bad_request"),
    ],
)
def test_the_server_gives_each_error_its_stable_code_and_message(
    error: Exception, code: str
) -> None:
    assert _classify(error) == (code, str(error))


@pytest.mark.parametrize(
    "error",
    [LeaseError("1 block(s) released more often than leased"), CacheError("closed"), OSError(5)],
)
def test_a_bug_or_an_unexpected_failure_is_internal_and_named_by_its_type(
    error: Exception,
) -> None:
    assert _classify(error) == ("internal", f"{type(error).__name__}: {error}")
