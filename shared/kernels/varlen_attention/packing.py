"""Packing a padded batch into ByteTransformer's padding-free layout, and back.

ByteTransformer (Zhai et al. 2023, "padding-free algorithm") takes the prefix sum of the attention mask
once, gathers the valid tokens of the whole batch into one dense `(total_tokens, d)` tensor before the first
GEMM, runs every position-wise operation on those tokens only, and scatters them back into the padded layout
at the end. `PackInfo` holds that mapping:

- `indices` (capacity,): for each packed row, the row of the flattened `(B * L)` padded batch it came from.
  Rows past the real token count (`capacity > total`, a CUDA-graph bucket) point at row `B * L`, one past the
  end: a spare row that gathers a pad value and that unpacking throws away.
- `cu_seqlens` (B + 1,) int32: prefix sums of the lengths; sequence b is packed rows cu[b]:cu[b + 1].
- `max_seqlen`: an upper bound of the lengths (the longest one, or L when shapes must stay static).

The mapping is built with a cumulative sum and a scatter, no `nonzero`, so for a given capacity every shape is
fixed and the whole model can be captured in one CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PackInfo(NamedTuple):
    indices: Tensor  # (capacity,) int64, rows of the flattened padded batch; B * L marks a spare row
    cu_seqlens: Tensor  # (B + 1,) int32
    max_seqlen: int
    batch: int
    seqlen: int


def pack_info(attention_mask: Tensor, capacity: int | None = None, max_seqlen: int | None = None) -> PackInfo:
    """The packing of a padded batch whose valid tokens are `attention_mask != 0` (B, L).

    Without `capacity` the lengths are read on the host (one synchronisation) and the packed tensor has exactly
    the valid tokens; with `capacity` (>= the number of valid tokens, e.g. a multiple of 128) nothing is read
    back, shapes depend on (B, L, capacity) only, and `max_seqlen` defaults to L.
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (batch, seqlen), got shape {tuple(attention_mask.shape)}")
    batch, seqlen = attention_mask.shape
    valid = attention_mask.reshape(-1) != 0  # (B * L,)
    lengths = valid.view(batch, seqlen).sum(dim=1)  # (B,)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (B + 1,)
    if capacity is None:
        host = lengths.tolist()
        capacity = sum(host)
        max_seqlen = max(host, default=0) if max_seqlen is None else max_seqlen
    elif max_seqlen is None:
        max_seqlen = seqlen
    # Each valid token's packed row is the number of valid tokens before it; invalid ones go to the spare slot.
    destination = torch.where(valid, valid.cumsum(0) - 1, capacity)  # (B * L,)
    indices = torch.full((capacity + 1,), batch * seqlen, dtype=torch.long, device=attention_mask.device)
    source = torch.arange(batch * seqlen, device=attention_mask.device)
    indices.scatter_(0, destination, source)
    return PackInfo(indices[:capacity], cu_seqlens, int(max_seqlen), batch, seqlen)


def pack(x: Tensor, info: PackInfo, pad_value: float | int = 0) -> Tensor:
    """(B, L, ...) padded -> (capacity, ...) packed; spare rows hold `pad_value`."""
    flat = x.reshape(info.batch * info.seqlen, *x.shape[2:])  # (B * L, ...)
    spare = flat.new_full((1, *x.shape[2:]), pad_value)
    return torch.cat([flat, spare]).index_select(0, info.indices)


def unpack(x: Tensor, info: PackInfo) -> Tensor:
    """(capacity, ...) packed -> (B, L, ...) padded, with zeros at the padded positions."""
    out = x.new_zeros(info.batch * info.seqlen + 1, *x.shape[1:])  # the last row takes the spare rows
    out = out.index_copy(0, info.indices, x)
    return out[:-1].view(info.batch, info.seqlen, *x.shape[1:])
