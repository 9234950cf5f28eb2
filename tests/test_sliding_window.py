"""Sliding-window (with prefix) and segmented attention: the SDPA path, FlexAttention's CPU forward and a
plain-math reference agree; masks are the ones the Titans paper draws (Fig. 3)."""

from __future__ import annotations

import math

import pytest
import torch

from shared.blocks.attention import build_attention
from shared.blocks.attention.segmented import SegmentedAttention, segmented_attention
from shared.blocks.attention.sliding_window import SlidingWindowAttention, sliding_window_attention

# FlexAttention's eager CPU forward is what the GPU kernel is compared with here; it warns that it is not compiled.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def reference_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(d) + log(allowed)) v, written out; `allowed[i][j]` is a Python-level predicate table."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def window_table(n: int, window: int, prefix: int) -> torch.Tensor:
    return torch.tensor([[j <= i and (j < prefix or i - j < window) for j in range(n)] for i in range(n)])


def segment_table(n_seg: int, seg: int, n_p: int, n_mem: int, aligned: bool) -> torch.Tensor:
    rows = []
    for i in range(n_seg * seg):
        qs, qt = divmod(i, seg)
        row = [True] * n_p
        for s in range(n_seg):
            row += [s == qs and (not aligned or m <= qt) for m in range(n_mem)]
            row += [s == qs and t <= qt for t in range(seg)]
        rows.append(row)
    return torch.tensor(rows)


@pytest.mark.parametrize("window,prefix", [(4, 0), (4, 3), (7, 2), (64, 0)])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_sliding_window_matches_reference(window, prefix, backend):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 37, 8).unbind(0)
    out = sliding_window_attention(q, k, v, window, prefix, backend=backend)
    expected = reference_attention(q, k, v, window_table(37, window, prefix))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aligned,n_mem", [(True, 6), (True, 0), (False, 3)])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_segmented_matches_reference(aligned, n_mem, backend):
    torch.manual_seed(0)
    n_seg, seg, n_p = 3, 6, 2
    n_kv = n_p + n_seg * (n_mem + seg)
    q = torch.randn(1, 2, n_seg * seg, 8)
    k, v = torch.randn(2, 1, 2, n_kv, 8).unbind(0)
    out = segmented_attention(q, k, v, seg, n_p, n_mem, aligned, backend=backend)
    expected = reference_attention(q, k, v, segment_table(n_seg, seg, n_p, n_mem, aligned))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sliding_window_module_and_registry():
    torch.manual_seed(0)
    attn = build_attention("sliding_window", 16, 2, window=5, prefix=2)
    assert isinstance(attn, SlidingWindowAttention)
    x = torch.randn(2, 20, 16)
    y = attn(x)
    # Token 15 sees keys 11..15 and the prefix 0, 1: changing token 5 must not move it; changing token 1 must.
    x5, x1 = x.clone(), x.clone()
    x5[:, 5] += 1
    x1[:, 1] += 1
    assert torch.allclose(attn(x5)[:, 15], y[:, 15]) and not torch.allclose(attn(x1)[:, 15], y[:, 15])
    # A key-padding mask (True = real) with nothing padded gives the same result through the dense path.
    torch.testing.assert_close(attn(x, torch.ones(2, 20, dtype=torch.bool)), y)


def test_segmented_module_memory_is_causal():
    """MAC's aligned memory token h_j is a function of token j: token i < j must not see it."""
    torch.manual_seed(0)
    attn = SegmentedAttention(16, 2, segment_len=8)
    x, mem, p = torch.randn(1, 16, 16), torch.randn(1, 16, 16), torch.randn(3, 16)
    y = attn(x, memory=mem, persistent=p)
    mem2 = mem.clone()
    mem2[:, 4] += 1  # memory token of position 4 (segment 0)
    y2 = attn(x, memory=mem2, persistent=p)
    assert torch.allclose(y[:, :4], y2[:, :4]) and not torch.allclose(y[:, 4], y2[:, 4])
    assert torch.allclose(y[:, 8:], y2[:, 8:])  # another segment
    p2 = p.clone()
    p2[0] += 1
    assert not torch.allclose(attn(x, memory=mem, persistent=p2)[:, 15], y[:, 15])  # persistent: seen by all
