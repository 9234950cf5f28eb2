"""Linear Transformer attention (Katharopoulos et al., ICML 2020, "Transformers are RNNs", eq. 4-7).

softmax(q k^T) is replaced by the kernel phi(q) . phi(k) with the feature map phi(x) = elu(x) + 1 (eq. 7), so

    out_i = phi(q_i) (sum_j phi(k_j) v_j^T) / (phi(q_i) . sum_j phi(k_j) + eps)

costs O(N d^2) instead of O(N^2 d). The sums run in `shared.kernels.linear_attention` (Triton on CUDA, the PyTorch
reference elsewhere). Padded keys get phi(k_j) = 0, so they add nothing to either sum. There are no attention
weights to drop out (the official LRA code ignores its attention-dropout rate too).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from shared.blocks.attention import register_attention
from shared.blocks.attention.softmax import SelfAttention
from shared.kernels.linear_attention import linear_attention


def elu_feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al. eq. 7)."""
    return F.elu(x) + 1.0


class LinearAttention(SelfAttention):
    """Non-causal linear attention with the elu + 1 feature map."""

    def __init__(self, dim: int, num_heads: int, *, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.eps = eps

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)  # (B, nh, N, hd)
        if mask is not None:
            phi_k = phi_k * mask[:, None, :, None].to(phi_k.dtype)
        return linear_attention(phi_q, phi_k, v, normalize=True, eps=self.eps)


@register_attention("linear")
def linear_transformer_attention(dim: int, num_heads: int, *, eps: float = 1e-6, qkv_dim: int | None = None,
                                 bias: bool = True, attn_drop: float = 0.0) -> LinearAttention:
    """Linear Transformer attention (elu + 1 features); `attn_drop` is accepted and has nothing to act on."""
    return LinearAttention(dim, num_heads, eps=eps, qkv_dim=qkv_dim, bias=bias, attn_drop=attn_drop)
