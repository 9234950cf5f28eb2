"""shared/blocks/attention/window.py: window helpers, the Swin index and mask, fused (SDPA) vs math attention."""

from __future__ import annotations

import pytest
import torch

from shared.blocks.attention.window import (
    WindowAttention,
    biased_attention,
    relative_position_index,
    set_fused_attn,
    shifted_window_mask,
    use_fused_attn,
    window_partition,
    window_reverse,
)


def test_partition_reverse_roundtrip_and_order():
    x = torch.arange(2 * 8 * 12 * 3, dtype=torch.float32).view(2, 8, 12, 3)
    windows = window_partition(x, (4, 6))
    assert windows.shape == (2 * 2 * 2, 4, 6, 3)
    # window 1 of image 0 is the top-right block (row-major over windows)
    assert torch.equal(windows[1], x[0, 0:4, 6:12])
    assert torch.equal(windows[4 + 2], x[1, 4:8, 0:6])
    assert torch.equal(window_reverse(windows, (4, 6), 8, 12), x)


def test_relative_position_index_by_hand():
    index = relative_position_index(2)
    # tokens (0,0),(0,1),(1,0),(1,1); offset (dy, dx) -> (dy + 1) * 3 + (dx + 1)
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(index, expected)
    rect = relative_position_index((2, 3))
    assert rect.shape == (6, 6) and rect.max() == (2 * 2 - 1) * (2 * 3 - 1) - 1 and rect.min() == 0
    assert torch.all(rect.diagonal() == (2 - 1) * (2 * 3 - 1) + (3 - 1))


def test_shifted_window_mask_regions():
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window holds one region only
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    # in the bottom-right window, token (0,0) and token (3,3) came from different image corners
    assert mask[3, 0, 15] == -100.0 and mask[3, 0, 1] == 0.0 and mask[3, 0, 2] == -100.0
    # symmetric, zero diagonal
    assert torch.equal(mask, mask.transpose(1, 2)) and torch.all(mask.diagonal(dim1=1, dim2=2) == 0)
    # no shift along one axis: only column regions
    cols_only = shifted_window_mask(8, 8, 4, (0, 2))
    assert torch.all(cols_only[0] == 0) and torch.all(cols_only[2] == 0) and (cols_only[1] != 0).any()


def _reference_window_attention(attn: WindowAttention, x, mask, rpi):
    """Swin's equation written out independently of biased_attention, per window and head."""
    b_, n, c = x.shape
    nh, hd = attn.num_heads, c // attn.num_heads
    qkv = attn.qkv(x).view(b_, n, 3, nh, hd)
    out = torch.empty(b_, n, nh, hd)
    table = attn.relative_position_bias_table
    for w in range(b_):
        for h in range(nh):
            q, k, v = qkv[w, :, 0, h], qkv[w, :, 1, h], qkv[w, :, 2, h]
            logits = q @ k.T * attn.scale + table[rpi, h]
            if mask is not None:
                logits = logits + mask[w % mask.shape[0]]
            out[w, :, h] = logits.softmax(-1) @ v
    return attn.proj(out.reshape(b_, n, c))


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_matches_equation_and_paths_agree(shifted):
    torch.manual_seed(0)
    ws, heads, dim = 4, 2, 8
    attn = WindowAttention(dim, ws, heads, own_index=True)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 8, 8, dim)
    mask = shifted_window_mask(8, 8, ws, ws // 2) if shifted else None
    windows = window_partition(x, ws).view(-1, ws * ws, dim)
    reference = _reference_window_attention(attn, windows, mask, attn.relative_position_index)

    outputs, grads = [], []
    for fused in (True, False):
        set_fused_attn(attn, fused)
        attn.zero_grad()
        w = windows.clone().requires_grad_(True)
        out = attn(w, mask=mask)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([w.grad, attn.relative_position_bias_table.grad.clone(), attn.qkv.weight.grad.clone()])
    torch.testing.assert_close(outputs[1], reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for g_fused, g_math in zip(*grads):
        torch.testing.assert_close(g_fused, g_math, atol=1e-4, rtol=1e-4)


def test_external_index_and_state_dict_keys():
    attn = WindowAttention(8, (2, 3), 2)
    keys = {"relative_position_bias_table", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    assert set(attn.state_dict()) == keys
    assert attn.relative_position_bias_table.shape == (3 * 5, 2)
    with pytest.raises(ValueError, match="rpi"):
        attn(torch.randn(1, 6, 8))
    out = attn(torch.randn(3, 6, 8), rpi=relative_position_index((2, 3)))
    assert out.shape == (3, 6, 8)
    assert "relative_position_index" in WindowAttention(8, 2, 2, own_index=True).state_dict()


def test_biased_attention_cross_shapes():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 7, 4), torch.randn(3, 2, 7, 4)
    bias = torch.randn(2, 5, 7)
    a = biased_attention(q, k, v, bias, 0.5, fused=True)
    b = biased_attention(q, k, v, bias, 0.5, fused=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # 5-d leading dims with a per-group bias take the flattening branch of the fused path
    q5, k5, v5 = (t.view(1, 3, 2, *t.shape[2:]) for t in (q, k, v))
    bias5 = torch.randn(3, 2, 5, 7)
    torch.testing.assert_close(biased_attention(q5, k5, v5, bias5, 0.5, fused=True),
                               biased_attention(q5, k5, v5, bias5, 0.5, fused=False), atol=1e-5, rtol=1e-5)


def test_env_toggle_and_automatic_choice(monkeypatch):
    monkeypatch.setenv("FORMERLAB_FUSED_ATTN", "0")
    assert not use_fused_attn() and not WindowAttention(64, 2, 2).fused_attn
    monkeypatch.setenv("FORMERLAB_FUSED_ATTN", "1")
    assert use_fused_attn() and WindowAttention(60, 2, 2).fused_attn
    monkeypatch.delenv("FORMERLAB_FUSED_ATTN")
    # automatic: fused only where a fused SDPA kernel takes the head size
    assert WindowAttention(64, 2, 2).fused_attn and not WindowAttention(180, 2, 6).fused_attn
