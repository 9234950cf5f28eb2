"""Performer attention, FAVOR+ (Choromanski et al., ICLR 2021, "Rethinking Attention with Performers", §2-3).

softmax(q k^T / sqrt(d)) is approximated by phi(q) . phi(k) with positive random features (eq. 5 / Lemma 1):

    phi(x) = m^{-1/2} exp(W x' - |x'|^2 / 2),    x' = x / d^{1/4},    W: (m, d) orthogonal random rows (§2.4)

and the attention is then the normalised linear attention `phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)` in O(N m d),
computed by `shared.kernels.linear_attention`. The rows of W are orthogonal within each block of d rows (QR of a
Gaussian matrix) and rescaled to the norms of Gaussian rows (the official `ortho_scaling=0`). As in the official
code, a stabiliser is subtracted inside the exponential (the row maximum for queries; the maximum over features and
real positions for keys, which cancels in the ratio) and 1e-4 is added to every feature.

`kernel="relu"` is the official LRA code's other mode (`generalized` attention with `features_type=
'deterministic'`): phi(x) = relu(x) + 1e-3 with no random projection. The LRA Performer rows use it on every task
except ListOps, which uses the softmax kernel with 2 features.

Feature redraw policy (`redraw_interval`): the random matrix `projection_matrix` is a buffer drawn at
construction from torch's global generator (seeded runs are reproducible) and saved with the state dict, so
evaluation always uses the matrix the model was last trained with. While training, a fresh matrix is drawn every
`redraw_interval` forward calls (1: every call, as the official LRA code does; 0: never). The call count is a
buffer too, so a resumed run redraws on the same schedule; it is counted in a Python int and only written to the
buffer, because reading a CUDA buffer at every call would stop the host twice per layer and step. Under DDP all
ranks draw the same matrix because they share the seed and consume the generator alike. Evaluation never redraws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.blocks.attention import register_attention
from shared.blocks.attention.softmax import SelfAttention
from shared.kernels.linear_attention import linear_attention

KERNELS = ("softmax", "relu")


def gaussian_orthogonal_random_matrix(nb_rows: int, nb_columns: int, *, scaling: int = 0,
                                      device: torch.device | None = None) -> Tensor:
    """(nb_rows, nb_columns) random features: blocks of nb_columns orthonormal rows (QR of a Gaussian matrix),
    each row rescaled to the norm of a Gaussian row (`scaling=0`) or to sqrt(nb_columns) (`scaling=1`)."""
    blocks = []
    for start in range(0, nb_rows, nb_columns):
        q, _ = torch.linalg.qr(torch.randn(nb_columns, nb_columns, device=device))
        blocks.append(q.T[: nb_rows - start])  # rows of q.T are orthonormal
    matrix = torch.cat(blocks)  # (nb_rows, nb_columns)
    if scaling == 0:
        norms = torch.randn(nb_rows, nb_columns, device=device).norm(dim=1)
    elif scaling == 1:
        norms = torch.full((nb_rows,), nb_columns ** 0.5, device=device)
    else:
        raise ValueError(f"scaling must be 0 or 1, got {scaling}")
    return norms[:, None] * matrix


def softmax_kernel_features(x: Tensor, projection: Tensor, *, is_query: bool, mask: Tensor | None = None,
                            eps: float = 1e-4) -> Tensor:
    """Positive random features of `x` (B, nh, N, d) for the softmax kernel: (B, nh, N, m), float32.

    `mask` (B, N) keeps padded keys out of the keys' stabiliser so that they cannot change real outputs.
    """
    x = x.float() * x.shape[-1] ** -0.25
    proj = x @ projection.float().T  # (B, nh, N, m)
    diag = 0.5 * x.pow(2).sum(dim=-1, keepdim=True)  # (B, nh, N, 1)
    if is_query:
        stab = proj.amax(dim=-1, keepdim=True)  # (B, nh, N, 1)
    else:
        valid = proj if mask is None else proj.masked_fill(~mask[:, None, :, None], float("-inf"))
        stab = valid.amax(dim=(-2, -1), keepdim=True)  # (B, nh, 1, 1)
        stab = stab.nan_to_num(neginf=0.0)  # a sequence with no real key at all
    return (torch.exp(proj - diag - stab) + eps) * projection.shape[0] ** -0.5


class PerformerAttention(SelfAttention):
    """FAVOR+ attention (softmax kernel, positive orthogonal random features) or the deterministic ReLU kernel."""

    def __init__(self, dim: int, num_heads: int, *, nb_features: int = 256, kernel: str = "softmax",
                 ortho_scaling: int = 0, redraw_interval: int = 1000, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if kernel not in KERNELS:
            raise ValueError(f"Performer kernel={kernel!r} is not one of {KERNELS}")
        self.nb_features, self.kernel, self.ortho_scaling = nb_features, kernel, ortho_scaling
        self.redraw_interval, self.eps = redraw_interval, eps
        if kernel == "softmax":
            self.register_buffer("projection_matrix", gaussian_orthogonal_random_matrix(
                nb_features, self.head_dim, scaling=ortho_scaling))
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self._calls: int | None = None  # host copy of `calls`, read from the buffer once after each load

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Replace the random matrix by a fresh draw (in place, on its device)."""
        self.projection_matrix.copy_(gaussian_orthogonal_random_matrix(
            self.nb_features, self.head_dim, scaling=self.ortho_scaling, device=self.projection_matrix.device))

    @torch.compiler.disable
    @torch.no_grad()
    def count_training_call(self) -> None:
        """Redraw the features at every `redraw_interval`-th training call after the first interval."""
        if self._calls is None:
            self._calls = int(self.calls)
        if self._calls > 0 and self._calls % self.redraw_interval == 0:
            self.redraw_features()
        self._calls += 1
        self.calls.fill_(self._calls)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._calls = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if self.kernel == "relu":
            phi_q, phi_k = F.relu(q.float()) + 1e-3, F.relu(k.float()) + 1e-3  # (B, nh, N, hd)
        else:
            if self.training and self.redraw_interval > 0:
                self.count_training_call()
            phi_q = softmax_kernel_features(q, self.projection_matrix, is_query=True)  # (B, nh, N, m)
            phi_k = softmax_kernel_features(k, self.projection_matrix, is_query=False, mask=mask)  # (B, nh, N, m)
        if mask is not None:
            phi_k = phi_k * mask[:, None, :, None]
        return linear_attention(phi_q, phi_k, v, normalize=True, eps=self.eps)

    def extra_repr(self) -> str:
        extra = f", nb_features={self.nb_features}, redraw_interval={self.redraw_interval}" \
            if self.kernel == "softmax" else ""
        return f"{super().extra_repr()}, kernel={self.kernel}{extra}"


@register_attention("performer")
def performer_attention(dim: int, num_heads: int, *, nb_features: int = 256, kernel: str = "softmax",
                        ortho_scaling: int = 0, redraw_interval: int = 1000, eps: float = 1e-6,
                        qkv_dim: int | None = None, bias: bool = True, attn_drop: float = 0.0) -> PerformerAttention:
    """Performer attention: FAVOR+ with `nb_features` positive orthogonal random features (kernel="softmax"), or
    LRA's deterministic ReLU kernel (kernel="relu"); `attn_drop` has no attention weights to act on."""
    return PerformerAttention(dim, num_heads, nb_features=nb_features, kernel=kernel, ortho_scaling=ortho_scaling,
                              redraw_interval=redraw_interval, eps=eps, qkv_dim=qkv_dim, bias=bias,
                              attn_drop=attn_drop)
