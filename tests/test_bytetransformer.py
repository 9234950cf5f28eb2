"""projects/bytetransformer: parameter counts, Hugging Face's key layout and strict loading, the packed model
against transformers' padded BertModel, the fused LayerNorm, the MLM data, and a short pre-training run."""

from __future__ import annotations

import json
import math
import os
import sys

import torch

_TRITON_ALREADY_COMPILED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: see tests/test_varlen_attention.py

import pytest  # noqa: E402

from projects.bytetransformer.model import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertModel,
    bert_base,
    bert_large,
    bert_tiny,
    from_pretrained,
    load_hf_state_dict,
)
from shared.kernels.fused_layernorm import add_layernorm, add_layernorm_reference  # noqa: E402
from shared.lit.errors import CheckpointError, ConfigError, DatasetError  # noqa: E402


def small_config(**overrides) -> BertConfig:
    return BertConfig(**{**dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=24, hidden_dropout_prob=0.0),
                         **overrides})


def hf_twin(cfg: BertConfig, mlm: bool = False):
    """transformers' BertModel / BertForMaskedLM with the same hyper-parameters (random weights, no download)."""
    transformers = pytest.importorskip(
        "transformers", reason="the equivalence tests need transformers (pip install -e '.[dev]')")
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForMaskedLM(hf_cfg) if mlm else transformers.BertModel(hf_cfg)
    return model.eval(), hf_cfg


def random_batch(cfg: BertConfig, lengths: list[int], seqlen: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.arange(seqlen)[None] < torch.tensor(lengths)[:, None]).long()  # (B, L), right-padded
    ids = torch.randint(1, cfg.vocab_size, (len(lengths), seqlen), generator=gen) * mask
    types = torch.randint(0, cfg.type_vocab_size, (len(lengths), seqlen), generator=gen) * mask
    return ids, mask, types


# --- fingerprints ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory,mlm,expected", [
    # transformers' BertModel / BertForMaskedLM (the reference implementation of BERT) built on the meta device
    (bert_base, False, 109_482_240), (bert_base, True, 109_514_298),
    (bert_large, False, 335_141_888), (bert_large, True, 335_174_458),
])
def test_parameter_counts(factory, mlm, expected):
    with torch.device("meta"):
        model = BertForMaskedLM(factory()) if mlm else BertModel(factory())
    assert sum(p.numel() for p in model.parameters()) == expected


def test_state_dict_has_hugging_face_layout():
    model = BertForMaskedLM(small_config(num_hidden_layers=1))
    keys = list(model.state_dict())
    layer = "bert.encoder.layer.0."
    assert keys == [
        "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight",
        "bert.embeddings.LayerNorm.bias",
        *(layer + f"attention.self.{n}.{p}" for n in ("query", "key", "value") for p in ("weight", "bias")),
        *(layer + f"attention.output.{n}.{p}" for n in ("dense", "LayerNorm") for p in ("weight", "bias")),
        layer + "intermediate.dense.weight", layer + "intermediate.dense.bias",
        *(layer + f"output.{n}.{p}" for n in ("dense", "LayerNorm") for p in ("weight", "bias")),
        "cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
    ]
    # the fused QKV projection round-trips through the split keys
    clone = BertForMaskedLM(small_config(num_hidden_layers=1))
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone.bert.encoder.layer[0].attention.self.qkv.weight,
                               model.bert.encoder.layer[0].attention.self.qkv.weight)
    assert clone.cls.predictions.decoder.weight is clone.bert.embeddings.word_embeddings.weight  # tied


# --- equivalence with transformers' padded BERT -----------------------------------------------------------------

def test_packed_bert_equals_hf_padded_bert():
    cfg = small_config()
    hf, _ = hf_twin(cfg)
    ours = BertModel(cfg).eval()
    load_hf_state_dict(ours, hf.state_dict(), source="transformers.BertModel")
    ids, mask, types = random_batch(cfg, [24, 5, 1, 17], 24)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got = ours(ids, mask, types)
    valid = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[valid], expected.last_hidden_state[valid],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)
    assert torch.all(got.last_hidden_state[~valid] == 0)


def test_packed_bert_equals_hf_with_left_padding_and_holes():
    cfg = small_config()
    hf, _ = hf_twin(cfg)
    ours = BertModel(cfg).eval()
    load_hf_state_dict(ours, hf.state_dict())
    ids, _, _ = random_batch(cfg, [10, 10, 10], 10, seed=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0, 1, 1, 1, 1], [1] * 10])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_masked_lm_equals_hf_and_loss_uses_masked_tokens_only():
    cfg = small_config()
    hf, _ = hf_twin(cfg, mlm=True)
    ours = BertForMaskedLM(cfg).eval()
    load_hf_state_dict(ours, hf.state_dict(), source="transformers.BertForMaskedLM")
    ids, mask, types = random_batch(cfg, [9, 20, 3], 20, seed=2)
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 7], labels[1, 19], labels[2, 1] = 5, 17, 3, 9
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        logits = ours(ids, mask, types)
        result = ours.masked_lm_loss(ids, mask, labels, types)
    torch.testing.assert_close(logits[mask.bool()], expected.logits[mask.bool()], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.loss, expected.loss, rtol=1e-5, atol=1e-6)
    chosen = labels != -100
    assert result.count == 4 and result.correct == (expected.logits.argmax(-1)[chosen] == labels[chosen]).sum()


def test_training_mode_without_dropout_equals_fused_inference():
    torch.manual_seed(0)
    cfg = small_config()
    model = BertModel(cfg).double()
    ids, mask, types = random_batch(cfg, [12, 7], 12, seed=3)
    eval_out = model.eval()(ids, mask, types).last_hidden_state
    train_out = model.train()(ids, mask, types).last_hidden_state
    torch.testing.assert_close(train_out, eval_out)
    train_out.sum().backward()
    assert model.encoder.layer[0].attention.self.qkv.weight.grad.abs().sum() > 0


# --- checkpoints ---------------------------------------------------------------------------------------------------

def legacy_pretraining_state_dict(model: BertForMaskedLM, with_pooler: BertModel) -> dict[str, torch.Tensor]:
    """A state dict as the original bert-base-*.bin files store it: BertForPreTraining with the next-sentence
    head, TF-era gamma/beta names, a position-id buffer, and no separate decoder weight / bias."""
    sd = {}
    for key, value in model.state_dict().items():
        if key.startswith("cls.predictions.decoder."):
            continue
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        sd[key] = value.clone()
    sd["bert.pooler.dense.weight"] = with_pooler.pooler.dense.weight.detach().clone()
    sd["bert.pooler.dense.bias"] = with_pooler.pooler.dense.bias.detach().clone()
    sd["bert.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
    sd["cls.seq_relationship.weight"] = torch.randn(2, model.config.hidden_size)
    sd["cls.seq_relationship.bias"] = torch.zeros(2)
    return sd


def test_legacy_pretraining_checkpoint_loads_into_both_models():
    cfg = small_config()
    torch.manual_seed(0)
    source, pooled = BertForMaskedLM(cfg).eval(), BertModel(cfg).eval()
    sd = legacy_pretraining_state_dict(source, pooled)
    mlm = BertForMaskedLM(cfg).eval()
    load_hf_state_dict(mlm, sd)
    encoder = BertModel(cfg).eval()
    load_hf_state_dict(encoder, sd)
    ids, mask, _ = random_batch(cfg, [6, 11], 11, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(mlm(ids, mask), source(ids, mask))
        torch.testing.assert_close(encoder(ids, mask).last_hidden_state, source.bert(ids, mask).last_hidden_state)
    torch.testing.assert_close(encoder.pooler.dense.weight, pooled.pooler.dense.weight)


@pytest.mark.parametrize("corrupt,message", [
    (lambda sd: sd.pop("bert.encoder.layer.1.output.dense.weight"), "missing keys.*layer.1.output.dense.weight"),
    (lambda sd: sd.update({"bert.encoder.layer.2.output.dense.weight": torch.zeros(1)}),
     "unexpected keys.*layer.2.output.dense.weight"),
    (lambda sd: sd.update({"bert.embeddings.word_embeddings.weight": torch.zeros(99, 32)}),
     r"shape mismatch.*word_embeddings.weight: file \(99, 32\) vs model \(120, 32\)"),
])
def test_strict_loading_names_what_does_not_fit(corrupt, message):
    cfg = small_config()
    sd = BertForMaskedLM(cfg).state_dict()
    corrupt(sd)
    with pytest.raises(CheckpointError, match=message):
        load_hf_state_dict(BertForMaskedLM(cfg), sd, source="ckpt.bin")


def test_bare_encoder_checkpoint_into_mlm_is_refused():
    cfg = small_config()
    with pytest.raises(CheckpointError, match=r"missing keys \(e.g. cls.predictions"):
        load_hf_state_dict(BertForMaskedLM(cfg), BertModel(cfg).state_dict())


def write_hf_directory(path, cfg: BertConfig, state_dict, weights: str = "pytorch_model.bin"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_act": "gelu",
        "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1, "initializer_range": 0.02,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "layer_norm_eps": cfg.layer_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": cfg.num_attention_heads, "num_hidden_layers": cfg.num_hidden_layers,
        "pad_token_id": 0, "position_embedding_type": "absolute", "type_vocab_size": 2,
        "vocab_size": cfg.vocab_size,
    }))
    if weights.endswith(".safetensors"):
        import safetensors.torch

        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / weights))
    else:
        torch.save(state_dict, path / weights)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a"]) + "\n")
    return path


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_from_pretrained_directory(tmp_path, weights):
    if weights.endswith(".safetensors"):
        pytest.importorskip("safetensors", reason="reading .safetensors needs the safetensors package")
    cfg = small_config()
    torch.manual_seed(5)
    source, pooled = BertForMaskedLM(cfg).eval(), BertModel(cfg).eval()
    sd = legacy_pretraining_state_dict(source, pooled)
    if weights.endswith(".safetensors"):
        sd = {k: v for k, v in sd.items() if "gamma" not in k and "beta" not in k} | {
            k: v for k, v in source.state_dict().items() if "LayerNorm" in k}
    directory = write_hf_directory(tmp_path / "bert", cfg, sd, weights)
    model = from_pretrained(directory, mlm=True).eval()
    assert model.config.hidden_dropout_prob == 0.1 and model.config.num_hidden_layers == cfg.num_hidden_layers
    ids, mask, _ = random_batch(cfg, [8, 3], 8, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), source(ids, mask))


def test_pretrained_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        from_pretrained(tmp_path)
    cfg = small_config()
    directory = write_hf_directory(tmp_path / "bert", cfg, {}, "pytorch_model.bin")
    (directory / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        from_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        from_pretrained(directory)


def test_config_errors():
    with pytest.raises(ConfigError, match="not a multiple"):
        BertConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ConfigError, match="attention_backend"):
        bert_tiny(attention_backend="flash")


# --- fused add-bias + residual + LayerNorm -----------------------------------------------------------------------

def test_add_layernorm_reference_is_post_ln():
    torch.manual_seed(0)
    x, res = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    w, b, xb = (torch.randn(16, dtype=torch.float64) for _ in range(3))
    ln = torch.nn.LayerNorm(16, eps=1e-12, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(w), ln.bias.copy_(b)
        expected = ln(x + xb + res)
    torch.testing.assert_close(add_layernorm(x, res, w, b, 1e-12, x_bias=xb), expected)


def test_add_layernorm_triton_matches_reference():
    if not torch.cuda.is_available() and (_TRITON_ALREADY_COMPILED or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 could be set")
    pytest.importorskip("triton")
    import importlib

    from shared.kernels.fused_layernorm import triton_layernorm

    module = triton_layernorm if torch.cuda.is_available() else importlib.reload(triton_layernorm)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        x, res = (torch.randn(7, 48, device=device).to(dtype) for _ in range(2))  # 48: a ragged 64-wide block
        w, b, xb = (torch.randn(48, device=device).to(dtype) for _ in range(3))
        for bias in (xb, None):
            got = module.add_layernorm_triton(x, res, w, b, 1e-12, bias)
            expected = add_layernorm_reference(x.double(), res.double(), w.double(), b.double(), 1e-12,
                                               None if bias is None else bias.double())
            assert got.dtype == dtype
            assert (got.double() - expected).abs().max() < tolerance * expected.abs().max()


# --- data -----------------------------------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORMERLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_real_text(root, n: int = 60):
    root.mkdir()
    words = "the of a river city was in and to is his first year war king born".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 9)) + "." for i in range(n)]
    (root / "train.txt").write_text("\n".join(lines) + "\n\n")
    (root / "validation.txt").write_text("\n".join(lines[:10]) + "\n")
    return root


def test_real_text_layout_masking_and_batches(tmp_path, cache):
    from projects.bytetransformer.data import SentenceMLMData

    data = SentenceMLMData(source="real", root=str(write_real_text(tmp_path / "text")), vocab_size=80,
                           max_length=8, batch_size=4, eval_batch_size=4)
    data.setup()
    assert set(data.datasets) == {"train", "val"} and len(data.datasets["train"]) == 60
    vocab_file = next(cache.rglob("vocab.txt"))
    assert vocab_file.read_text().split("\n")[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    batch = next(iter(data.val_dataloader()))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= 8
    lengths = mask.sum(1)
    assert torch.all(ids[:, 0] == data.specials["[CLS]"])
    assert torch.all(ids[torch.arange(4), lengths - 1] == data.specials["[SEP]"])
    assert torch.all(ids[mask == 0] == data.specials["[PAD]"]) and torch.all(labels[mask == 0] == -100)
    assert torch.all((labels != -100).sum(1) >= 1)
    # evaluation masks are fixed by the sample index
    again = next(iter(data.val_dataloader()))
    assert torch.equal(again["input_ids"], ids) and torch.equal(again["labels"], labels)


def test_masking_follows_bert_proportions():
    from projects.bytetransformer.data import MaskedSentences

    specials = {"[PAD]": 0, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    data = MaskedSentences([list(range(10, 110))] * 400, specials, vocab_size=200, max_length=102)
    chosen = masked = kept = 0
    for index in range(400):
        ids, labels = data[(index, 1000 + index)]
        body, target = ids[1:-1], labels[1:-1]
        picked = target != -100
        chosen += int(picked.sum())
        masked += int((body[picked] == 4).sum())
        kept += int((body[picked] == target[picked]).sum())
    assert chosen == 400 * 15  # round(0.15 * 100) positions per sentence
    assert abs(masked / chosen - 0.8) < 0.03 and abs(kept / chosen - 0.1 - 0.1 / 200) < 0.03


def test_tokenizer_is_deterministic_and_cached(tmp_path, monkeypatch):
    from projects.bytetransformer.data import wordpiece_tokenizer

    sentences = [f"the river {w} flows into the sea near the city of {w}" for w in
                 ("alba", "brenna", "corrin", "dalva", "elmo", "farra")] * 5
    vocabularies = []
    for run in ("a", "b"):
        monkeypatch.setenv("FORMERLAB_CACHE", str(tmp_path / run))
        wordpiece_tokenizer(sentences, None, 60)
        vocabularies.append(next((tmp_path / run).rglob("vocab.txt")).read_text())
    assert vocabularies[0] == vocabularies[1]
    tokenizer = wordpiece_tokenizer(sentences, None, 60)  # from the cache of run "b"
    assert tokenizer.get_vocab_size() <= 60 and tokenizer.token_to_id("[MASK]") == 4


def test_pretrained_vocab_is_used(tmp_path, cache):
    from projects.bytetransformer.data import SentenceMLMData

    directory = write_hf_directory(tmp_path / "bert", small_config(), {})
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    data = SentenceMLMData(source="real", root=str(write_real_text(tmp_path / "text")), vocab=str(directory))
    data.setup()
    assert data.tokenizer_vocab_size == 7 and data.specials["[MASK]"] == 4
    assert not cache.exists() or not any(cache.rglob("vocab.txt"))  # nothing trained


def test_data_errors(tmp_path):
    from projects.bytetransformer.data import SentenceMLMData

    with pytest.raises(ConfigError, match="data.root"):
        SentenceMLMData(source="real")
    root = tmp_path / "text"
    root.mkdir()
    (root / "train.txt").write_text("one line here.\n")
    with pytest.raises(DatasetError, match=r"validation.txt: missing; expected <root>/train.txt"):
        SentenceMLMData(source="real", root=str(root)).setup()
    with pytest.raises(DatasetError, match="no vocab.txt"):
        SentenceMLMData(source="real", root=str(write_real_text(tmp_path / "t2")), vocab=str(tmp_path)).setup()


# --- the project config and a short pre-training run ------------------------------------------------------------

def compose_project(*overrides: str):
    from hydra import compose, initialize_config_dir

    from shared.lit.registry import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["project=bytetransformer", *overrides])


def test_project_config_builds_and_pretrained_passes_the_vocab(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_project()
    assert cfg.model.vocab_size == cfg.data.vocab_size and cfg.data.vocab is None
    module = instantiate(cfg.model, _convert_="all")
    assert module.model.config.vocab_size == 4096 and module.model.config.num_hidden_layers == 2
    cfg = compose_project(f"model.pretrained={tmp_path}")
    assert cfg.data.vocab == str(tmp_path)  # the checkpoint's vocab.txt tokenises the data


def test_module_loads_pretrained_weights_once_when_training_starts(tmp_path):
    from projects.bytetransformer.module import MaskedLM

    cfg = small_config()
    source = BertForMaskedLM(cfg)
    directory = write_hf_directory(tmp_path / "bert", cfg, source.state_dict())
    arch = {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "intermediate_size", "max_position_embeddings")}
    module = MaskedLM(config="tiny", vocab_size=cfg.vocab_size, pretrained=str(directory), overrides=arch)
    assert not torch.equal(module.model.cls.predictions.transform.dense.weight,
                           source.cls.predictions.transform.dense.weight)
    module.setup("fit")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(module.model.state_dict()[key], value)
    with torch.no_grad():
        module.model.cls.predictions.bias.fill_(1.0)  # "trained"
    module.setup("test")  # after fit, the runner's test must see the trained weights, not the file's again
    assert torch.all(module.model.cls.predictions.bias == 1.0)
    wrong = MaskedLM(config="tiny", vocab_size=cfg.vocab_size, pretrained=str(directory),
                     overrides={**arch, "num_attention_heads": 2})
    with pytest.raises(CheckpointError, match="num_attention_heads: config.json 4 vs model 2"):
        wrong.setup("fit")


def test_short_pretraining_beats_chance(tmp_path, cache):
    """Masked-LM loss on held-out sentences falls well below chance (ln vocab) within 120 steps."""
    import lightning.pytorch as pl

    from projects.bytetransformer.data import SentenceMLMData
    from projects.bytetransformer.module import MaskedLM

    torch.manual_seed(0)
    data = SentenceMLMData(vocab_size=1024, max_length=48, batch_size=32, eval_batch_size=128)
    module = MaskedLM(config="tiny", vocab_size=1024, overrides={"num_hidden_layers": 1},
                      optimizer={"name": "adamw", "lr": 2e-3, "weight_decay": 0.01},
                      scheduler={"name": "constant", "warmup_steps": 10})
    trainer = pl.Trainer(accelerator="cpu", max_steps=120, limit_val_batches=4, val_check_interval=None,
                         check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         use_distributed_sampler=False, default_root_dir=str(tmp_path))
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    chance = math.log(1024)
    assert before > chance - 0.5
    assert after["val/loss"] < chance - 1.0, f"val/loss {after['val/loss']:.3f}, chance {chance:.3f}"
    assert after["val/accuracy"] > 20 / 1024  # twenty times a uniform guess
