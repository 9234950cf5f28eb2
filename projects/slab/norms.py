"""RepBN and progressive re-parameterised BatchNorm (PRepBN), their schedule, and BN folding for deployment.

SLAB (Guo et al., ICML 2024), section 3.1:

- RepBN (eq. 3): `RepBN(X) = BN(X) + alpha * X`, a BatchNorm over the channels of the (B, N, C) tokens plus a
  learnable scalar `alpha`. In evaluation it is a per-channel affine map, foldable into the next linear layer (eq. 4).
- PRepBN (eq. 2, called `LinearNorm` in the official code): `lambda * LN(X) + (1 - lambda) * RepBN(X)` in
  training, lambda going linearly from 1 to 0 after an optional LayerNorm-only warm-up; RepBN alone in
  evaluation. The paper ends training by freezing the weights and re-estimating the BN statistics
  ("we freeze the model parameters and exclusively update the statistics of re-parameterized BatchNorm").

The schedule. The official module counts down a buffer by one per forward call in training mode, per module,
from a hard-coded `step` (60,000 for SLAB-Swin/DeiT): the handover is tied to the number of forward calls, not
to the run's length, and users who trained longer or shorter runs saw it finish too early or never (SLAB issue #6:
NaN with the default). Here lambda is a function of the optimiser step: `set_prepbn_step(model, step, ...)`
writes the same buffers (`warm`: warm-up steps left, `iter`: handover steps left, `total_step`: handover length)
from the global step, so gradient accumulation, extra forward passes and resuming change nothing, and the
handover length comes from the run's total steps (`handover_steps(total, end=0.8)`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn

from shared.blocks.norms import RMSNorm


class RepBN(nn.Module):
    """BN(x) + alpha * x over the channels of x (B, N, C) (SLAB eq. 3). Keys: `alpha`, `bn.*` (official).

    Args:
        channels: C.
        eps: BatchNorm epsilon.
        alpha_init: initial alpha (1 in the vision models; the official LLaMA code starts at 0).
        zero_init: start BN's weight and bias at zero (the official LLaMA code), so RepBN starts as alpha * x.
    """

    def __init__(self, channels: int, eps: float = 1e-5, alpha_init: float = 1.0, zero_init: bool = False) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.bn = nn.BatchNorm1d(channels, eps=eps)
        if zero_init:
            nn.init.zeros_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BatchNorm1d normalises dim 1: put the channels there. (B, N, C) -> (B, C, N) -> (B, N, C)
        return self.bn(x.transpose(1, 2)).transpose(1, 2) + self.alpha * x

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with RepBN(x) = a * x + b per channel in evaluation (SLAB eq. 4): a = gamma / sigma + alpha,
        b = beta - gamma * mu / sigma, from the running statistics."""
        bn = self.bn
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        weight = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
        bias = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
        return weight * inv_std + self.alpha, bias - weight * bn.running_mean * inv_std


class PRepBN(nn.Module):
    """Progressive re-parameterised BatchNorm (SLAB eq. 2); the official `LinearNorm`, with its keys
    `warm`, `iter`, `total_step` (buffers), `norm1.*` (the LayerNorm/RMSNorm) and `norm2.*` (the RepBN).

    Training: LN(x) while `warm > 0`; then `lambda * LN(x) + (1 - lambda) * RepBN(x)` with
    `lambda = r0 * iter / total_step`. Evaluation: RepBN(x). The buffers are written by `set_step` (see the
    module docstring); they are not changed by the forward pass.

    Args:
        dim: channels.
        norm1: "layernorm" (vision models) or "rmsnorm" (the LLaMA experiment).
        eps: epsilon of norm1 (LN: 1e-5 in SLAB-Swin/CSwin, 1e-6 in SLAB-DeiT/PVT; RMSNorm: 1e-6).
        bn_eps: epsilon of the RepBN's BatchNorm (the official LLaMA code passes `eps` to both).
        warm, step: initial warm-up and handover lengths (the official defaults; `set_step` overrides them).
        r0: lambda at the start of the handover.
        alpha_init, zero_init: see `RepBN`.
    """

    def __init__(self, dim: int, norm1: str = "layernorm", eps: float = 1e-5, bn_eps: float = 1e-5, warm: int = 0,
                 step: int = 60000, r0: float = 1.0, alpha_init: float = 1.0, zero_init: bool = False) -> None:
        super().__init__()
        self.register_buffer("warm", torch.tensor(warm))
        self.register_buffer("iter", torch.tensor(step))
        self.register_buffer("total_step", torch.tensor(step))
        self.r0 = r0
        if norm1 == "layernorm":
            self.norm1: nn.Module = nn.LayerNorm(dim, eps=eps)
        elif norm1 == "rmsnorm":
            self.norm1 = RMSNorm(dim, eps=eps)
        else:
            raise ValueError(f"PRepBN: norm1={norm1!r} is not one of layernorm, rmsnorm")
        self.norm2 = RepBN(dim, eps=bn_eps, alpha_init=alpha_init, zero_init=zero_init)
        # (warming up, lambda) as Python values, set by `set_step`, so the forward pass never waits on the GPU.
        self._state: tuple[bool, float] | None = None

    def set_step(self, step: int, warmup_steps: int, handover_steps: int) -> None:
        """Put the schedule at optimiser step `step`: LN alone for `warmup_steps`, then lambda falls linearly
        from r0 to 0 over `handover_steps` and stays 0. Same buffer values as the official countdown after
        `step` forward calls with `warm=warmup_steps, step=handover_steps`."""
        warm = max(warmup_steps - step, 0)
        left = min(max(handover_steps - max(step - warmup_steps, 0), 0), handover_steps)
        self.warm.fill_(warm)
        self.iter.fill_(left)
        self.total_step.fill_(max(handover_steps, 1))
        self._state = (warm > 0, self.r0 * left / max(handover_steps, 1))

    def schedule_state(self) -> tuple[bool, float]:
        """(warming up, lambda) of the current buffers."""
        if self._state is None:
            self._state = (bool(self.warm > 0), self.r0 * float(self.iter) / float(self.total_step))
        return self._state

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._state = None  # the buffers changed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.norm2(x)
        warming, lam = self.schedule_state()
        if warming:
            return self.norm1(x)
        if lam == 0.0:
            return self.norm2(x)  # the handover is over: the same value as 0 * LN + 1 * RepBN, without the LN
        return lam * self.norm1(x) + (1.0 - lam) * self.norm2(x)

    def extra_repr(self) -> str:
        return f"r0={self.r0}"


NORMS = ("prepbn", "repbn", "layernorm")


def norm_factory(kind: str, eps: float, step: int) -> Callable[[int], nn.Module]:
    """`dim -> norm` for a model's norm layers: "prepbn" (the paper), "repbn" (RepBN alone: the layout of the
    released PRepBN DeiT-T / Swin-T checkpoints, and the deployed form), or "layernorm" (the baseline)."""
    if kind == "prepbn":
        return partial(PRepBN, eps=eps, step=step)
    if kind == "repbn":
        return RepBN
    if kind == "layernorm":
        return partial(nn.LayerNorm, eps=eps)
    raise ValueError(f"norm={kind!r} is not one of {', '.join(NORMS)}")


# ---------------------------------------------------------------------------------------------------- schedule

def handover_steps(total_steps: int, warmup_steps: int = 0, end: float = 0.8) -> int:
    """Length of the LN -> RepBN handover so that it completes at `end` x `total_steps` (SLAB issue #6's fix:
    0.8 of training), after `warmup_steps` of LN alone."""
    if not 0.0 < end <= 1.0:
        raise ValueError(f"the PRepBN handover must end inside the run (0 < end <= 1), got {end}")
    length = round(end * total_steps) - warmup_steps
    if length < 1:
        raise ValueError(f"PRepBN warm-up ({warmup_steps} steps) leaves no handover before step "
                         f"{round(end * total_steps)} of {total_steps}")
    return length


def prepbn_modules(model: nn.Module) -> list[PRepBN]:
    return [m for m in model.modules() if isinstance(m, PRepBN)]


def set_prepbn_step(model: nn.Module, step: int, warmup_steps: int, handover: int) -> float | None:
    """Put every PRepBN of `model` at optimiser step `step`; returns lambda (None without PRepBN)."""
    lam = None
    for m in prepbn_modules(model):
        m.set_step(step, warmup_steps, handover)
        lam = m.schedule_state()[1]
    return lam


def repbn_modules(model: nn.Module) -> Iterable[RepBN]:
    return (m for m in model.modules() if isinstance(m, RepBN))


# ------------------------------------------------------------------------------------------------------ folding

def eval_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation-mode per-channel affine (a, b) of a RepBN or PRepBN (whose evaluation form is its RepBN)."""
    if isinstance(norm, PRepBN):
        norm = norm.norm2
    if not isinstance(norm, RepBN):
        raise TypeError(f"only RepBN / PRepBN fold into linear layers, not {type(norm).__name__}")
    return norm.affine()


@torch.no_grad()
def fold_into_linear(norm: nn.Module, linear: nn.Linear) -> nn.Linear:
    """`linear(norm(x))` as one linear layer: W' = W diag(a), b' = W b + bias (SLAB eq. 4). Also valid through
    anything linear and per-token in between (window partition, shifts, mean pooling)."""
    a, b = eval_affine(norm)
    fused = nn.Linear(linear.in_features, linear.out_features, bias=True,
                      device=linear.weight.device, dtype=linear.weight.dtype)
    fused.weight.copy_(linear.weight * a[None, :])
    fused.bias.copy_(linear.weight @ b + (linear.bias if linear.bias is not None else 0.0))
    return fused


@torch.no_grad()
def fold_after_conv(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """`norm(conv(x))` (norm over the conv's output channels) as one convolution: W' = a W, b' = a bias + b."""
    a, b = eval_affine(norm)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * a.view(-1, 1, 1, 1))
    fused.bias.copy_(a * (conv.bias if conv.bias is not None else 0.0) + b)
    return fused


# ------------------------------------------------------------------------------------------------ recalibration

@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], momentum: float | None = None) -> int:
    """SLAB's final phase: with every weight frozen and the model in evaluation behaviour (no dropout or drop
    path, PRepBN = its RepBN), re-estimate the RepBN BatchNorm statistics on `batches` of inputs.

    `momentum=None` restarts the statistics and averages over all batches (the population estimate);
    a number keeps BatchNorm's running average with that momentum. Under DDP the statistics are averaged over
    ranks at the end. Returns the number of batches used; the model is left in eval mode.
    """
    bns = [m.bn for m in repbn_modules(model)]
    saved = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        if momentum is None:
            bn.reset_running_stats()
        bn.momentum = momentum
        bn.train()
    used = 0
    try:
        for x in batches:
            model(x)
            used += 1
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m
            bn.eval()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        for bn in bns:
            for stat in (bn.running_mean, bn.running_var):
                torch.distributed.all_reduce(stat)
                stat.div_(world)
    return used
