"""SLAB: fingerprints, the official checkpoint layout, SLA and PRepBN numerics, the step-driven schedule, BN
folding and recalibration, the language model, and (slow) training through the LN -> RepBN handover."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from projects.slab import model as M
from projects.slab.norms import (
    PRepBN,
    RepBN,
    handover_steps,
    recalibrate_bn,
    repbn_modules,
    set_prepbn_step,
)
from shared.lit.errors import CheckpointError

# Parameter counts of the official classes (xinghaochen/SLAB, classification/models), 1000 classes, 224 input.
OFFICIAL_PARAMS = {
    "slab_deit_t": 6_198_401,
    "slab_deit_s": 22_992_641,
    "slab_swin_t": 29_216_605,
    "slab_swin_s": 50_552_965,
    "slab_swin_b": 89_029_373,
    "slab_pvt_t": 12_157_692,
    "slab_cswin_t": 21_227_807,
    "deit_t_prepbn": 5_717_441,
    "deit_s_prepbn": 22_069_889,
    "swin_t_prepbn": 28_288_383,
}


def meta_model(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return M.build_model(name, **kw)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_counts_match_the_official_models(name):
    assert sum(p.numel() for p in meta_model(name).parameters()) == OFFICIAL_PARAMS[name]


# Keys and shapes read from the official model files (a sample of every kind of module).
OFFICIAL_KEYS = {
    "slab_swin_t": {
        "patch_embed.proj.weight": (96, 3, 4, 4),
        "patch_embed.norm.warm": (),
        "patch_embed.norm.iter": (),
        "patch_embed.norm.total_step": (),
        "patch_embed.norm.norm1.weight": (96,),
        "patch_embed.norm.norm2.alpha": (1,),
        "patch_embed.norm.norm2.bn.running_var": (96,),
        "layers.0.blocks.1.attn.positional_encoding": (1, 3136, 96),
        "layers.0.blocks.1.attn.dwc.weight": (32, 1, 5, 5),
        "layers.1.blocks.0.attn.positional_encoding": (1, 784, 192),
        "layers.1.downsample.reduction.weight": (384, 768),
        "layers.1.downsample.norm.norm2.bn.weight": (768,),
        "layers.2.blocks.1.attn.relative_position_bias_table": (169, 12),
        "layers.2.blocks.1.attn.relative_position_index": (49, 49),
        "layers.2.blocks.1.attn_mask": (4, 49, 49),
        "layers.3.blocks.1.attn.qkv.weight": (2304, 768),
        "norm.norm2.bn.num_batches_tracked": (),
        "head.weight": (1000, 768),
    },
    "slab_deit_t": {"cls_token": (1, 1, 192), "pos_embed": (1, 196, 192),
                    "blocks.11.attn.positional_encoding": (1, 196, 192), "blocks.0.norm1.norm1.bias": (192,)},
    "deit_t_prepbn": {"pos_embed": (1, 197, 192), "blocks.0.norm1.alpha": (1,), "blocks.0.norm1.bn.bias": (192,)},
    "swin_t_prepbn": {"layers.0.blocks.1.attn_mask": (64, 49, 49), "patch_embed.norm.bn.weight": (96,),
                      "layers.0.blocks.0.attn.relative_position_bias_table": (169, 3)},
    "slab_pvt_t": {"pos_embed1": (1, 3136, 64), "patch_embed2.proj.weight": (128, 64, 2, 2),
                   "block1.0.attn.q.weight": (64, 64), "block1.0.attn.kv.weight": (128, 64),
                   "block4.1.attn.positional_encoding": (1, 49, 512)},
    "slab_cswin_t": {"stage1_conv_embed.0.weight": (64, 3, 7, 7), "stage1_conv_embed.2.norm2.alpha": (1,),
                     "stage1.0.attns.0.positional_encoding": (1, 3136, 64), "stage1.0.attns.0.scale": (1, 1, 64),
                     "stage3.0.attns.1.get_v.weight": (128, 1, 3, 3), "merge3.conv.weight": (512, 256, 3, 3),
                     "stage4.0.attns.0.get_v.weight": (512, 1, 3, 3)},
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
def test_official_key_names_and_shapes(name):
    state = meta_model(name).state_dict()
    for key, shape in OFFICIAL_KEYS[name].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key


def tiny_swin(**kw) -> M.SlabSwin:
    args = dict(img_size=16, patch_size=2, num_classes=5, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                window_size=8, attn_type="LS", drop_path_rate=0.0)
    return M.SlabSwin(**{**args, **kw})


def randomise_statistics(model: nn.Module, seed: int = 0) -> None:
    """Running statistics, alphas and positional encodings away from their initial values, so every term counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in repbn_modules(model):
            m.bn.running_mean.copy_(torch.randn(m.bn.running_mean.shape, generator=g) * 0.3)
            m.bn.running_var.copy_(torch.rand(m.bn.running_var.shape, generator=g) + 0.5)
            m.bn.weight.copy_(torch.randn(m.bn.weight.shape, generator=g) * 0.3 + 1)
            m.bn.bias.copy_(torch.randn(m.bn.bias.shape, generator=g) * 0.3)
            m.alpha.copy_(torch.rand(1, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if name.endswith("positional_encoding"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_official_checkpoint_loads_strictly(tmp_path):
    source = tiny_swin()
    randomise_statistics(source)
    set_prepbn_step(source, 7, 0, 20)
    path = tmp_path / "slab.pth"
    torch.save({"model": source.state_dict(), "epoch": 299}, path)  # the Swin codebase's checkpoint dict
    target = M.load_official(tiny_swin(), str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(target.eval()(x), source.eval()(x))


def test_checkpoint_mismatch_names_the_keys():
    state = tiny_swin().state_dict()
    state["layers.0.blocks.0.attn.extra"] = state.pop("layers.0.blocks.0.attn.positional_encoding")
    with pytest.raises(CheckpointError, match="positional_encoding"):
        M.load_official(tiny_swin(), {"model": state})


def test_prepbn_checkpoint_loads_into_the_repbn_layout():
    trained = tiny_swin(norm="prepbn")
    randomise_statistics(trained)
    deployed = M.load_official(tiny_swin(norm="repbn"), trained.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(deployed.eval()(x), trained.eval()(x))


# ------------------------------------------------------------------------------------------------- SLA numerics

def test_sla_matches_the_paper_equation():
    torch.manual_seed(0)
    sla = M.SimplifiedLinearAttention(dim=8, num_heads=2, size=(3, 4))
    nn.init.normal_(sla.positional_encoding, std=0.5)
    x = torch.randn(2, 12, 8)
    # eq. 6-7 written out per head with the explicit (N, N) matrix of ReLU kernel products
    q, k, v = sla.qkv(x).chunk(3, dim=-1)
    q, k = q.relu(), (k + sla.positional_encoding).relu()
    heads = []
    for h in range(2):
        qh, kh, vh = (t[..., 4 * h : 4 * h + 4] for t in (q, k, v))
        sim = qh @ kh.transpose(1, 2)  # (B, N, N)
        out = sim @ vh / (sim.sum(-1, keepdim=True) + 1e-6)
        dwc = sla.dwc(vh.transpose(1, 2).reshape(2, 4, 3, 4)).reshape(2, 4, 12).transpose(1, 2)
        heads.append(out + dwc)
    expected = sla.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(sla(x), expected, rtol=1e-5, atol=1e-5)


def test_sla_runs_in_float32_under_autocast():
    sla = M.SimplifiedLinearAttention(dim=8, num_heads=2, size=(2, 2))
    x = torch.randn(1, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sla(x)
    # only the projections are bf16; the attention itself matched the float32 result
    torch.testing.assert_close(y.float(), sla(x), rtol=3e-2, atol=3e-2)


# ------------------------------------------------------------------------------------------------------ PRepBN

def official_countdown(calls: int, warm: int, step: int) -> tuple[int, int]:
    """The official LinearNorm buffers after `calls` training forwards: warm counts down first, then iter."""
    w, it = warm, step
    for _ in range(calls):
        if w > 0:
            w -= 1
        elif it > 0:
            it -= 1
    return w, it


@pytest.mark.parametrize("step", [0, 3, 5, 6, 12, 15, 40])
def test_schedule_matches_the_official_countdown_at_one_forward_per_step(step):
    norm = PRepBN(4, warm=5, step=10)
    norm.set_step(step, warmup_steps=5, handover_steps=10)
    warm, it = official_countdown(step, 5, 10)
    assert (int(norm.warm), int(norm.iter), int(norm.total_step)) == (warm, it, 10)
    warming, lam = norm.schedule_state()
    assert warming == (warm > 0) and lam == pytest.approx(it / 10)


def test_prepbn_blends_layernorm_and_repbn_and_evaluates_as_repbn():
    torch.manual_seed(0)
    norm = PRepBN(6)
    randomise_statistics(norm)
    x = torch.randn(3, 5, 6) * 2 + 1
    ln, bn = norm.norm1, norm.norm2
    norm.train()
    norm.set_step(0, warmup_steps=2, handover_steps=4)
    torch.testing.assert_close(norm(x), ln(x))  # warm-up: LayerNorm alone
    norm.set_step(3, warmup_steps=2, handover_steps=4)  # one handover step done: lambda = 3/4
    torch.testing.assert_close(norm(x), 0.75 * ln(x) + 0.25 * bn(x))
    norm.set_step(100, warmup_steps=2, handover_steps=4)
    torch.testing.assert_close(norm(x), bn(x))
    norm.eval()
    a, b = bn.affine()
    torch.testing.assert_close(norm(x), x * a + b)  # evaluation: the RepBN, an affine map (eq. 4)


def test_lambda_depends_on_the_step_only():
    """Resuming, accumulating gradients or running extra forwards cannot shift the schedule."""
    model = tiny_swin()
    model.train()
    set_prepbn_step(model, 9, 0, 30)
    for _ in range(3):
        model(torch.randn(2, 3, 16, 16))
    fresh = tiny_swin()
    set_prepbn_step(fresh, 9, 0, 30)
    for a, b in zip(PRepBN_modules(model), PRepBN_modules(fresh)):
        assert (int(a.iter), int(a.warm), a.schedule_state()) == (int(b.iter), int(b.warm), b.schedule_state())
        assert a.schedule_state()[1] == pytest.approx(21 / 30)


def PRepBN_modules(model):
    return [m for m in model.modules() if isinstance(m, PRepBN)]


def test_handover_ends_at_the_configured_fraction():
    assert handover_steps(1000) == 800
    assert handover_steps(1000, warmup_steps=100, end=0.5) == 400
    with pytest.raises(ValueError):
        handover_steps(100, warmup_steps=90, end=0.8)


# ----------------------------------------------------------------------------------------------------- folding

TINY = {  # name -> (model, input size)
    "swin": (lambda: tiny_swin(), 16),
    # window 7 with shifted windows at 14 x 14, as the PRepBN Swin-T's first stage
    "swin_softmax_repbn": (lambda: tiny_swin(img_size=28, attn_type="SS", norm="repbn"), 28),
    "deit_linear": (lambda: M.SlabDeiT(img_size=16, patch_size=4, num_classes=5, embed_dim=16, depth=2,
                                       num_heads=2), 16),
    "deit_softmax": (lambda: M.SlabDeiT(img_size=16, patch_size=4, num_classes=5, embed_dim=16, depth=2, num_heads=2,
                                        attention="softmax"), 16),
    "pvt": (lambda: M.SlabPVT(img_size=32, patch_size=4, num_classes=5, embed_dims=(8, 16), num_heads=(1, 2),
                              mlp_ratios=(2, 2), depths=(1, 1)), 32),
    "cswin": (lambda: M.SlabCSWin(img_size=32, num_classes=5, embed_dim=8, depth=(1, 1, 2, 1),
                                  split_size=(1, 2, 1, 1), la_split_size=(8, 4, 2, 1), num_heads=(2, 2, 4, 4),
                                  attn_type="LLSS"), 32),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_folded_model_gives_the_unfolded_outputs(name):
    torch.manual_seed(0)
    build, img = TINY[name]
    model = build()
    randomise_statistics(model)
    x = torch.randn(3, 3, img, img)
    model.eval()
    with torch.no_grad():
        before = model(x)
        M.fold_norms(model)
        after = model(x)
    assert not list(repbn_modules(model)) and not PRepBN_modules(model)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_folding_needs_eval_mode_and_batchnorm():
    with pytest.raises(RuntimeError, match="eval"):
        M.fold_norms(tiny_swin().train())
    with pytest.raises(TypeError):
        M.fold_norms(tiny_swin(norm="layernorm").eval())


def test_recalibration_estimates_the_population_statistics_with_frozen_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), RepBN(6), nn.Dropout(0.5))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.randn(2, 5, 4) * 3 + 1 for _ in range(4)]
    assert recalibrate_bn(model, iter(batches)) == 4
    features = torch.cat([model[0](b).reshape(-1, 6) for b in batches])  # every token of every batch
    bn = model[1].bn
    torch.testing.assert_close(bn.running_mean, features.mean(0), rtol=1e-5, atol=1e-5)
    # BatchNorm keeps each batch's unbiased variance; the cumulative average of those over equal batches
    per_batch = torch.stack([f.var(0, unbiased=True) for f in features.split(10)])
    torch.testing.assert_close(bn.running_var, per_batch.mean(0), rtol=1e-5, atol=1e-5)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not model.training and bn.momentum == 0.1


# ---------------------------------------------------------------------------------------------- language model

@pytest.mark.parametrize("attention", ["sla", "softmax"])
def test_language_model_is_causal_and_folds(attention):
    torch.manual_seed(0)
    lm = M.SlabLlama(vocab_size=11, dim=16, depth=2, num_heads=2, max_len=12, attention=attention)
    randomise_statistics(lm)
    lm.eval()
    idx = torch.randint(0, 11, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 11
    with torch.no_grad():
        a, b = lm(idx), lm(changed)
        assert a.shape == (2, 12, 11)
        torch.testing.assert_close(a[:, :7], b[:, :7])  # tokens 0..6 never see tokens 7..11
        assert not torch.allclose(a[:, 7:], b[:, 7:])
        M.fold_norms(lm)
        torch.testing.assert_close(lm(idx), a, rtol=1e-4, atol=1e-5)


def test_llama_350m_size():
    # the official config.json with PRepBN norms (RMSNorm + RepBN branches) and softmax attention
    n = sum(p.numel() for p in meta_model("slab_llama_350m").parameters())
    per_norm = 1024 + 1 + 2 * 1024  # RMSNorm gain, RepBN alpha, BN weight and bias
    blocks = 18 * (4 * 1024 * 1024 + 3 * 1024 * 4096 + 2 * per_norm)
    assert n == 2 * 32000 * 1024 + blocks + per_norm


# -------------------------------------------------------------------------------------------------- configs

def test_experiment_configs_compose_and_build():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    names = [(project, p.stem) for project in ("slab", "slab_lm")
             for p in sorted((conf / "experiment" / project).glob("*.yaml"))]
    assert {"slab_swin_t", "slab_deit_t", "llama_350m_prepbn", "lm_wikipedia"} <= {n for _, n in names}
    with initialize_config_dir(str(conf), version_base="1.3"):
        for project, name in names:
            cfg = compose("train", overrides=[f"project={project}", f"experiment={project}/{name}"])
            m = cfg.model
            kwargs = dict(m.model_kwargs or {})
            with torch.device("meta"):
                if m._target_.endswith("SlabModule"):
                    built = M.build_model(m.model, num_classes=m.num_classes, img_size=cfg.data.img_size, **kwargs)
                else:
                    built = M.SlabLlama(**kwargs)
            n = sum(p.numel() for p in built.parameters())
            if m._target_.endswith("SlabModule") and m.num_classes == 1000 and not kwargs.get("norm"):
                assert n == OFFICIAL_PARAMS[m.model], name
            if name == "llama_350m_prepbn":
                assert n == sum(p.numel() for p in meta_model("slab_llama_350m").parameters())
            assert math.isfinite(float(m.optimizer.lr)), name


# -------------------------------------------------------------------------------------------------- training

@pytest.mark.slow
def test_training_through_the_handover_learns_digits(tmp_path):
    """A small SLAB-Swin on MNIST digits: lambda reaches 0 at 80% of the steps, the loss stays finite, BN is
    recalibrated, and the RepBN-only model classifies far above chance (10%; about 65% after these 150 steps,
    where the same model with LayerNorm reaches about 59%)."""
    import lightning.pytorch as pl

    from projects.slab.module import SlabModule
    from shared.data.classification import ClassificationDataModule

    pl.seed_everything(0)
    data = ClassificationDataModule(source="embedded", img_size=16, batch_size=32, eval_batch_size=250,
                                    train_transform={"auto_augment": None, "re_prob": 0.0, "hflip": 0.0,
                                                     "color_jitter": 0.0, "crop_padding": 0})
    module = SlabModule(model="slab_swin_t", num_classes=10, img_size=16, recalibration_steps=10,
                        model_kwargs={"patch_size": 2, "embed_dim": 32, "depths": [1, 1], "num_heads": [1, 2],
                                      "window_size": 8, "attn_type": "LS", "drop_path_rate": 0.0},
                        optimizer={"name": "adamw", "lr": 8e-3, "weight_decay": 0.05},
                        scheduler={"name": "cosine", "warmup_steps": 10}, grad_clip={"mode": "norm", "value": 5.0})
    trainer = pl.Trainer(max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=None, check_val_every_n_epoch=100, use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    norms = PRepBN_modules(module.model)
    assert norms and all(n.schedule_state() == (False, 0.0) for n in norms)  # handover complete
    assert module._recalibrated
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    result = trainer.test(module, datamodule=data, verbose=False)[0]
    assert result["test/top1"] > 0.45, result
