"""Inference on images of any size, as the official `HATModel` does it, plus BasicSR's x8 self-ensemble.

- Padding: HAT's windows need H, W to be multiples of the window size; the input is reflect-padded at the bottom and
  right (`HATModel.pre_process`) and the output cropped back to `scale * (H, W)` (`post_process`).
- Tiles: a large image is cut into `tile_size` tiles, each run with `tile_pad` pixels of context on every side that
  exists, and only the tile's own area of the output is kept (`HATModel.tile_process`); memory is bounded by one
  tile. Tiled output differs slightly from whole-image output (attention and shifted windows see a cropped context;
  the official README and issue #16 report ~0.1 dB); it is identical when the pad covers the whole image.
- Self-ensemble (`SRModel.test_selfensemble`): the 8 flips/transposes of the input are super-resolved, mapped back
  and averaged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Net = Callable[[torch.Tensor], torch.Tensor]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad `(B, C, H, W)` at the bottom/right to multiples of `multiple`; returns the padded image and
    (pad_h, pad_w). A pad larger than the image (a tiny input) is done in several reflections."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    todo_h, todo_w = pad_h, pad_w
    while todo_h or todo_w:
        step_h = min(todo_h, x.shape[-2] - 1)
        step_w = min(todo_w, x.shape[-1] - 1)
        if step_h == 0 and step_w == 0:  # a 1-pixel side cannot be reflected
            x = F.pad(x, (0, todo_w, 0, todo_h), mode="replicate")
            break
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        todo_h, todo_w = todo_h - step_h, todo_w - step_w
    return x, (pad_h, pad_w)


def forward_padded(net: Net, x: torch.Tensor, window_size: int, scale: int) -> torch.Tensor:
    """Run `net` on `x` padded to the window multiple and crop its output back to `scale * (H, W)`."""
    h, w = x.shape[-2:]
    padded, _ = pad_to_multiple(x, window_size)
    return net(padded)[..., : h * scale, : w * scale]


def tiled_forward(
    net: Net, x: torch.Tensor, scale: int, tile_size: int, tile_pad: int, window_size: int = 1
) -> torch.Tensor:
    """Super-resolve `x` tile by tile (`HATModel.tile_process`): each `tile_size` tile is run with up to `tile_pad`
    pixels of surrounding context and only its own area of the output is kept. Tiles whose size is not a
    multiple of `window_size` are padded and cropped like a whole image."""
    b, c, height, width = x.shape
    output = x.new_zeros(b, c, height * scale, width * scale)
    for y0 in range(0, height, tile_size):
        for x0 in range(0, width, tile_size):
            y1, x1 = min(y0 + tile_size, height), min(x0 + tile_size, width)
            py0, px0 = max(y0 - tile_pad, 0), max(x0 - tile_pad, 0)
            py1, px1 = min(y1 + tile_pad, height), min(x1 + tile_pad, width)
            out = forward_padded(net, x[:, :, py0:py1, px0:px1], window_size, scale)
            oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
            output[:, :, y0 * scale : y1 * scale, x0 * scale : x1 * scale] = out[
                :, :, oy : oy + (y1 - y0) * scale, ox : ox + (x1 - x0) * scale
            ]
    return output


def _transform(x: torch.Tensor, t: int) -> torch.Tensor:
    # bit 0: vertical flip, bit 1: horizontal flip, bit 2: transpose (BasicSR's 'v', 'h', 't').
    if t & 1:
        x = x.flip(-2)
    if t & 2:
        x = x.flip(-1)
    if t & 4:
        x = x.transpose(-2, -1)
    return x


def _inverse(x: torch.Tensor, t: int) -> torch.Tensor:
    if t & 4:
        x = x.transpose(-2, -1)
    if t & 2:
        x = x.flip(-1)
    if t & 1:
        x = x.flip(-2)
    return x


def self_ensemble(fn: Net, x: torch.Tensor) -> torch.Tensor:
    """The mean of `fn` over the 8 dihedral transforms of `x`, each mapped back (BasicSR's x8 self-ensemble)."""
    total = None
    for t in range(8):
        out = _inverse(fn(_transform(x, t)), t)
        total = out if total is None else total + out
    return total / 8


@torch.no_grad()
def super_resolve(
    model: torch.nn.Module,
    lr: torch.Tensor,
    tile_size: int | None = None,
    tile_pad: int = 32,
    ensemble: bool = False,
) -> torch.Tensor:
    """HAT's test-time pipeline for LR images `(B, C, H, W)` in [0, 1] of any size: pad to the window multiple,
    run whole or in tiles, crop to `(B, C, scale*H, scale*W)`; optionally the x8 self-ensemble."""
    scale, ws = int(model.upscale), int(model.window_size)

    def run(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        padded, _ = pad_to_multiple(x, ws)  # HATModel.pre_process pads first, then tiles the padded image
        if tile_size is None or tile_size >= max(padded.shape[-2:]):
            out = model(padded)
        else:
            out = tiled_forward(model, padded, scale, tile_size, tile_pad, ws)
        return out[..., : h * scale, : w * scale]

    return self_ensemble(run, lr) if ensemble else run(lr)

