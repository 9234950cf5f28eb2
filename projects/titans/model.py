"""Titans language models (Behrouz et al. 2025, §4): LMM, MAC, MAG, MAL, and the Transformer++ baseline.

Every variant is a stack of pre-norm residual blocks (§4.4: "in all blocks, we use residual connections"), each a
sequence mixer followed by a SwiGLU MLP, between a token embedding and an RMSNorm + linear head, so the variants
differ only in the mixer:

- "lmm":  x~ = [p_1..p_Np] || x,  o = M(x~)                                  (§4.3 "memory without attention")
- "mac":  per segment S(t): h_t = M*_{t-1}(q_t); y_t = Attn([p] || h_t || S(t)); M_t = M_{t-1}(y_t);
          o_t = y_t (x) M*_t(y_t)                                            (eqs. 21-25, Fig. 3a)
- "mag":  x~ = [p] || x,  y = SW-Attn*(x~),  o = y (x) M(x~)                 (eqs. 26-28, Fig. 3b)
- "mal":  x~ = [p] || x,  y = M(x~),  o = SW-Attn(y)                        (eqs. 29-31)
- "transformer": causal attention with RoPE (Transformer++, LLaMA's recipe).

Persistent memory tokens p (eq. 19) are per block; their outputs are dropped at the block's end. (x) is the
normalise-and-gate combination of §4.2 (`GatedCombine`). Named factories at the end give the configurations.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from projects.titans.memory import NeuralMemory
from shared.blocks.attention.segmented import SegmentedAttention
from shared.blocks.attention.sliding_window import SlidingWindowAttention
from shared.blocks.mlp import SwiGLU, llama_hidden_dim
from shared.blocks.norms import RMSNorm

VARIANTS = ("lmm", "mac", "mag", "mal", "transformer")
GATE_ACTS = {"sigmoid": torch.sigmoid, "silu": F.silu}


class GatedCombine(nn.Module):
    """o = y (x) m: "we normalize the outputs y and M(x~) using learnable vector-valued weights, followed by a
    non-linearity sigma(.)" (§4.2). The paper does not say which branch passes through sigma; `branch` chooses:
    "memory" (default): RMSNorm_y(y) * sigma(RMSNorm_m(m)); "attention": sigma(RMSNorm_y(y)) * RMSNorm_m(m)."""

    def __init__(self, dim: int, act: str = "sigmoid", branch: str = "memory") -> None:
        super().__init__()
        if act not in GATE_ACTS or branch not in ("memory", "attention"):
            raise ValueError(f"gate_act must be one of {list(GATE_ACTS)} and gate_branch 'memory' or 'attention'; "
                             f"got {act!r}, {branch!r}")
        self.norm_y, self.norm_m = RMSNorm(dim), RMSNorm(dim)
        self.act, self.branch = act, branch

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        y, m = self.norm_y(y), self.norm_m(m)
        sigma = GATE_ACTS[self.act]
        return y * sigma(m) if self.branch == "memory" else sigma(y) * m


class Block(nn.Module):
    """One pre-norm residual block of `variant`: x + mixer(norm(x)), then x + SwiGLU(norm(x)).

    Args:
        dim, num_heads: width and attention heads.
        variant: one of VARIANTS.
        mlp_hidden: SwiGLU inner width.
        window: sliding-window size of MAG / MAL attention (keys per query, itself included).
        segment_len: MAC's segment size C (a multiple of the memory's chunk size).
        num_persistent: N_p persistent memory tokens (0 = the "w/o persistent memory" ablation).
        memory: keyword arguments of `NeuralMemory` (depth, chunk_size, momentum, forgetting, conv, ...).
        gate_act, gate_branch: the (x) combination of MAC / MAG (`GatedCombine`).
        max_len: longest sequence (RoPE table).
        attn_backend: "auto" | "flex" | "sdpa".
    """

    def __init__(self, dim: int, num_heads: int, variant: str, mlp_hidden: int, window: int = 512,
                 segment_len: int = 512, num_persistent: int = 4, memory: dict[str, Any] | None = None,
                 gate_act: str = "sigmoid", gate_branch: str = "memory", max_len: int = 4096,
                 attn_backend: str = "auto") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.num_persistent = num_persistent if variant != "transformer" else 0
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)
        memory = dict(memory or {})
        memory.setdefault("num_heads", num_heads)
        self.persistent = nn.Parameter(torch.zeros(self.num_persistent, dim)) if self.num_persistent else None
        self.memory = NeuralMemory(dim, **memory) if variant != "transformer" else None
        if variant == "transformer":
            self.attn = SlidingWindowAttention(dim, num_heads, window=None, max_len=max_len, backend=attn_backend)
        elif variant == "mag":  # SW-Attn*: the persistent prefix stays visible (Fig. 3b)
            self.attn = SlidingWindowAttention(dim, num_heads, window=window, prefix=self.num_persistent,
                                               max_len=max_len + self.num_persistent, backend=attn_backend)
        elif variant == "mal":  # eq. 31: plain sliding-window attention over the memory's output
            self.attn = SlidingWindowAttention(dim, num_heads, window=window, max_len=max_len + self.num_persistent,
                                               backend=attn_backend)
        elif variant == "mac":
            chunk = self.memory.chunk_size
            if segment_len % chunk:
                raise ValueError(f"MAC segment_len={segment_len} must be a multiple of the memory chunk_size={chunk}")
            self.segment_len = segment_len
            self.attn = SegmentedAttention(dim, num_heads, segment_len=segment_len,
                                           max_len=segment_len + num_persistent, backend=attn_backend)
        else:
            self.attn = None
        self.combine = GatedCombine(dim, gate_act, gate_branch) if variant in ("mac", "mag") else None

    def _with_persistent(self, h: Tensor) -> Tensor:
        """x~ = [p_1 .. p_Np] || x (eq. 19): (B, T, C) -> (B, Np + T, C)."""
        if self.persistent is None:
            return h
        return torch.cat([self.persistent.to(h.dtype).expand(h.shape[0], -1, -1), h], dim=1)

    def mix(self, h: Tensor) -> Tensor:
        """The variant's sequence mixer on normalised tokens h (B, T, C) -> (B, T, C)."""
        n_p = self.num_persistent
        if self.variant == "transformer":
            return self.attn(h)
        if self.variant == "mac":
            return self._mac(h)
        ht = self._with_persistent(h)  # (B, Np + T, C)
        if self.variant == "lmm":
            return self.memory(ht)[:, n_p:]
        if self.variant == "mag":
            return self.combine(self.attn(ht), self.memory(ht))[:, n_p:]
        return self.attn(self.memory(ht))[:, n_p:]  # mal

    def _mac(self, h: Tensor) -> Tensor:
        """Memory as context, segment by segment (eqs. 21-25): the memory read for segment t uses the state after
        segment t - 1, which was written with that segment's attention outputs, so segments run in order."""
        mem = self.memory
        q_x, _ = mem.queries(h)  # (BH, T, d): q_t = S(t) W_Q for every segment at once (depends on x only)
        state = mem.initial_state(h.shape[0])
        cache = None
        outputs = []
        for start in range(0, h.shape[1], self.segment_len):
            seg = h[:, start:start + self.segment_len]  # S(t): (B, C, dim)
            h_t = mem.output(mem.recall(state, q_x[:, start:start + self.segment_len]), seg)  # eq. 21: (B, C, dim)
            y = self.attn(seg, memory=h_t, persistent=self.persistent)  # eqs. 22-23
            q_y, k, v, gates, cache = mem.write_inputs(y, cache)
            reads, state = mem.memorize(state, k, v, q_y, gates)  # eq. 24, and M*_t(y_t) token by token
            outputs.append(self.combine(y, mem.output(reads, y)))  # eq. 25
        return torch.cat(outputs, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mix(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TitansLM(nn.Module):
    """A causal language model: embedding -> blocks -> RMSNorm -> linear head (logits over `vocab_size`).

    Args:
        vocab_size: tokens.
        dim, depth, num_heads: width, blocks, attention heads.
        variant: "lmm" | "mac" | "mag" | "mal" | "transformer".
        mlp_hidden: SwiGLU inner width (default LLaMA's 8/3 dim rounded up to a multiple of 64).
        tie_embeddings: share the embedding and head matrices.
        **block_kw: window, segment_len, num_persistent, memory (a dict of NeuralMemory options), gate_act,
            gate_branch, max_len, attn_backend (see `Block`).
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, variant: str,
                 mlp_hidden: int | None = None, tie_embeddings: bool = False, **block_kw: Any) -> None:
        super().__init__()
        self.vocab_size, self.dim, self.depth, self.variant = vocab_size, dim, depth, variant
        mlp_hidden = mlp_hidden or llama_hidden_dim(dim, multiple_of=64)
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList([Block(dim, num_heads, variant, mlp_hidden, **block_kw) for _ in range(depth)])
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(self._init_weights)
        for m in self.modules():  # M_0 and the gate biases have their own initialisation
            if isinstance(m, NeuralMemory):
                m.reset_memory_parameters()
        if tie_embeddings:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, Block) and m.persistent is not None:
            nn.init.normal_(m.persistent, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab_size)."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------------------------------------
# Configurations. The paper gives total sizes (170M-760M) but neither widths nor depths. "tiny" runs on a laptop
# CPU (same depth for all variants); "small" (the benchmark size) and "340m" match parameter counts across the
# variants, as the paper's tables do, by depth: a hybrid block (attention + memory + MLP) is heavier than a
# Transformer++ block. "340m" uses the width of the 340M models of the Gated DeltaNet / FLA code base that Titans'
# training recipe follows (width 1024, Llama-2 vocabulary of 32,000, untied head); README.md lists the counts.
# At b = 64 a chunk's stale gradients add up (times 1 / (1 - eta) with momentum): with theta_max = 1 or 1/64 the
# deep memory of "small" diverged to NaN within 12 outer steps at lr 1.5e-3; theta_max = 0.0016 is TTT-MLP's
# bound on its per-token inner step (eta_base / d = 0.1 / 64, Sun et al. 2024), the paper giving none.
_MEMORY_B64 = dict(depth=2, expansion=2.0, chunk_size=64, theta_max=0.0016, theta_init=0.0004)

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, dim=128, num_heads=4, window=128, segment_len=128, num_persistent=4, max_len=1024,
                 depth=dict(transformer=2, lmm=2, mac=2, mag=2, mal=2),
                 memory=dict(depth=2, expansion=2.0, chunk_size=32)),
    "small": dict(vocab_size=256, dim=384, num_heads=6, window=256, segment_len=256, num_persistent=4, max_len=16384,
                  depth=dict(transformer=9, lmm=8, mac=6, mag=6, mal=6),
                  memory=_MEMORY_B64),
    "340m": dict(vocab_size=32000, dim=1024, num_heads=16, window=512, segment_len=512, num_persistent=4, max_len=4096,
                 depth=dict(transformer=24, lmm=20, mac=16, mag=16, mal=16),
                 memory=_MEMORY_B64),
}


def build_titans(variant: str, size: str, **overrides: Any) -> TitansLM:
    """A `variant` model of size `size`, with keyword overrides; `memory` overrides are merged key by key."""
    cfg = {**_SIZES[size], "variant": variant}
    cfg["depth"] = cfg["depth"][variant]
    memory = {**cfg.pop("memory"), **overrides.pop("memory", {})}
    if variant != "transformer":
        cfg["memory"] = memory
    else:
        for key in ("window", "segment_len", "num_persistent"):
            cfg.pop(key)
    return TitansLM(**{**cfg, **overrides})


def titans_lmm_tiny(**kw: Any) -> TitansLM:
    return build_titans("lmm", "tiny", **kw)


def titans_mac_tiny(**kw: Any) -> TitansLM:
    return build_titans("mac", "tiny", **kw)


def titans_mag_tiny(**kw: Any) -> TitansLM:
    return build_titans("mag", "tiny", **kw)


def titans_mal_tiny(**kw: Any) -> TitansLM:
    return build_titans("mal", "tiny", **kw)


def transformer_pp_tiny(**kw: Any) -> TitansLM:
    return build_titans("transformer", "tiny", **kw)


def titans_lmm_small(**kw: Any) -> TitansLM:
    return build_titans("lmm", "small", **kw)


def titans_mac_small(**kw: Any) -> TitansLM:
    return build_titans("mac", "small", **kw)


def titans_mag_small(**kw: Any) -> TitansLM:
    return build_titans("mag", "small", **kw)


def titans_mal_small(**kw: Any) -> TitansLM:
    return build_titans("mal", "small", **kw)


def transformer_pp_small(**kw: Any) -> TitansLM:
    return build_titans("transformer", "small", **kw)


def titans_lmm_340m(**kw: Any) -> TitansLM:
    return build_titans("lmm", "340m", **kw)


def titans_mac_340m(**kw: Any) -> TitansLM:
    return build_titans("mac", "340m", **kw)


def titans_mag_340m(**kw: Any) -> TitansLM:
    return build_titans("mag", "340m", **kw)


def titans_mal_340m(**kw: Any) -> TitansLM:
    return build_titans("mal", "340m", **kw)


def transformer_pp_340m(**kw: Any) -> TitansLM:
    return build_titans("transformer", "340m", **kw)


MODELS = {f.__name__: f for f in (
    titans_lmm_tiny, titans_mac_tiny, titans_mag_tiny, titans_mal_tiny, transformer_pp_tiny,
    titans_lmm_small, titans_mac_small, titans_mag_small, titans_mal_small, transformer_pp_small,
    titans_lmm_340m, titans_mac_340m, titans_mag_340m, titans_mal_340m, transformer_pp_340m)}
