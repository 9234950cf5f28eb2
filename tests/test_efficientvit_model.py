"""EfficientViT architecture: official fingerprints and key layout, strict checkpoint loading (also at another
img_size), timm conversion, BN fusion, the eval-time bias cache, the fused attention path."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from projects.efficientvit import model as M
from shared.lit.errors import CheckpointError, ConfigError

# Measured by running the official microsoft/Cream efficientvit.py + build.py (research notes); README: 2.3 M .. 12.4 M.
OFFICIAL_PARAMS = {"m0": 2_349_436, "m1": 2_980_560, "m2": 4_187_554, "m3": 6_900_722, "m4": 8_804_228,
                   "m5": 12_473_772}
# After the official `replace_batchnorm`.
OFFICIAL_FUSED_PARAMS = {"m0": 2_334_916, "m1": 2_964_256, "m2": 4_168_338, "m3": 6_875_890, "m4": 8_776_340,
                         "m5": 12_436_260}
# Paper settings (embed_dim, depth, num_heads) per variant, as in the official build.py.
SETTINGS = {"m0": ([64, 128, 192], [1, 2, 3], [4, 4, 4]), "m1": ([128, 144, 192], [1, 2, 3], [2, 3, 3]),
            "m2": ([128, 192, 224], [1, 2, 3], [4, 3, 2]), "m3": ([128, 240, 320], [1, 2, 3], [4, 3, 4]),
            "m4": ([128, 256, 384], [1, 2, 3], [4, 4, 4]), "m5": ([192, 288, 384], [1, 3, 4], [3, 3, 4])}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", list(OFFICIAL_PARAMS))
def test_fingerprint(variant):
    with torch.device("meta"):
        model = M.build(variant)
    assert n_params(model) == OFFICIAL_PARAMS[variant]
    assert n_params(M.fuse_bn(model.eval())) == OFFICIAL_FUSED_PARAMS[variant]


@pytest.mark.parametrize("img_size,expected", [(224, 2_158_366), (64, 2_157_694), (32, 2_157_622)])
def test_fingerprint_ten_classes(img_size, expected):
    with torch.device("meta"):
        model = M.efficientvit_m0(num_classes=10, img_size=img_size)
    assert n_params(model) == expected


def official_keys(embed_dim: list[int], depth: list[int], num_heads: list[int]) -> set[str]:
    """The official state_dict layout, written out from the module names of Cream's efficientvit.py."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def conv_bn(prefix: str) -> set[str]:
        return {f"{prefix}.c.weight"} | {f"{prefix}.bn.{p}" for p in bn}

    def dw_ffn(prefix: str) -> set[str]:
        return conv_bn(f"{prefix}.0.m") | conv_bn(f"{prefix}.1.m.pw1") | conv_bn(f"{prefix}.1.m.pw2")

    keys = set().union(*(conv_bn(f"patch_embed.{i}") for i in (0, 2, 4, 6)))
    keys |= {f"head.bn.{p}" for p in bn} | {"head.l.weight", "head.l.bias"}
    for s in range(3):
        first = 0
        if s > 0:
            t = f"blocks{s + 1}"
            keys |= dw_ffn(f"{t}.0") | dw_ffn(f"{t}.2")
            keys |= conv_bn(f"{t}.1.conv1") | conv_bn(f"{t}.1.conv2") | conv_bn(f"{t}.1.conv3")
            keys |= {f"{t}.1.se.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")}
            first = 3
        for b in range(first, first + depth[s]):
            block = f"blocks{s + 1}.{b}"
            for m in ("dw0", "dw1"):
                keys |= conv_bn(f"{block}.{m}.m")
            for m in ("ffn0", "ffn1"):
                keys |= conv_bn(f"{block}.{m}.m.pw1") | conv_bn(f"{block}.{m}.m.pw2")
            attn = f"{block}.mixer.m.attn"
            keys |= {f"{attn}.attention_biases", f"{attn}.attention_bias_idxs"} | conv_bn(f"{attn}.proj.1")
            for h in range(num_heads[s]):
                keys |= conv_bn(f"{attn}.qkvs.{h}") | conv_bn(f"{attn}.dws.{h}")
    return keys


@pytest.mark.parametrize("variant", list(SETTINGS))
def test_official_key_layout(variant):
    with torch.device("meta"):
        state = M.build(variant).state_dict()
    assert set(state) == official_keys(*SETTINGS[variant])
    if variant == "m4":
        assert len(state) == 699  # research notes: the official M4 state_dict has 699 entries


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics everywhere (so BN, fusion and biases are all exercised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model


def tiny(**kw) -> M.EfficientViT:
    """An M0-shaped model at 64 px with 10 classes (the attention covers windowed and global cases at 112)."""
    return M.efficientvit_m0(**{"num_classes": 10, "img_size": 64, **kw})


def test_official_checkpoint_loads_strictly(tmp_path):
    source = randomize_(tiny()).eval()
    state = source.state_dict()
    # Official checkpoints store some 1x1 conv weights 2-D; build.py gives them their (1, 1) back.
    for key in ("blocks1.0.ffn0.m.pw1.c.weight", "blocks2.1.se.fc1.weight"):
        state[key] = state[key][:, :, 0, 0]
    torch.save({"model": state, "epoch": 299}, tmp_path / "efficientvit_m0.pth")
    loaded = M.load_official_checkpoint(tiny(), tmp_path / "efficientvit_m0.pth").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_checkpoint_errors_name_the_problem(tmp_path):
    state = tiny().state_dict()
    del state["blocks1.0.mixer.m.attn.qkvs.0.c.weight"]
    with pytest.raises(CheckpointError, match="missing keys.*qkvs.0.c.weight"):
        M.load_official_state_dict(tiny(), state)
    state = tiny().state_dict()
    state["head.l.weight"] = torch.zeros(10, 7)
    with pytest.raises(CheckpointError, match=r"head.l.weight has shape \(10, 7\)"):
        M.load_official_state_dict(tiny(), state)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        M.load_official_checkpoint(tiny(), tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        M.load_official_checkpoint(tiny(), tmp_path / "junk.pth")


def test_load_at_another_img_size_resizes_bias_tables():
    big = randomize_(M.efficientvit_m0(num_classes=10, img_size=224))
    with torch.no_grad():  # a head whose table is constant must stay constant after bicubic resampling
        big.blocks3[3].mixer.m.attn.attention_biases[0].fill_(0.7)
    small = M.load_official_state_dict(M.efficientvit_m0(num_classes=10, img_size=64), big.state_dict())
    attn = small.blocks3[3].mixer.m.attn  # 224: 4x4 window -> 64: a 1x1 map
    assert attn.attention_biases.shape == (4, 1)
    assert torch.allclose(attn.attention_biases[0], torch.tensor([0.7]))
    stage1 = small.blocks1[0].mixer.m.attn  # 224: 7x7 window -> 64: the whole 4x4 map
    assert stage1.attention_biases.shape == (4, 16)
    assert torch.equal(stage1.attention_bias_idxs, M.attention_bias_index(4))
    # Same size: the table is loaded untouched.
    same = M.load_official_state_dict(M.efficientvit_m0(num_classes=10, img_size=224), big.state_dict())
    assert torch.equal(same.blocks1[0].mixer.m.attn.attention_biases, big.blocks1[0].mixer.m.attn.attention_biases)
    with torch.no_grad():
        assert small.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_attention_bias_index_is_the_offset_grid():
    idx = M.attention_bias_index(3)  # (9, 9); offset (|dy|, |dx|) -> 3 * |dy| + |dx|
    points = [(y, x) for y in range(3) for x in range(3)]
    expected = torch.tensor([[3 * abs(a[0] - b[0]) + abs(a[1] - b[1]) for b in points] for a in points])
    assert torch.equal(idx, expected)


@pytest.mark.parametrize("variant,img_size", [("m0", 224), ("m1", 64)])
def test_timm_conversion_gives_identical_outputs(variant, img_size):
    theirs = randomize_(timm.create_model(f"efficientvit_{variant}", pretrained=False, num_classes=10,
                                          img_size=img_size)).eval()
    ours = M.build(variant, num_classes=10, img_size=img_size, fused_attn=False).eval()
    M.load_official_state_dict(ours, M.convert_timm_state_dict(theirs.state_dict()))
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_bn_fusion_keeps_outputs_and_drops_parameters():
    model = randomize_(tiny()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        fused = M.fuse_bn(randomize_(tiny()).eval())
        assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) for m in fused.modules())
        assert n_params(fused) < n_params(model)
        torch.testing.assert_close(fused(x), reference, rtol=1e-5, atol=1e-5)
        folded = M.fold_residual_dw(fused)
        assert not any(isinstance(m, M.Residual) and isinstance(m.m, nn.Conv2d) for m in folded.modules())
        assert n_params(folded) == n_params(fused)
        torch.testing.assert_close(folded(x), reference, rtol=1e-5, atol=1e-5)


def test_eval_bias_cache_follows_weights_and_mode():
    model = randomize_(tiny()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)  # fills the caches
        other = randomize_(tiny(), seed=1).eval()
        model.load_state_dict(other.state_dict())  # loading after eval(): the official cache would go stale here
        assert torch.equal(model(x), other(x))
    # In training mode (and whenever autograd records) the bias table receives gradients.
    model.train()
    model(x).sum().backward()
    grads = [m.attention_biases.grad for m in model.modules()
             if isinstance(m, M.CascadedGroupAttention) and m.resolution > 1]  # a 1x1 map's softmax is constant
    assert len(grads) == 3 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_fused_attention_matches_explicit():
    explicit = randomize_(tiny(fused_attn=False)).eval()
    fused = tiny(fused_attn=True).eval()
    fused.load_state_dict(explicit.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), explicit(x), rtol=1e-5, atol=1e-5)
    # Gradients (eval mode: BN batch statistics of 2 samples would amplify rounding differences arbitrarily).
    grads = []
    for model in (fused, explicit):
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append(model.blocks1[0].mixer.m.attn.attention_biases.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    # Channels-last feature maps (the GPU layout) keep every head's output channels-last; same result.
    with torch.no_grad():
        reference = explicit(x)
        xc = x.contiguous(memory_format=torch.channels_last)
        for model in (fused, explicit):
            torch.testing.assert_close(model.to(memory_format=torch.channels_last)(xc), reference, rtol=1e-5,
                                       atol=1e-5)


def test_windowed_attention_with_padding_matches_global_split():
    # img 160 -> stage-1 map 10x10 with 7x7 windows: padded to 14x14, four windows, cropped back.
    model = randomize_(M.efficientvit_m0(num_classes=10, img_size=160)).eval()
    lwa = model.blocks1[0].mixer.m
    x = torch.randn(1, 64, 10, 10)
    with torch.no_grad():
        out = lwa(x)
        # the top-left window sees exactly x[..., :7, :7]
        torch.testing.assert_close(out[..., :7, :7], lwa.attn(x[..., :7, :7]), rtol=1e-5, atol=1e-6)


def test_distillation_heads_and_input_check():
    model = randomize_(tiny(distillation=True))
    x = torch.randn(2, 3, 64, 64)
    logits, logits_dist = model.train()(x)
    assert logits.shape == logits_dist.shape == (2, 10)
    model.eval()
    with torch.no_grad():
        pooled = model.forward_features(x).mean((2, 3))
        torch.testing.assert_close(model(x), (model.head(pooled) + model.head_dist(pooled)) / 2)
        with pytest.raises(ValueError, match="built for 4x4"):
            model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ConfigError, match="num_heads"):
        M.EfficientViT(embed_dim=[64, 128, 190])


def test_stochastic_depth_only_in_training():
    block = M.Residual(nn.Identity(), drop=0.5)
    x = torch.ones(64, 1, 1, 1)
    out = block.train()(x)
    assert set(out.flatten().tolist()) == {1.0, 3.0}  # x + x * {0, 1 / (1 - 0.5)}
    assert torch.equal(block.eval()(x), 2 * x)


def test_timm_registry_does_not_shadow_timm():
    ours = timm.create_model("formerlab_efficientvit_m0", pretrained=False, num_classes=10, img_size=64)
    assert isinstance(ours, M.EfficientViT) and ours.num_classes == 10
    assert not isinstance(timm.create_model("efficientvit_m0", pretrained=False), M.EfficientViT)
    assert {f"formerlab_efficientvit_m{i}" for i in range(6)} <= set(timm.list_models("formerlab_efficientvit_*"))
    with pytest.raises(CheckpointError, match="load_official_checkpoint"):
        timm.create_model("formerlab_efficientvit_m0", pretrained=True)


def test_no_weight_decay_lists_the_bias_tables():
    names = tiny().no_weight_decay()
    assert names and all(n.endswith("attention_biases") for n in names)
    assert len(names) == 6  # one per block (M0 depth 1 + 2 + 3)
