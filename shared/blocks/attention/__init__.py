"""Attention variants, one file per kind, and the registry that builds a self-attention layer by name.

    from shared.blocks.attention import build_attention
    attn = build_attention("performer", dim=256, num_heads=4, qkv_dim=256, bias=False, nb_features=256)
    y = attn(x, mask)          # x (B, N, C), mask (B, N) bool or None -> (B, N, C)

Every registered variant is an `nn.Module` whose forward is `forward(x, mask=None)`: `x` is `(B, N, C)`, `mask` a
`(B, N)` bool tensor that is **True on real tokens and False on padding** (SDPA's convention, the opposite of
`nn.MultiheadAttention`'s `key_padding_mask`), or None. Padded keys never change the outputs at real positions;
what a padded position itself outputs is unspecified (finite). Builders are called as
`builder(dim, num_heads, **kwargs)`.

Context keyword: a model passes `max_len` (the longest sequence it will see) to every variant; `build_attention`
forwards it only to builders that declare it (Linformer's projection is sized by it), so a variant that does not
need it does not have to accept it. Any other keyword a builder does not take is a `ConfigError`.

Importing this package is cheap: a variant's module is imported the first time it is built. To add a variant,
write `shared/blocks/attention/<file>.py` with a builder decorated by `@register_attention("<name>")` and add one
line `"<name>": "shared.blocks.attention.<file>"` to `VARIANTS` below.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from shared.lit.errors import ConfigError

__all__ = ["ATTENTION", "VARIANTS", "available_attention", "build_attention", "register_attention"]

# name -> the module that registers it (imported on first use).
VARIANTS: dict[str, str] = {
    "softmax": "shared.blocks.attention.softmax",
    "local": "shared.blocks.attention.local",
    "linformer": "shared.blocks.attention.linformer",
    "linear": "shared.blocks.attention.linear",
    "performer": "shared.blocks.attention.performer",
    "sliding_window": "shared.blocks.attention.sliding_window",
}

# name -> builder(dim, num_heads, **kwargs) -> nn.Module; filled by @register_attention as modules are imported.
ATTENTION: dict[str, Callable[..., nn.Module]] = {}

# Facts about the model, not choices of the variant: forwarded only to builders that declare them.
CONTEXT_KWARGS = frozenset({"max_len"})


def register_attention(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register `builder(dim, num_heads, **kwargs) -> nn.Module` under `name`."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ATTENTION and ATTENTION[name] is not builder:
            raise ValueError(f"attention variant {name!r} is registered twice")
        ATTENTION[name] = builder
        return builder

    return decorate


def available_attention() -> list[str]:
    """Every variant that can be built, registered or not yet imported."""
    return sorted(set(VARIANTS) | set(ATTENTION))


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in ATTENTION and name in VARIANTS:
        importlib.import_module(VARIANTS[name])
    if name not in ATTENTION:
        raise ConfigError(f"attention.name={name!r} is not one of {available_attention()}")
    return ATTENTION[name]


def build_attention(name: str, dim: int, num_heads: int, **kwargs) -> nn.Module:
    """The self-attention variant `name` over `dim` channels with `num_heads` heads (see the module docstring)."""
    builder = _builder(name)
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in CONTEXT_KWARGS & kwargs.keys():
        if not takes_any and key not in params:
            kwargs.pop(key)
    unknown = [key for key in kwargs if key not in params] if not takes_any else []
    if unknown:
        accepted = [p for p in params if p not in ("dim", "num_heads")]
        raise ConfigError(f"attention.{unknown[0]}: variant {name!r} has no parameter {unknown[0]!r}; "
                          f"it takes {', '.join(accepted)}")
    return builder(dim, num_heads, **kwargs)
