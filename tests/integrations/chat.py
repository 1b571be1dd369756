"""A chat with a real transformers model, for the transformers integration tests: greedy
replies with the log-probs of their tokens, on a given cache or recomputed from scratch."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

REPLY = 12


def generate(
    model: Any, ids: torch.Tensor, past: Any, reply: int = REPLY
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy reply and the log-probs of each chosen token."""
    with torch.no_grad():
        out = model.generate(
            ids[None],
            past_key_values=past,
            max_new_tokens=reply,
            min_new_tokens=reply,  # scores and tokens line up even past an end-of-text token
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    seq = out.sequences[0]
    logp = torch.stack(
        [
            torch.log_softmax(s[0].float(), -1)[t]
            for s, t in zip(out.scores, seq[-reply:], strict=True)
        ]
    )
    return seq, logp


def recompute(
    model: Any, ids: torch.Tensor, reply: int = REPLY
) -> tuple[torch.Tensor, torch.Tensor]:
    return generate(model, ids, DynamicCache(config=model.config), reply)


def user_message(turn: int, n: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + turn)
    return torch.randint(1, vocab, (n,), generator=g)
