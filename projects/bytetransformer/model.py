"""A padding-free BERT (ByteTransformer, Zhai et al. 2023) that is exactly Hugging Face's `BertModel`.

The architecture is BERT's (Devlin et al. 2019): word + position + token-type embeddings and LayerNorm, post-LN
layers (self-attention, add & LayerNorm, GELU feed-forward, add & LayerNorm), a tanh pooler on the first token,
and the masked-LM head whose decoder is tied to the word embeddings. Module and parameter names follow
`transformers`' BertModel / BertForMaskedLM, so their state dicts load strictly (`load_hf_state_dict`).

What ByteTransformer changes is where the work happens ("padding-free algorithm"):
1. the attention mask's prefix sum gives `cu_seqlens`, and the valid tokens of the padded (B, L) batch are
   packed once into a (total_tokens, d) tensor (`shared.kernels.varlen_attention.pack_info`);
2. every layer runs on those tokens only: the QKV projection is one fused GEMM, attention is variable-length
   attention within each sequence (`varlen_attention`: no (B, H, L, L) scores, no padding), and each sub-layer
   ends in one fused add-bias + residual + LayerNorm (`shared.kernels.fused_layernorm`);
3. the result is scattered back to (B, L, d) at the end, zeros at padded positions (BERT's own padded positions
   hold values nobody reads).

The forward takes a `capacity` so that every shape depends on (B, L, capacity) only: `inference.py` captures
the whole forward in CUDA graphs per token bucket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.kernels.fused_layernorm import add_layernorm
from shared.kernels.varlen_attention import BACKENDS, PackInfo, pack, pack_info, unpack, varlen_attention
from shared.lit.errors import CheckpointError, ConfigError


@dataclass
class BertConfig:
    """BERT's hyper-parameters under Hugging Face's names, plus the attention backend (ours)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not a multiple of "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.attention_backend not in BACKENDS:
            raise ConfigError(f"attention_backend={self.attention_backend!r} is not one of {BACKENDS}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json", **overrides: Any) -> BertConfig:
        """Our config from a Hugging Face `config.json` dict; features this BERT does not implement are refused.
        `attention_probs_dropout_prob` is not read: the varlen kernels have no attention dropout (README)."""
        if hf.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r}; only BERT's exact 'gelu' is implemented")
        if hf.get("position_embedding_type", "absolute") not in (None, "absolute"):
            raise CheckpointError(f"{source}: position_embedding_type={hf['position_embedding_type']!r}; "
                                  "only 'absolute' is implemented")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise CheckpointError(f"{source}: a decoder / cross-attention BERT is not an encoder this model runs")
        names = {f.name for f in fields(cls)} - {"attention_backend"}
        values = {k: hf[k] for k in names if hf.get(k) is not None}
        return cls(**{**values, **overrides})


# Paper configurations (timm style: literal hyper-parameters). BERT-base is what ByteTransformer benchmarks.
def bert_base(**overrides: Any) -> BertConfig:
    """BERT-base: 12 layers, 12 heads x 64 = 768 hidden, FFN 3072 (109,482,240 parameters with the pooler)."""
    return BertConfig(**{**dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072), **overrides})


def bert_large(**overrides: Any) -> BertConfig:
    """BERT-large: 24 layers, 16 heads x 64 = 1024 hidden, FFN 4096 (335,141,888 parameters with the pooler)."""
    return BertConfig(**{**dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                intermediate_size=4096), **overrides})


def bert_tiny(**overrides: Any) -> BertConfig:
    """A CPU-sized BERT for the embedded-data run: 2 layers, 2 heads x 64 = 128 hidden, FFN 512, 4096 tokens,
    no dropout (a few minutes of training are far from over-fitting)."""
    return BertConfig(**{**dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=512, max_position_embeddings=128, hidden_dropout_prob=0.0),
                         **overrides})


MODEL_CONFIGS = {"bert_base": bert_base, "bert_large": bert_large, "tiny": bert_tiny}


def model_config(name: str, **overrides: Any) -> BertConfig:
    """The named paper configuration (`MODEL_CONFIGS`) with `overrides` applied."""
    if name not in MODEL_CONFIGS:
        raise ConfigError(f"model.config={name!r} is not one of {sorted(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[name](**overrides)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout; applied to packed tokens."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """(T,) ids -> (T, d)."""
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = self.LayerNorm(x + self.position_embeddings(position_ids))
        return self.dropout(x)


_QKV = ("query", "key", "value")


class BertSelfAttention(nn.Module):
    """Multi-head self-attention within each packed sequence.

    BERT's query, key and value projections are one (3d, d) GEMM here, as in ByteTransformer; the state dict
    still shows Hugging Face's three `query` / `key` / `value` Linears (split on save, concatenated on load).
    """

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.backend = cfg.attention_backend
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.register_state_dict_post_hook(_split_qkv)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """(T, d) -> (T, d)."""
        tokens = x.shape[0]
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)  # each (T, nh, hd)
        context = varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend=self.backend)  # (T, nh, hd)
        return context.reshape(tokens, self.num_heads * self.head_dim)  # (T, d)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        names = [f"{prefix}{n}.{p}" for n in _QKV for p in ("weight", "bias")]
        if all(name in state_dict for name in names):
            for p in ("weight", "bias"):
                state_dict[f"{prefix}qkv.{p}"] = torch.cat([state_dict.pop(f"{prefix}{n}.{p}") for n in _QKV])
        super()._load_from_state_dict(state_dict, prefix, *args)


def _split_qkv(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    weights = state_dict.pop(f"{prefix}qkv.weight").chunk(3)
    biases = state_dict.pop(f"{prefix}qkv.bias").chunk(3)
    for name, weight, bias in zip(_QKV, weights, biases):  # Hugging Face's order: query.weight, query.bias, ...
        state_dict[f"{prefix}{name}.weight"] = weight.clone()
        state_dict[f"{prefix}{name}.bias"] = bias.clone()


class _AddNorm(nn.Module):
    """A post-LN sub-layer's end: LayerNorm(dropout(dense(h)) + residual), fused when there is no dropout."""

    def __init__(self, d_in: int, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        ln = self.LayerNorm
        if self.training and self.dropout.p > 0:
            return add_layernorm(self.dropout(self.dense(h)), residual, ln.weight, ln.bias, ln.eps)
        # The bias joins the residual add inside the LayerNorm kernel instead of a GEMM epilogue of its own.
        return add_layernorm(F.linear(h, self.dense.weight), residual, ln.weight, ln.bias, ln.eps,
                             x_bias=self.dense.bias)


class BertSelfOutput(_AddNorm):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__(cfg.hidden_size, cfg)


class BertOutput(_AddNorm):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__(cfg.intermediate_size, cfg)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        return self.output(self.self(x, cu_seqlens, max_seqlen), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"; the bias rides in the GEMM epilogue


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """(T, d) packed tokens -> (T, d)."""
        x = self.attention(x, cu_seqlens, max_seqlen)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        for layer in self.layer:
            x = layer(x, cu_seqlens, max_seqlen)
        return x


class BertPooler(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, sequence_output: Tensor) -> Tensor:
        """(B, L, d) -> (B, d): tanh(W h_0 + b) on the first ([CLS]) position."""
        return torch.tanh(self.dense(sequence_output[:, 0]))


class BertOutputs(NamedTuple):
    last_hidden_state: Tensor  # (B, L, d), zeros at padded positions
    pooler_output: Tensor | None  # (B, d)


def _init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm, a zero padding embedding."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BertModel(nn.Module):
    """BERT's encoder on packed tokens; Hugging Face `BertModel`'s parameters and outputs (valid tokens)."""

    def __init__(self, cfg: BertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if add_pooling_layer else None
        with torch.no_grad():
            self.apply(lambda m: _init_weights(m, cfg.initializer_range))

    def pack(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
             *, capacity: int | None = None, max_seqlen: int | None = None) -> tuple[Tensor, PackInfo]:
        """Embed and encode the valid tokens of a padded batch: (B, L) ids -> ((capacity, d) packed, PackInfo)."""
        seqlen = input_ids.shape[1]
        if seqlen > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {seqlen} > max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        info = pack_info(attention_mask, capacity, max_seqlen)
        ids = pack(input_ids, info, pad_value=self.config.pad_token_id)  # (T,)
        positions = info.indices % seqlen  # (T,): BERT's absolute positions are the padded columns
        types = torch.zeros_like(ids) if token_type_ids is None else pack(token_type_ids, info)  # (T,)
        x = self.embeddings(ids, positions, types)  # (T, d)
        return self.encoder(x, info.cu_seqlens, info.max_seqlen), info

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                *, capacity: int | None = None, max_seqlen: int | None = None) -> BertOutputs:
        """(B, L) ids and mask -> last hidden state (B, L, d) and pooled (B, d).

        `capacity` (>= the number of valid tokens) fixes the packed size so no value is read back to the host;
        `max_seqlen` bounds the lengths (default: the longest, or L with a capacity).
        """
        packed, info = self.pack(input_ids, attention_mask, token_type_ids, capacity=capacity,
                                 max_seqlen=max_seqlen)
        sequence_output = unpack(packed, info)  # (B, L, d)
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        return BertOutputs(sequence_output, pooled)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """Transform, then the decoder tied to the word embeddings, with its own output bias (as Hugging Face)."""

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.decoder.weight = word_embeddings.weight
        self.bias = self.decoder.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictions(x)


class MaskedLMResult(NamedTuple):
    loss: Tensor  # mean cross-entropy over the masked tokens
    correct: Tensor  # number of masked tokens predicted right
    count: Tensor  # number of masked tokens


class BertForMaskedLM(nn.Module):
    """BERT with the masked-LM head (Devlin et al. 2019 §3.1, task 1); Hugging Face `BertForMaskedLM`'s layout."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(cfg, self.bert.embeddings.word_embeddings)
        with torch.no_grad():  # the decoder's weight is the (already initialised) word embedding table
            self.cls.predictions.transform.apply(lambda m: _init_weights(m, cfg.initializer_range))
            self.cls.predictions.bias.zero_()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """(B, L) -> logits (B, L, vocab); padded positions get the logits of a zero hidden state."""
        sequence_output = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        return self.cls(sequence_output)

    def masked_lm_loss(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                       token_type_ids: Tensor | None = None) -> MaskedLMResult:
        """Cross-entropy on the tokens whose label is not -100; the head runs on those packed tokens only."""
        packed, info = self.bert.pack(input_ids, attention_mask, token_type_ids)
        targets = pack(labels, info, pad_value=-100)  # (T,)
        chosen = targets != -100
        logits = self.cls(packed[chosen])  # (M, vocab)
        targets = targets[chosen]
        loss = F.cross_entropy(logits.float(), targets)
        correct = (logits.argmax(-1) == targets).sum()
        return MaskedLMResult(loss, correct, targets.new_tensor(targets.numel()))

    def forward_flops(self, tokens: float, masked: float, seqlen_sq: float) -> float:
        """Forward FLOPs of a sample with `tokens` tokens (sum of squared lengths `seqlen_sq`), `masked` of them
        predicted: 2 per multiply-add of the encoder's GEMMs and attention products, and of the head."""
        c = self.config
        d, layers = c.hidden_size, c.num_hidden_layers
        per_token = layers * 2 * (4 * d * d + 2 * d * c.intermediate_size)
        attention = layers * 4 * seqlen_sq * d
        head = 2 * (d * d + d * c.vocab_size)
        return per_token * tokens + attention + head * masked


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints

# The fields that decide what a state dict means (the rest, such as dropout, only change training).
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "type_vocab_size", "layer_norm_eps")

# Renames Hugging Face itself applies when it loads old (TF-converted) BERT checkpoints.
_LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}
# Keys of BERT checkpoints that are no parameters of ours: the next-sentence head of BertForPreTraining and the
# position-id buffer older `transformers` saved.
_DROPPED_PREFIXES = ("cls.seq_relationship.",)
_DROPPED_SUFFIXES = ("embeddings.position_ids",)


def convert_hf_state_dict(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A Hugging Face BERT state dict (BertModel, BertForMaskedLM or BertForPreTraining) in `model`'s key layout.

    Only documented differences are bridged: legacy `gamma`/`beta` names, the `bert.` prefix, the next-sentence
    head and the pooler of a pre-training checkpoint when `model` has neither, the position-id buffer, and the MLM
    decoder that Hugging Face ties to the word embeddings (its weight and bias may be absent from a file).
    Everything else must match exactly; `load_hf_state_dict` checks it.
    """
    sd: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for old, new in _LEGACY_SUFFIXES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        if key.startswith(_DROPPED_PREFIXES) or key.endswith(_DROPPED_SUFFIXES):
            continue
        sd[key] = value
    has_prefix = any(k.startswith("bert.") for k in sd)
    if isinstance(model, BertForMaskedLM):
        if not has_prefix:
            sd = {("bert." + k if not k.startswith("cls.") else k): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith("bert.pooler.")}  # BertForMaskedLM has no pooler
        word = sd.get("bert.embeddings.word_embeddings.weight")
        if word is not None:
            sd["cls.predictions.decoder.weight"] = word  # tied, as Hugging Face ties it after loading
        if "cls.predictions.bias" not in sd and "cls.predictions.decoder.bias" in sd:
            sd["cls.predictions.bias"] = sd["cls.predictions.decoder.bias"]
        if "cls.predictions.bias" in sd:
            sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    elif has_prefix:  # a BertForMaskedLM / BertForPreTraining file loaded into the bare encoder
        sd = {k[len("bert."):]: v for k, v in sd.items() if not k.startswith("cls.")}
    return sd


def load_hf_state_dict(model: nn.Module, state_dict: dict[str, Tensor], source: str = "state_dict") -> None:
    """Load a Hugging Face BERT state dict strictly, or raise one CheckpointError naming what does not fit."""
    sd = convert_hf_state_dict(state_dict, model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}"
                              f"({model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
                              f"vocab {model.config.vocab_size}): {'; '.join(problems)}")
    model.load_state_dict(sd, strict=True)


def read_hf_weights(directory: str | Path) -> dict[str, Tensor]:
    """The state dict of a Hugging Face model directory: model.safetensors (needs the `safetensors` package) or
    pytorch_model.bin (read with weights_only=True), either possibly sharded with an `.index.json`."""
    root = Path(directory)
    candidates = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json"]
    found = [name for name in candidates if (root / name).is_file()]
    try:
        import safetensors.torch as st
    except ImportError:
        st = None
        found = [name for name in found if "safetensors" not in name] or found
    if not found:
        raise CheckpointError(f"{root}: no weights found; expected one of {', '.join(candidates)}")
    name = found[0]
    if "safetensors" in name and st is None:
        raise CheckpointError(f"{root / name}: reading .safetensors needs `pip install safetensors` "
                              "(or save the model as pytorch_model.bin)")
    shards = [name]
    if name.endswith(".index.json"):
        shards = sorted(set(json.loads((root / name).read_text())["weight_map"].values()))
    state: dict[str, Tensor] = {}
    for shard in shards:
        path = root / shard
        try:
            if shard.endswith(".safetensors"):
                state.update(st.load_file(str(path), device="cpu"))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, ValueError) as err:
            reason = str(err).splitlines()[0][:200]
            raise CheckpointError(f"{path}: cannot be read as a weights file ({reason})") from None
    return state


def read_hf_config(directory: str | Path, **overrides: Any) -> BertConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a BERT directory holds config.json, the weights and vocab.txt")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    return BertConfig.from_hf(hf, source=str(path), **overrides)


def from_pretrained(directory: str | Path, mlm: bool = False, **overrides: Any) -> BertModel | BertForMaskedLM:
    """Our BERT built from a local Hugging Face directory (config.json + weights) with its weights loaded."""
    cfg = read_hf_config(directory, **overrides)
    model = BertForMaskedLM(cfg) if mlm else BertModel(cfg)
    load_hf_state_dict(model, read_hf_weights(directory), source=str(directory))
    return model

