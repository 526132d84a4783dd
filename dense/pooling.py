"""Pool token states ``(batch, seq, dim)`` into one vector per text, honouring the attention mask.

The first and last real tokens are found from the mask itself, so the functions are right whether the batch was
padded on the left or on the right.
"""

from __future__ import annotations

import torch


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the real (mask == 1) token states, computed in float32."""
    m = mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * m).sum(dim=1)
    return summed / m.sum(dim=1).clamp(min=1.0)


def first_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the first real token ([CLS] for BERT-style models)."""
    first = mask.to(torch.long).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first].to(torch.float32)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the last real token (the appended EOS for decoder LLMs)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * mask.to(torch.long)).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(torch.float32)


POOLERS = {"mean": mean_pool, "cls": first_token_pool, "last": last_token_pool}


def pool(kind: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dispatch on the pooling name of ``EncoderConfig.pooling``."""
    try:
        return POOLERS[kind](hidden, mask)
    except KeyError:
        raise ValueError(f"unknown pooling {kind!r}; expected one of {sorted(POOLERS)}") from None
