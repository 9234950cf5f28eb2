"""MATLAB-compatible bicubic `imresize`: how every super-resolution benchmark makes its low-resolution inputs.

DIV2K's `LR_bicubic`, the `LRbicx{2,3,4}` folders of Set5/Set14/B100/Urban100/Manga109 and the "bicubic" baseline
rows of SR papers all come from MATLAB's `imresize(img, scale)` with its defaults ('bicubic', antialiasing on).
PIL's and torch's bicubic differ from it (torch uses a = -0.75 and no antialiasing by default; PIL truncates the kernel
at the borders and rounds in fixed point between its passes), and the difference moves PSNR by tenths of a dB.

The algorithm (MATLAB's `imresize.m` with its `contributions` helper, and `imresizemex`):
- the cubic convolution kernel of Keys (1981) with a = -0.5, support [-2, 2];
- output pixel x (1-based) samples the input at u = x / s + (1 - 1 / s) / 2, so pixel centres line up;
- when shrinking (s < 1) with antialiasing the kernel is stretched to h(t) = s * cubic(s * t), width 4 / s;
- each output's weights are normalised to sum to 1, then taps outside the image are mirrored back in
  (half-sample symmetric: ..., 2, 1 | 1, 2, ..., n | n, n-1, ...);
- the two dimensions are resized one after the other, the one with the smaller scale first (rows on a tie), each
  output adding its taps from left to right in float64.

Two ways of calling it give two uint8 results, and both occur in practice:
- `imresize(uint8_img, s)` is MATLAB's `imresize` on a uint8 array: MATLAB keeps the class, so the image is rounded
  back to uint8 after *each* pass (identical to MATLAB R2015b's output on a 512x512 -> 123x234 colour resize).
- `imresize_uint8(uint8_img, s)` is `im2uint8(imresize(im2double(img), s))`, rounding once at the end. This is how
  BasicSR's `generate_bicubic_img.m` made the GTmod/LRbicx benchmark folders that SwinIR and HAT evaluate on
  (it reproduces Set5's LRbicx2 and Set14's LRbicx4 files: 0 and 1 differing values out of 414,936 and 592,029);
  use it to make LR images.

BasicSR's Python `matlab_functions.imresize` computes the same weights in float32 and never rounds.
"""

from __future__ import annotations

import math

import numpy as np


def cubic(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's `cubic`), zero outside |t| <= 2."""
    at = np.abs(t)
    at2, at3 = at**2, at**3
    near = (1.5 * at3 - 2.5 * at2 + 1) * (at <= 1)
    far = (-0.5 * at3 + 2.5 * at2 - 4 * at + 2) * ((at > 1) & (at <= 2))
    return near + far


def contributions(
    in_length: int, out_length: int, scale: float, antialiasing: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and input positions of a 1-D MATLAB bicubic resize (MATLAB's `contributions`).

    Returns:
        weights (out_length, taps) float64, each row summing to 1, and indices (out_length, taps) int64, 0-based,
        already mirrored into the image. Taps whose weight is zero for every output are dropped, as MATLAB does.
    """
    kernel_width = 4.0
    if scale < 1 and antialiasing:
        kernel_width /= scale  # the stretched kernel s * cubic(s * t) covers 4 / s input pixels
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # (out,) input coordinate of each output pixel, 1-based
    left = np.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + np.arange(taps)  # (out, taps) 1-based input positions, may fall outside
    distance = u[:, None] - indices  # (out, taps)
    if scale < 1 and antialiasing:
        weights = scale * cubic(scale * distance)
    else:
        weights = cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    # Half-sample symmetric extension: position i (1-based) reads mirror[(i - 1) mod 2n].
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length)[::-1]])
    indices = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    used = np.any(weights != 0, axis=0)
    return weights[:, used], indices[:, used]


def resize_along(img: np.ndarray, axis: int, weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Resize one axis of a float64 array: out[i] = sum_t weights[i, t] * img[indices[i, t]].

    The taps are added one at a time from left to right, as `imresizemex` does: with the dyadic weights of x2 and x4
    many outputs are exact .5 ties, and this order decides which way they round (bit-exact benchmark LR images).
    """
    shape = [1] * img.ndim
    shape[axis] = -1  # one weight per output position along `axis`, broadcast over the other axes
    out = weights[:, 0].reshape(shape) * np.take(img, indices[:, 0], axis=axis)
    for t in range(1, weights.shape[1]):
        out = out + weights[:, t].reshape(shape) * np.take(img, indices[:, t], axis=axis)
    return out


def imresize(
    img: np.ndarray,
    scale: float | None,
    antialiasing: bool = True,
    output_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """MATLAB's `imresize(img, scale)` (or `imresize(img, [rows cols])`) with bicubic interpolation.

    Args:
        img: (H, W) or (H, W, C), uint8 or float (any range).
        scale: the factor for both dimensions, e.g. 1/4; the output is ceil(scale * size). None with `output_shape`.
        antialiasing: stretch the kernel when shrinking (MATLAB's default, True).
        output_shape: (rows, cols) instead of `scale`; each dimension then scales by output / input.

    Returns:
        uint8 for uint8 input, rounded (half away from zero) and saturated after each pass as MATLAB does;
        otherwise float64, unclipped. To make benchmark-style LR images from uint8 use `imresize_uint8`.
    """
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize expects an (H, W) or (H, W, C) image, got shape {tuple(img.shape)}")
    is_uint8 = img.dtype == np.uint8
    if not (is_uint8 or np.issubdtype(img.dtype, np.floating)):
        raise ValueError(f"imresize supports uint8 and float images, got dtype {img.dtype}")
    if (scale is None) == (output_shape is None):
        raise ValueError("imresize needs exactly one of scale and output_shape")
    in_shape = img.shape[:2]
    if output_shape is not None:
        out_shape = tuple(int(n) for n in output_shape)
        scales = tuple(o / i for o, i in zip(out_shape, in_shape))
    else:
        out_shape = tuple(math.ceil(n * scale) for n in in_shape)
        scales = (scale, scale)
    if min(scales) <= 0 or min(out_shape) < 1:
        raise ValueError(f"imresize cannot resize an image of shape {in_shape} to {out_shape}")

    out = img
    for dim in np.argsort(scales, kind="stable"):  # MATLAB: the dimension with the smaller scale first
        weights, indices = contributions(in_shape[dim], out_shape[dim], scales[dim], antialiasing)
        out = resize_along(out.astype(np.float64), dim, weights, indices)
        if is_uint8:
            out = _to_uint8(out)
    return out


def imresize_uint8(
    img: np.ndarray,
    scale: float | None,
    antialiasing: bool = True,
    output_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """uint8 -> uint8 resize through doubles, rounded once: MATLAB's `im2uint8(imresize(im2double(img), scale))`.

    The recipe of BasicSR's `generate_bicubic_img.m`, which wrote the benchmark `LRbicx{s}` folders; it reproduces
    their files to the grey level. Arguments as `imresize`.
    """
    if img.dtype != np.uint8:
        raise ValueError(f"imresize_uint8 expects a uint8 image, got dtype {img.dtype}")
    resized = imresize(img / 255.0, scale, antialiasing, output_shape)  # im2double divides by 255
    return _to_uint8(resized * 255.0)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB's double -> uint8 conversion: round half away from zero, saturate to [0, 255]."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)
