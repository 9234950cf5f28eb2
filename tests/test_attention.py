"""The attention registry and its variants: shapes, key-padding masks, gradients, and each variant's equation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.blocks.attention import ATTENTION, available_attention, build_attention, register_attention
from shared.blocks.attention.softmax import masked_sdpa
from shared.lit.errors import ConfigError

VARIANTS = {
    "softmax": {},
    "local": {"block_size": 4},
    "linformer": {"k": 5},
    "linear": {},
    "performer": {"nb_features": 32},
    "performer-relu": {"kernel": "relu"},
}
DIM, HEADS, N = 16, 2, 11


def build(variant: str, **kwargs):
    torch.manual_seed(0)
    name = variant.split("-")[0]
    return build_attention(name, DIM, HEADS, max_len=16, **{**VARIANTS[variant], **kwargs})


def heads(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    b, n, _ = x.shape
    return layer(x).view(b, n, HEADS, -1).transpose(1, 2)  # (B, nh, N, hd)


def merge(y: torch.Tensor) -> torch.Tensor:
    return y.transpose(1, 2).flatten(2)  # (B, N, qkv)


def reference_softmax(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


def test_registry_lists_and_builds_every_variant():
    assert {"softmax", "local", "linformer", "linear", "performer"} <= set(available_attention())
    for variant in VARIANTS:
        assert build(variant)(torch.randn(2, N, DIM)).shape == (2, N, DIM)


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(ConfigError, match="not one of"):
        build_attention("no_such_attention", DIM, HEADS)
    with pytest.raises(ConfigError, match="block_size"):
        build_attention("softmax", DIM, HEADS, block_size=3)


def test_registry_forwards_max_len_only_to_variants_that_take_it():
    # softmax has no max_len parameter; the model passes it anyway and it is dropped, Linformer sizes by it.
    build_attention("softmax", DIM, HEADS, max_len=7)
    assert build_attention("linformer", DIM, HEADS, max_len=7, k=3).lr_kernel.shape == (7, 3)


def test_register_a_new_variant():
    @register_attention("identity_for_test")
    def identity(dim: int, num_heads: int) -> torch.nn.Module:
        class Identity(torch.nn.Module):
            def forward(self, x, mask=None):
                return x
        return Identity()

    try:
        x = torch.randn(1, 3, DIM)
        assert torch.equal(build_attention("identity_for_test", DIM, HEADS)(x), x)
    finally:
        ATTENTION.pop("identity_for_test")


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_never_changes_real_outputs(variant):
    attn = build(variant).eval()
    x = torch.randn(2, N, DIM)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, 6:] = False
    x2 = x.clone()
    x2[1, 6:] = 10 * torch.randn(N - 6, DIM)  # different padding content
    y, y2 = attn(x, mask), attn(x2, mask)
    assert torch.isfinite(y).all() and torch.isfinite(y2).all()
    torch.testing.assert_close(y[1, :6], y2[1, :6], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[0], y2[0])
    # and a padded sequence gives what the same sequence gives alone
    torch.testing.assert_close(attn(x[1:, :6])[0], y[1, :6], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    attn = build(variant).train()
    x = torch.randn(2, N, DIM, requires_grad=True)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 8:] = False
    attn(x, mask).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_softmax_is_the_attention_equation():
    attn = build("softmax").eval()
    x = torch.randn(2, N, DIM)
    mask = torch.rand(2, N) > 0.3
    mask[:, 0] = True
    expected = attn.out(merge(reference_softmax(heads(x, attn.query), heads(x, attn.key), heads(x, attn.value), mask)))
    torch.testing.assert_close(attn(x, mask)[mask], expected[mask], rtol=1e-5, atol=1e-6)


def test_sdpa_pads_small_heads_without_changing_the_result():
    from shared.blocks.attention.softmax import sdpa

    q, k, v = (torch.randn(2, 3, 7, 4) for _ in range(3))
    mask = torch.rand(2, 1, 1, 7) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(sdpa(q, k, v, mask, align=8), reference_softmax(q, k, v, mask[:, 0, 0]))


def record_sdpa_calls(monkeypatch) -> list[tuple[bool, bool]]:
    """(masked, cuDNN backend enabled) for every F.scaled_dot_product_attention call from now on."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is not None, torch.backends.cuda.cudnn_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("variant", ["softmax", "local"])
def test_masked_attention_never_runs_on_cudnn(variant, monkeypatch):
    # cuDNN's masked SDPA backward returns NaN gradients (pytorch/pytorch#196678, see MASKED_BACKENDS): every call
    # with a padding mask runs with that backend switched off, and only for the duration of the call.
    assert torch.backends.cuda.cudnn_sdp_enabled()
    calls = record_sdpa_calls(monkeypatch)
    attn = build(variant).train()
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, 6:] = False
    attn(torch.randn(2, N, DIM), mask).sum().backward()
    assert calls and all(masked and not cudnn for masked, cudnn in calls)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_masked_attention_keeps_cudnn_on_whole_key_tiles(monkeypatch):
    # With a key length that is a multiple of the tile there is no padded key tile, the NaN cannot occur, and
    # cuDNN (2.6x faster on Pathfinder's masked attention) stays available; one key more and it is switched off.
    calls = record_sdpa_calls(monkeypatch)
    q, k, v = (torch.randn(1, 2, 128, 8) for _ in range(3))
    mask = torch.ones(1, 1, 1, 128, dtype=torch.bool)
    masked_sdpa(q, k, v, mask)
    masked_sdpa(q, F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1)), F.pad(mask, (0, 1), value=True))
    assert calls == [(True, True), (True, False)]


def test_unmasked_softmax_attention_keeps_the_default_backends(monkeypatch):
    calls = record_sdpa_calls(monkeypatch)
    build("softmax")(torch.randn(2, N, DIM))
    assert calls == [(False, True)]


def test_local_attention_stays_inside_blocks():
    attn = build("local", block_size=4).eval()
    x = torch.randn(1, N, DIM)
    y = attn(x)
    # each block of 4 is softmax attention on its own
    for start in range(0, N, 4):
        torch.testing.assert_close(attn(x[:, start:start + 4]), y[:, start:start + 4], rtol=1e-5, atol=1e-6)
    # a block as long as the sequence is full softmax attention
    full = build("softmax").eval()
    wide = build("local", block_size=64).eval()
    wide.load_state_dict(full.state_dict())
    torch.testing.assert_close(wide(x), full(x), rtol=1e-5, atol=1e-6)


def test_linformer_with_an_identity_projection_is_softmax_attention():
    attn = build_attention("linformer", DIM, HEADS, max_len=N, k=N).eval()
    with torch.no_grad():
        attn.lr_kernel.copy_(torch.eye(N))
    full = build_attention("softmax", DIM, HEADS).eval()
    full.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "lr_kernel"})
    x = torch.randn(2, N, DIM)
    torch.testing.assert_close(attn(x), full(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        attn(torch.randn(1, N + 1, DIM))


def test_linear_attention_is_the_kernelised_equation():
    attn = build("linear").eval()
    x = torch.randn(2, N, DIM)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, 7:] = False
    phi_q = F.elu(heads(x, attn.query)) + 1
    phi_k = (F.elu(heads(x, attn.key)) + 1) * mask[:, None, :, None]
    weights = phi_q @ phi_k.transpose(-2, -1)  # (B, nh, N, N), written out in O(N^2)
    y = (weights @ heads(x, attn.value)) / (weights.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(attn(x, mask), attn.out(merge(y)), rtol=1e-4, atol=1e-5)


def test_performer_approximates_softmax_attention():
    # FAVOR+ is an unbiased estimator of the softmax kernel: many features get close to exact attention.
    torch.manual_seed(0)
    exact = build_attention("softmax", 32, 1).eval()
    errors = []
    for features in (16, 4096):
        approx = build_attention("performer", 32, 1, nb_features=features).eval()
        approx.load_state_dict({**exact.state_dict(), "projection_matrix": approx.projection_matrix,
                                "calls": approx.calls})
        x = 0.3 * torch.randn(4, 64, 32)
        errors.append((approx(x) - exact(x)).abs().mean() / exact(x).abs().mean())
    assert errors[1] < 0.1 and errors[1] < errors[0] / 2


def test_performer_orthogonal_features_and_redraw_policy():
    attn = build_attention("performer", 16, 2, nb_features=20, redraw_interval=2)
    w = attn.projection_matrix  # (20, 8): two blocks of orthogonal rows
    block = w[:8] / w[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8), rtol=1e-5, atol=1e-5)
    assert {"projection_matrix", "calls"} <= set(attn.state_dict())
    x = torch.randn(1, 5, 16)
    first = attn.projection_matrix.clone()
    attn.train()
    attn(x)
    attn(x)
    assert torch.equal(attn.projection_matrix, first)  # drawn at construction, used for the first interval
    attn(x)
    assert not torch.equal(attn.projection_matrix, first)  # redrawn at the third call
    redrawn = attn.projection_matrix.clone()
    attn.eval()
    for _ in range(3):
        attn(x)
    assert torch.equal(attn.projection_matrix, redrawn) and int(attn.calls) == 3  # evaluation never redraws


def test_performer_resumed_from_a_state_dict_redraws_on_schedule():
    trained = build_attention("performer", 16, 2, nb_features=20, redraw_interval=2).train()
    x = torch.randn(1, 5, 16)
    trained(x)
    trained(x)
    resumed = build_attention("performer", 16, 2, nb_features=20, redraw_interval=2).train()
    resumed(x)  # a call before loading must not leave a stale count behind
    resumed.load_state_dict(trained.state_dict())
    matrix = resumed.projection_matrix.clone()
    resumed(x)  # the third call of the run: redrawn
    assert not torch.equal(resumed.projection_matrix, matrix) and int(resumed.calls) == 3
    matrix = resumed.projection_matrix.clone()
    resumed(x)  # the fourth: kept
    assert torch.equal(resumed.projection_matrix, matrix) and int(resumed.calls) == 4


def _window_attention_with_shift_mask():
    from shared.blocks.attention.window import WindowAttention, set_fused_attn, shifted_window_mask

    attn = WindowAttention(16, 4, 2, own_index=True)
    set_fused_attn(attn, True)
    mask = shifted_window_mask(8, 8, 4, 2)  # (nW, 16, 16)
    return attn(torch.randn(mask.shape[0], 16, 16), mask=mask)


def _sliding_window_sdpa():
    from shared.blocks.attention.sliding_window import sliding_window_attention

    q, k, v = (torch.randn(1, 2, 12, 8, requires_grad=True) for _ in range(3))
    return sliding_window_attention(q, k, v, window=4, prefix=2, backend="sdpa")


def _segmented_sdpa():
    from shared.blocks.attention.segmented import segmented_attention

    q = torch.randn(1, 2, 8, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 2 + 2 * (4 + 4), 8, requires_grad=True) for _ in range(2))
    return segmented_attention(q, k, v, segment_len=4, num_persistent=2, num_memory=4, backend="sdpa")


@pytest.mark.parametrize("masked_call", [_window_attention_with_shift_mask, _sliding_window_sdpa, _segmented_sdpa])
def test_every_masked_sdpa_call_of_the_shared_blocks_avoids_cudnn(masked_call, monkeypatch):
    calls = record_sdpa_calls(monkeypatch)
    masked_call().sum().backward()
    assert calls and all(masked and not cudnn for masked, cudnn in calls)
