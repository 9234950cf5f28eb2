"""HAT architecture: official fingerprints and key layout, strict loading, attention paths, any-size inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from projects.hat import model as M
from projects.hat.inference import pad_to_multiple, self_ensemble, super_resolve, tiled_forward
from shared.blocks.attention.window import set_fused_attn
from shared.lit.errors import CheckpointError, ConfigError

# Parameter counts measured by running the official hat_arch.py (research notes; README: 9.6 M / 20.8 M / 40.8 M).
OFFICIAL_PARAMS = {
    "hat_s_x2": 9_473_471, "hat_s_x3": 9_658_111, "hat_s_x4": 9_621_183,
    "hat_x2": 20_624_795, "hat_x3": 20_809_435, "hat_x4": 20_772_507,
    "hat_l_x2": 40_698_863, "hat_l_x3": 40_883_503, "hat_l_x4": 40_846_575,
}


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_fingerprint(name):
    with torch.device("meta"):
        model = M.CONFIGS[name]()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def official_keys(n_groups: int, depth: int, upscale: int) -> set[str]:
    """The official state_dict layout of a pixel-shuffle HAT, written out from hat_arch.py's module names."""
    wb = ("weight", "bias")
    keys = {"relative_position_index_SA", "relative_position_index_OCA"}
    keys |= {f"{m}.{p}" for m in ("conv_first", "patch_embed.norm", "norm", "conv_after_body",
                                  "conv_before_upsample.0", "conv_last") for p in wb}
    n_up = {2: 1, 3: 1, 4: 2}[upscale]
    keys |= {f"upsample.{2 * i}.{p}" for i in range(n_up) for p in wb}
    for g in range(n_groups):
        group = f"layers.{g}"
        keys |= {f"{group}.conv.{p}" for p in wb}
        for b in range(depth):
            block = f"{group}.residual_group.blocks.{b}"
            keys.add(f"{block}.attn.relative_position_bias_table")
            keys |= {f"{block}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "conv_block.cab.0",
                                                   "conv_block.cab.2", "conv_block.cab.3.attention.1",
                                                   "conv_block.cab.3.attention.3", "norm2", "mlp.fc1", "mlp.fc2")
                     for p in wb}
        oca = f"{group}.residual_group.overlap_attn"
        keys.add(f"{oca}.relative_position_bias_table")
        keys |= {f"{oca}.{m}.{p}" for m in ("norm1", "qkv", "proj", "norm2", "mlp.fc1", "mlp.fc2") for p in wb}
    return keys


@pytest.mark.parametrize("name,groups,upscale", [("hat_x4", 6, 4), ("hat_s_x3", 6, 3), ("hat_l_x2", 12, 2)])
def test_official_key_layout(name, groups, upscale):
    with torch.device("meta"):
        state = M.CONFIGS[name]().state_dict()
    assert set(state) == official_keys(groups, 6, upscale)
    if name == "hat_x4":
        assert len(state) == 864
    assert state["relative_position_index_SA"].shape == (256, 256)
    assert state["relative_position_index_OCA"].shape == (256, 576)
    assert state["layers.0.residual_group.overlap_attn.relative_position_bias_table"].shape == (39 * 39, 6)
    assert state["layers.0.residual_group.blocks.1.attn.relative_position_bias_table"].shape == (31 * 31, 6)


def test_oca_index_matches_official_formula_and_is_one_entry_per_offset():
    ws, ows = 16, 24
    index = M.oca_relative_position_index(ws, 0.5)
    # by hand from the official formula: query (0,0), key (0,0) -> (0 - 0 + 16 - 24 + 1) * 39 + (same) = -280
    assert index[0, 0] == -280 and index[ws * ws - 1, ows * ows - 1] == (23 - 15 - 7) * 39 + (23 - 15 - 7)
    table = (ws + ows - 1) ** 2
    q = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    k = torch.stack(torch.meshgrid(torch.arange(ows), torch.arange(ows), indexing="ij")).flatten(1)
    offset = (k[:, None, :] - q[:, :, None]).permute(1, 2, 0).reshape(-1, 2)  # true (dy, dx), up to a constant
    entry = (index.reshape(-1) % table).tolist()  # what Python indexing addresses
    seen: dict[int, tuple[int, int]] = {}
    for (dy, dx), e in zip(offset.tolist(), entry):
        assert seen.setdefault(e, (dy, dx)) == (dy, dx)  # one table entry never serves two offsets
    assert len(seen) == table  # and every entry serves one


def _tiny(**kw) -> M.HAT:
    torch.manual_seed(0)
    return M.hat_tiny_x2(**kw).eval()


def test_strict_load_of_official_layout(tmp_path):
    model = _tiny()
    source = _tiny()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.05)
    ema = source.state_dict()
    plain = {k: v + 1 if v.is_floating_point() else v for k, v in ema.items()}
    path = tmp_path / "HAT_tiny.pth"
    torch.save({"params": plain, "params_ema": ema}, path)

    assert model.load_official_state_dict(path) == "params_ema"
    for k, v in ema.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.load_official_state_dict(path, key="params") == "params"
    assert torch.equal(model.conv_first.weight, plain["conv_first.weight"])

    only_params = tmp_path / "params_only.pth"
    torch.save({"params": ema}, only_params)
    assert model.load_official_state_dict(only_params) == "params"


def test_checkpoint_mismatch_names_keys_and_path(tmp_path):
    model = _tiny()
    state = model.state_dict()
    state.pop("conv_last.bias")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"params_ema": state}, path)
    with pytest.raises(CheckpointError) as err:
        model.load_official_state_dict(path)
    msg = str(err.value)
    assert str(path) in msg and "conv_last.bias" in msg and "extra.weight" in msg

    x4 = tmp_path / "x4.pth"
    torch.save({"params_ema": M.hat_tiny_x4().state_dict()}, x4)
    with pytest.raises(CheckpointError, match="upsample.2.weight"):
        model.load_official_state_dict(x4)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        model.load_official_state_dict(tmp_path / "missing.pth")
    torch.save({"something": 1}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="params_ema"):
        model.load_official_state_dict(tmp_path / "odd.pth")


def test_fused_and_math_attention_agree_with_shifted_windows():
    model = _tiny(drop_path_rate=0.0).train()
    x = torch.rand(2, 3, 16, 24)  # 2 x 3 windows of 8: shifted blocks use the mask
    results = []
    for fused in (True, False):
        set_fused_attn(model, fused)
        model.zero_grad()
        out = model(x)
        out.abs().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_f, grads_f), (out_m, grads_m) = results
    torch.testing.assert_close(out_f, out_m, atol=1e-5, rtol=1e-5)
    for name in grads_m:
        torch.testing.assert_close(grads_f[name], grads_m[name], atol=1e-5, rtol=1e-4, msg=name)
    assert grads_m["layers.0.residual_group.blocks.1.attn.relative_position_bias_table"].abs().sum() > 0
    assert grads_m["layers.1.residual_group.overlap_attn.relative_position_bias_table"].abs().sum() > 0


def test_shift_mask_is_cached_per_size():
    model = _tiny()
    with torch.no_grad():
        model(torch.rand(1, 3, 16, 16))
        model(torch.rand(1, 3, 16, 16))
        model(torch.rand(1, 3, 24, 16))
    assert len(model._masks) == 2


@pytest.mark.parametrize("upscale", [1, 2, 3, 4])
def test_upscale_shapes(upscale):
    torch.manual_seed(0)
    model = M.HAT(**{**_tiny_args(), "upscale": upscale, "upsampler": "pixelshuffle" if upscale > 1 else ""}).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 8, 16))
    assert out.shape == (1, 3, 8 * upscale, 16 * upscale) and torch.isfinite(out).all()


def _tiny_args() -> dict:
    return dict(img_size=16, window_size=8, depths=[2], num_heads=[2], embed_dim=16, squeeze_factor=4,
                compress_ratio=2, mlp_ratio=2.0, drop_path_rate=0.0)


def test_config_errors():
    with pytest.raises(ConfigError, match="windwo_size"):
        M.HAT(windwo_size=8)
    with pytest.raises(ConfigError, match="upsampler"):
        M.HAT(upscale=2, upsampler="")
    with pytest.raises(ConfigError, match="resi_connection"):
        M.HAT(**_tiny_args(), resi_connection="3conv", upsampler="pixelshuffle")
    with pytest.raises(ConfigError, match="2\\^n or 3"):
        M.HAT(**_tiny_args(), upscale=5, upsampler="pixelshuffle")
    with pytest.raises(ValueError, match="multiple of window_size"):
        _tiny()(torch.rand(1, 3, 12, 16))


def test_pad_to_multiple():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).view(1, 2, 5, 7)
    padded, pads = pad_to_multiple(x, 4)
    assert pads == (3, 1) and padded.shape == (1, 2, 8, 8)
    assert torch.equal(padded, F.pad(x, (0, 1, 0, 3), mode="reflect"))
    tiny, pads = pad_to_multiple(x[..., :2, :3], 8)  # pad larger than the image: repeated reflections
    assert pads == (6, 5) and tiny.shape == (1, 2, 8, 8)
    assert torch.equal(tiny[..., :2, :3], x[..., :2, :3]) and torch.equal(tiny[..., 2, :3], x[..., 0, :3])


class _LocalNet(nn.Module):
    """A conv net with a 2-pixel receptive radius: tiles with >= 2 pixels of context must reproduce it exactly."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 3 * scale * scale, 3, padding=1))
        self.shuffle = nn.PixelShuffle(scale)
        self.upscale, self.window_size = scale, 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.body(x))


def test_tiles_reproduce_a_local_network_exactly():
    torch.manual_seed(0)
    net = _LocalNet(2)
    x = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        whole = net(x)
        tiled = tiled_forward(net, x, 2, tile_size=8, tile_pad=2)
        torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
        starved = tiled_forward(net, x, 2, tile_size=8, tile_pad=0)
    assert (starved - whole).abs().max() > 1e-3  # without context the tile seams show: the pad does matter


def test_tiled_hat_equals_whole_image_when_pad_covers_it():
    model = _tiny()
    x = torch.rand(1, 3, 21, 27)
    whole = super_resolve(model, x)
    assert whole.shape == (1, 3, 42, 54)
    tiled = super_resolve(model, x, tile_size=8, tile_pad=32)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    seams = super_resolve(model, x, tile_size=8, tile_pad=8)
    assert seams.shape == whole.shape and (seams - whole).abs().mean() < 0.05


def test_super_resolve_crops_padding_exactly():
    net = _LocalNet(3)
    x = torch.rand(1, 3, 13, 10)
    with torch.no_grad():
        out = super_resolve(net, x)
        # the bottom/right reflection lies outside the kept area; inside, only the border convs see it
        ref = net(F.pad(x, (0, 2, 0, 3), mode="reflect"))[..., :39, :30]
    assert out.shape == (1, 3, 39, 30)
    torch.testing.assert_close(out, ref)


def _dihedral(x: torch.Tensor) -> list[tuple[torch.Tensor, callable]]:
    # the 8 symmetries of the square as rotations and a flip, with their inverses
    out = []
    for k in range(4):
        for flip in (False, True):
            y = torch.rot90(x, k, (-2, -1))
            y = y.flip(-1) if flip else y

            def undo(z, k=k, flip=flip):
                z = z.flip(-1) if flip else z
                return torch.rot90(z, -k, (-2, -1))

            out.append((y, undo))
    return out


def test_self_ensemble_is_the_mean_over_the_dihedral_group():
    model = _tiny()
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        expected = torch.stack([undo(model(y)) for y, undo in _dihedral(x)]).mean(0)
    got = super_resolve(model, x, ensemble=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    plain = super_resolve(model, x)
    assert (got - plain).abs().max() > 1e-6  # HAT is not equivariant: the ensemble is a different estimate
    # an equivariant operator is left unchanged
    up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
    torch.testing.assert_close(self_ensemble(up, x), up(x))
