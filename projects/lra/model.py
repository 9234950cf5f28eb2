"""The Long Range Arena Transformer (Tay et al., ICLR 2021, §4; the Flax `TransformerEncoder` of the official code).

A byte / token / pixel sequence is embedded (`N(0, 1)` table, no scaling), a zero-initialised CLS token is
prepended when the head pools CLS, fixed sinusoidal (or learned) positions are added, and pre-LN blocks follow:

    x = x + Dropout(Attention(LayerNorm(x)))          attention projections without bias, attention dropout
    x = x + Dropout(Dense(GELU(Dense(LayerNorm(x)))))  dropout after the GELU and after the second Dense

then a final LayerNorm and the classifier: pool (CLS token or the mean over all positions) -> Dense(mlp_dim) ->
ReLU -> Dense(classes). Retrieval encodes both documents with the same encoder and classifies
[e1, e2] (or [e1, e2, e1 * e2, e1 - e2], `interaction="NLI"`) with Dense(mlp) -> ReLU -> Dense(mlp / 2) -> ReLU ->
Dense(2).

As in the official code, token id 0 is padding for attention in every task (`inputs > 0`), which for Image and
Pathfinder also masks black pixels as keys; MEAN pooling averages every position, padding included. The attention
is any variant of `shared.blocks.attention`, chosen by `attention={"name": ..., **options}`.

The paper configurations are the factories at the end (the released per-task configs, not the paper's prose,
which says 6 layers / 512 / 2048 for every task).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from shared.blocks.attention import build_attention

POOLS = ("CLS", "MEAN")


def sinusoidal_table(max_len: int, dim: int) -> Tensor:
    """The official fixed position table (max_len, dim): sin on even channels, cos on odd ones."""
    position = np.arange(max_len)[:, None]
    div = np.exp(np.arange(0, dim, 2) * -(math.log(10000.0) / dim))
    table = np.zeros((max_len, dim), dtype=np.float32)
    table[:, 0::2] = np.sin(position * div)
    table[:, 1::2] = np.cos(position * div)
    return torch.from_numpy(table)


class MlpBlock(nn.Module):
    """Dense(mlp_dim) -> GELU (tanh form, Flax's default) -> Dropout -> Dense(dim) -> Dropout."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + Dropout(Attention(LN(x), mask)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, qkv_dim: int, mlp_dim: int, dropout: float, attn_dropout: float,
                 attention: dict[str, Any], max_len: int) -> None:
        super().__init__()
        options = dict(attention)
        name = options.pop("name")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = build_attention(name, dim, num_heads, qkv_dim=qkv_dim, bias=False, attn_drop=attn_dropout,
                                    max_len=max_len, **options)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MlpBlock(dim, mlp_dim, dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """Tokens (B, N) -> encodings (B, N [+1 CLS], C) after the final LayerNorm.

    Args:
        vocab_size: ids 0..vocab_size-1; id `pad_id` marks padding (None: no position is masked).
        emb_dim, num_heads, num_layers, qkv_dim, mlp_dim: the LRA config names.
        max_len: the longest input; the position table has max_len (+1 with CLS) rows.
        dropout, attn_dropout: LRA's dropout_rate and attention_dropout_rate.
        learn_pos_emb: learned positions (N(0, 0.02)) instead of the fixed sinusoidal table.
        embed_std: the token embeddings' initial standard deviation (official: 1).
        zero_padding_outputs: set the encodings of padding positions to zero after the final LayerNorm, so that MEAN
            pooling sums the unmasked tokens only (over the full length); the Nystromformer LRA code does this.
        cls_token: prepend a learned CLS token (the CLS pooling of the classifier).
        attention: {"name": variant, **options} of `shared.blocks.attention` (default: softmax).
    """

    def __init__(self, vocab_size: int, emb_dim: int = 512, num_heads: int = 8, num_layers: int = 6,
                 qkv_dim: int = 512, mlp_dim: int = 2048, max_len: int = 512, dropout: float = 0.1,
                 attn_dropout: float = 0.1, learn_pos_emb: bool = False, embed_std: float = 1.0,
                 zero_padding_outputs: bool = False, cls_token: bool = False,
                 attention: dict[str, Any] | None = None, pad_id: int | None = 0) -> None:
        super().__init__()
        self.max_len, self.pad_id = max_len, pad_id
        self.embed_std, self.zero_padding_outputs = embed_std, zero_padding_outputs
        table_len = max_len + int(cls_token)
        self.embed = nn.Embedding(vocab_size, emb_dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, emb_dim)) if cls_token else None
        if learn_pos_emb:
            self.pos_embedding = nn.Parameter(torch.empty(1, table_len, emb_dim))
        else:
            self.register_buffer("pos_embedding", sinusoidal_table(table_len, emb_dim)[None], persistent=False)
        self.drop = nn.Dropout(dropout)
        attention = attention or {"name": "softmax"}
        self.blocks = nn.ModuleList(
            TransformerBlock(emb_dim, num_heads, qkv_dim, mlp_dim, dropout, attn_dropout, attention, table_len)
            for _ in range(num_layers))
        self.encoder_norm = nn.LayerNorm(emb_dim, eps=1e-6)

    def forward(self, tokens: Tensor) -> Tensor:
        b, n = tokens.shape
        if n > self.max_len:
            raise ValueError(f"input has {n} tokens, the model was built for max_len={self.max_len}")
        mask = None if self.pad_id is None else tokens != self.pad_id  # (B, N)
        if mask is not None and not mask.is_meta and not torch.compiler.is_compiling() and bool(mask.all()):
            mask = None  # nothing to mask: lets SDPA take its fastest kernels (eager only: a graph break compiled)
        x = self.embed(tokens)  # (B, N, C)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1)  # (B, N + 1, C)
            if mask is not None:
                mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)  # (B, N + 1)
        x = self.drop(x + self.pos_embedding[:, : x.shape[1]])
        for block in self.blocks:
            x = block(x, mask)
        x = self.encoder_norm(x)
        if self.zero_padding_outputs and mask is not None:
            x = x * mask[..., None].to(x.dtype)
        return x

    def no_weight_decay(self) -> set[str]:
        return {"pos_embedding", "cls"}


def pool(encoded: Tensor, mode: str) -> Tensor:
    """(B, N, C) -> (B, C): the CLS position, or the mean over every position (the official `classifier_head`)."""
    return encoded[:, 0] if mode == "CLS" else encoded.mean(dim=1)


class LRAClassifier(nn.Module):
    """Encoder + LRA classifier head: pool -> Dense(mlp_dim) -> ReLU -> Dense(num_classes)."""

    def __init__(self, vocab_size: int, num_classes: int, *, pool: str = "CLS", mlp_dim: int = 2048,
                 **encoder: Any) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r} is not one of {POOLS}")
        self.pool_mode = pool
        self.encoder = TransformerEncoder(vocab_size, mlp_dim=mlp_dim, cls_token=pool == "CLS", **encoder)
        emb_dim = self.encoder.embed.embedding_dim
        self.mlp = nn.Linear(emb_dim, mlp_dim)
        self.logits = nn.Linear(mlp_dim, num_classes)
        init_lra_weights(self)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, N) int64 -> logits (B, num_classes)."""
        return self.logits(torch.relu(self.mlp(pool(self.encoder(tokens), self.pool_mode))))


class LRAMatcher(nn.Module):
    """Two-tower retrieval model: one encoder for both documents, then the official `classifier_head_dual`."""

    def __init__(self, vocab_size: int, num_classes: int = 2, *, pool: str = "CLS", mlp_dim: int = 2048,
                 interaction: str | None = None, **encoder: Any) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r} is not one of {POOLS}")
        if interaction not in (None, "NLI"):
            raise ValueError(f"interaction={interaction!r} is not None or 'NLI'")
        self.pool_mode, self.interaction = pool, interaction
        self.encoder = TransformerEncoder(vocab_size, mlp_dim=mlp_dim, cls_token=pool == "CLS", **encoder)
        emb_dim = self.encoder.embed.embedding_dim
        self.mlp = nn.Linear(emb_dim * (4 if interaction == "NLI" else 2), mlp_dim)
        self.mlp2 = nn.Linear(mlp_dim, mlp_dim // 2)
        self.logits = nn.Linear(mlp_dim // 2, num_classes)
        init_lra_weights(self)

    def forward(self, tokens1: Tensor, tokens2: Tensor) -> Tensor:
        """tokens1, tokens2 (B, N) int64 -> logits (B, num_classes); both documents go through one batch."""
        b = tokens1.shape[0]
        n = max(tokens1.shape[1], tokens2.shape[1])
        both = torch.cat([nn.functional.pad(tokens1, (0, n - tokens1.shape[1])),
                          nn.functional.pad(tokens2, (0, n - tokens2.shape[1]))])  # (2B, N)
        e1, e2 = pool(self.encoder(both), self.pool_mode).split(b)  # (B, C) each
        parts = [e1, e2, e1 * e2, e1 - e2] if self.interaction == "NLI" else [e1, e2]
        x = torch.relu(self.mlp(torch.cat(parts, dim=-1)))
        return self.logits(torch.relu(self.mlp2(x)))


def _lecun_normal_(weight: Tensor) -> None:
    # Flax's default Dense kernel init: truncated normal (+-2 std) with variance 1 / fan_in after truncation.
    std = (1.0 / weight.shape[1]) ** 0.5 / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


@torch.no_grad()
def init_lra_weights(model: nn.Module) -> None:
    """The official initialisers: embeddings N(0, 1) (`embed_std`); CLS zeros; learned positions N(0, 0.02);
    attention and MLP kernels Xavier-uniform with MLP biases N(0, 1e-6); classifier Dense layers LeCun-normal with
    zero biases; LayerNorms ones / zeros. Parameters a variant adds keep the variant's own initialisation."""
    for module in model.modules():
        if isinstance(module, TransformerEncoder):
            nn.init.normal_(module.embed.weight, std=module.embed_std)
            if isinstance(module.pos_embedding, nn.Parameter):
                nn.init.normal_(module.pos_embedding, std=0.02)
        elif isinstance(module, TransformerBlock):
            for name in ("query", "key", "value", "out"):
                projection = getattr(module.attn, name, None)
                if isinstance(projection, nn.Linear):
                    nn.init.xavier_uniform_(projection.weight)
        elif isinstance(module, MlpBlock):
            for linear in (module.fc1, module.fc2):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.normal_(linear.bias, std=1e-6)
    for name in ("mlp", "mlp2", "logits"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            _lecun_normal_(head.weight)
            nn.init.zeros_(head.bias)


# ----------------------------------------------------------------------------------------------------------------
# Paper configurations: the released `configs/*/transformer_base.py` of each task.


def listops_transformer(**kwargs: Any) -> LRAClassifier:
    """ListOps: 4 layers, 512 wide, 8 heads, MLP 1024, CLS, sinusoidal; 8,948,746 parameters."""
    config = dict(vocab_size=17, num_classes=10, emb_dim=512, num_heads=8, num_layers=4, qkv_dim=512, mlp_dim=1024,
                  max_len=2000, dropout=0.1, attn_dropout=0.1, pool="CLS", learn_pos_emb=False)
    return LRAClassifier(**{**config, **kwargs})


def text_transformer(**kwargs: Any) -> LRAClassifier:
    """Byte-level IMDb: 4 layers, 256 wide, 4 heads, MLP 1024, CLS; 3,486,722 parameters. The released config
    reads 1000 bytes, the paper 4K; the table here covers 4096."""
    config = dict(vocab_size=257, num_classes=2, emb_dim=256, num_heads=4, num_layers=4, qkv_dim=256, mlp_dim=1024,
                  max_len=4096, dropout=0.1, attn_dropout=0.1, pool="CLS", learn_pos_emb=False)
    return LRAClassifier(**{**config, **kwargs})


def retrieval_transformer(**kwargs: Any) -> LRAMatcher:
    """AAN retrieval, two towers of one encoder: 4 layers, 128 wide, 4 heads, MLP 512, 4000 bytes per document,
    head on [e1, e2] (the official default interaction); 1,087,746 parameters."""
    config = dict(vocab_size=257, num_classes=2, emb_dim=128, num_heads=4, num_layers=4, qkv_dim=128, mlp_dim=512,
                  max_len=4000, dropout=0.1, attn_dropout=0.1, pool="CLS", learn_pos_emb=False, interaction=None)
    return LRAMatcher(**{**config, **kwargs})


def image_transformer(**kwargs: Any) -> LRAClassifier:
    """Grey CIFAR-10 as 1024 pixel tokens: 1 layer, 128 wide, 8 heads of 8, MLP 128, CLS, learned positions,
    dropout 0.3 / 0.2; 248,458 parameters."""
    config = dict(vocab_size=256, num_classes=10, emb_dim=128, num_heads=8, num_layers=1, qkv_dim=64, mlp_dim=128,
                  max_len=1024, dropout=0.3, attn_dropout=0.2, pool="CLS", learn_pos_emb=True)
    return LRAClassifier(**{**config, **kwargs})


def pathfinder32_transformer(**kwargs: Any) -> LRAClassifier:
    """Pathfinder 32x32: 4 layers, 32 wide, 4 heads of 4, MLP 32, MEAN pooling, sinusoidal, dropout 0.2 / 0.1;
    26,530 parameters."""
    config = dict(vocab_size=256, num_classes=2, emb_dim=32, num_heads=4, num_layers=4, qkv_dim=16, mlp_dim=32,
                  max_len=1024, dropout=0.2, attn_dropout=0.1, pool="MEAN", learn_pos_emb=False)
    return LRAClassifier(**{**config, **kwargs})


def pathfinder32_transformer_nystromformer(**kwargs: Any) -> LRAClassifier:
    """Pathfinder 32x32 as the softmax baseline of the Nystromformer LRA code (Xiong et al. 2021, `lra_config.py`;
    also xformers' LRA benchmark), where this model reaches ~74 % instead of the paper's 71.40: 2 layers, 64 wide,
    2 heads of 32, MLP 128, MEAN pooling over the unmasked pixels, learned positions, embeddings N(0, 0.02),
    dropout 0.1 / 0.1; 157,058 parameters (the original's q/k/v projections have biases and its vocabulary 512 ids,
    173,826)."""
    config = dict(vocab_size=256, num_classes=2, emb_dim=64, num_heads=2, num_layers=2, qkv_dim=64, mlp_dim=128,
                  max_len=1024, dropout=0.1, attn_dropout=0.1, pool="MEAN", learn_pos_emb=True, embed_std=0.02,
                  zero_padding_outputs=True)
    return LRAClassifier(**{**config, **kwargs})


def pathfinder64_transformer(**kwargs: Any) -> LRAClassifier:
    """Pathfinder 64x64: 2 layers, 32 wide, 4 heads, MLP 32, CLS, learned positions."""
    config = dict(vocab_size=256, num_classes=2, emb_dim=32, num_heads=4, num_layers=2, qkv_dim=32, mlp_dim=32,
                  max_len=4096, dropout=0.1, attn_dropout=0.1, pool="CLS", learn_pos_emb=True)
    return LRAClassifier(**{**config, **kwargs})


def pathfinder128_transformer(**kwargs: Any) -> LRAClassifier:
    """Path-X (Pathfinder 128x128, 16,384 tokens): 1 layer, 32 wide, 2 heads, MLP 32, MEAN, learned positions."""
    config = dict(vocab_size=256, num_classes=2, emb_dim=32, num_heads=2, num_layers=1, qkv_dim=16, mlp_dim=32,
                  max_len=16384, dropout=0.1, attn_dropout=0.1, pool="MEAN", learn_pos_emb=True)
    return LRAClassifier(**{**config, **kwargs})


def listops_tiny(**kwargs: Any) -> LRAClassifier:
    """A laptop-size ListOps model for the default CPU run (not a paper configuration)."""
    config = dict(vocab_size=17, num_classes=10, emb_dim=64, num_heads=4, num_layers=2, qkv_dim=64, mlp_dim=128,
                  max_len=2000, dropout=0.1, attn_dropout=0.1, pool="CLS", learn_pos_emb=False)
    return LRAClassifier(**{**config, **kwargs})


MODELS = {fn.__name__: fn for fn in (listops_transformer, text_transformer, retrieval_transformer, image_transformer,
                                     pathfinder32_transformer, pathfinder32_transformer_nystromformer,
                                     pathfinder64_transformer, pathfinder128_transformer,
                                     listops_tiny)}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """The configuration `name` of `MODELS`, with keyword overrides (e.g. `attention={"name": "performer"}`)."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
