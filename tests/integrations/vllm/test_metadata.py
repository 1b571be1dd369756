"""What the vLLM connector's scheduler side sends its worker side each step
(``tiercache.integrations.vllm.metadata``): vLLM hands it to the worker processes pickled, with
the scheduler's output, so it must arrive whole; a transfer is a foreground one of group 0
unless it says otherwise."""

from __future__ import annotations

import pickle

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from tests.conftest import make_ns, make_tokens
from tiercache.integrations.vllm.metadata import TierCacheMetadata, Transfer
from tiercache.keys import KeyChain

NS = make_ns("vllm-metadata")


def test_a_steps_metadata_reaches_the_worker_process_whole() -> None:
    chain = KeyChain(NS.block_keys(make_tokens(3)))
    meta = TierCacheMetadata(
        loads=[Transfer("r1", chain.to_bytes(), 1, 2, [7, 2], "chat", skip=1, background=True)],
        saves=[Transfer("r2", chain.to_bytes(), 0, 3, [4, 5, 6], finish=True, group=2)],
    )
    assert isinstance(meta, KVConnectorMetadata)
    got = pickle.loads(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL))
    assert got == meta
    assert KeyChain.from_bytes(got.loads[0].keys) == chain
    assert (got.loads[0].session, got.loads[0].skip, got.loads[0].background) == ("chat", 1, True)
    assert (got.saves[0].finish, got.saves[0].group) == (True, 2)


def test_a_transfer_is_a_foreground_one_of_group_zero_unless_it_says_otherwise() -> None:
    t = Transfer("r1", b"", 0, 1, [3])
    assert (t.session, t.skip, t.background, t.finish, t.group) == (None, 0, False, False, 0)


def test_each_steps_metadata_starts_empty_and_shares_no_list_with_another() -> None:
    a, b = TierCacheMetadata(), TierCacheMetadata()
    a.loads.append(Transfer("r1", b"", 0, 1, [3]))
    a.saves.append(Transfer("r1", b"", 0, 1, [3]))
    assert (b.loads, b.saves) == ([], [])
