"""PSNR and SSIM for super-resolution, computed exactly as BasicSR's `basicsr/metrics/psnr_ssim.py` (the protocol
behind the tables of SwinIR, HAT and the other BasicSR-based papers).

The protocol, step by step:
1. The network output becomes a uint8 image: clamp to [0, 1], times 255, round (`tensor_to_uint8`, BasicSR's
   `tensor2img`). This rounding is part of the metric; skipping it moves PSNR by up to 0.01 dB.
2. `crop_border` pixels (= the scale factor) are dropped on every side of both images.
3. With `test_y_channel=True` the RGB image becomes the Y of ITU-R BT.601 YCbCr in studio swing [16, 235], *not*
   rounded (`rgb_to_y`). Papers report this "PSNR-Y"/"SSIM-Y".
4. PSNR = 10 log10(255^2 / MSE) in float64; SSIM (Wang et al., 2004, Eq. 13) with an 11x11 Gaussian window of
   sigma 1.5, over the positions where the window fits inside the image, averaged over the map and then over channels.

Everything is float64. BasicSR computes the Y channel in float32 before casting to float64; on the bundled photos
that moves PSNR-Y by at most 3e-7 dB and SSIM-Y by 1e-8 (RGB metrics agree to 1e-14): the only deviation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# ITU-R BT.601 luma for R, G, B in 0..255, giving Y in [16, 235] (MATLAB's rgb2ycbcr, BasicSR's bgr2ycbcr).
_Y_WEIGHTS_RGB = np.array([65.481, 128.553, 24.966], dtype=np.float64)

# SSIM constants (Wang et al., 2004, Eq. 7 and 9): K1 = 0.01, K2 = 0.03, dynamic range L = 255.
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def rgb_to_y(img: np.ndarray, channel_order: str = "RGB") -> np.ndarray:
    """Y channel of YCbCr (BT.601, studio swing): `Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`.

    Args:
        img: (H, W, 3) uint8 or float in [0, 255].
        channel_order: "RGB" or "BGR" (BasicSR works on cv2's BGR images).

    Returns:
        (H, W) float64 Y in [16, 235], not rounded (BasicSR's `bgr2ycbcr(img / 255, y_only=True) * 255`).
    """
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"rgb_to_y expects an (H, W, 3) image, got shape {tuple(img.shape)}")
    weights = _Y_WEIGHTS_RGB if _check_order(channel_order) == "RGB" else _Y_WEIGHTS_RGB[::-1]
    return img.astype(np.float64) @ weights / 255.0 + 16.0


def calculate_psnr(
    img: np.ndarray,
    img2: np.ndarray,
    crop_border: int,
    test_y_channel: bool = True,
    input_order: str = "HWC",
    channel_order: str = "RGB",
) -> float:
    """PSNR in dB between two images with values in [0, 255] (uint8 as the protocol wants; floats are accepted).

    Args:
        img, img2: images of the same shape, (H, W), (H, W, C) or (C, H, W) with `input_order="CHW"`.
        crop_border: pixels dropped on every side before measuring (the SR scale factor).
        test_y_channel: measure on the Y channel (`rgb_to_y`) of 3-channel images.
        input_order: "HWC" or "CHW".
        channel_order: "RGB" or "BGR"; only matters for the Y channel.

    Returns:
        10 log10(255^2 / MSE); `inf` for identical images.
    """
    x, y = _prepare(img, img2, crop_border, test_y_channel, input_order, channel_order)
    mse = np.mean((x - y) ** 2)
    return math.inf if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def calculate_ssim(
    img: np.ndarray,
    img2: np.ndarray,
    crop_border: int,
    test_y_channel: bool = True,
    input_order: str = "HWC",
    channel_order: str = "RGB",
) -> float:
    """SSIM (Wang et al., 2004) between two images with values in [0, 255], as BasicSR's `calculate_ssim`.

    Each channel gets the mean of its SSIM map (Eq. 13 with the 11x11, sigma 1.5 Gaussian window, local statistics
    only where the window fits inside the cropped image); 3-channel images without `test_y_channel` average the
    channels. Arguments as `calculate_psnr`. Needs at least 11x11 pixels after the crop.
    """
    x, y = _prepare(img, img2, crop_border, test_y_channel, input_order, channel_order)
    if min(x.shape[:2]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping {crop_border} per side, got {x.shape[:2]}")
    return float(np.mean([_ssim(x[..., c], y[..., c]) for c in range(x.shape[2])]))


def gaussian_kernel(ksize: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian, (ksize,) float64: OpenCV's `cv2.getGaussianKernel(ksize, sigma)` for sigma > 0."""
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """A network output in [0, 1] as the uint8 image the metric sees (BasicSR's `tensor2img`).

    Args:
        x: (C, H, W) or (B, C, H, W), any float dtype; values outside [0, 1] are clamped.

    Returns:
        uint8 (H, W, C) or (B, H, W, C): `round(clamp(x, 0, 1) * 255)` computed in float32, ties to even as numpy.
    """
    if x.ndim not in (3, 4):
        raise ValueError(f"tensor_to_uint8 expects (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    img = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu()
    return img.movedim(-3, -1).numpy()  # (..., H, W, C)


def _ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM map of two (H, W) float64 images, Eq. 13 with local Gaussian statistics."""
    g = gaussian_kernel(11, 1.5)
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    # Variances as E[x^2] - E[x]^2, the same (cancellation-prone) order of operations as BasicSR and the MATLAB code.
    var_x = _filter_valid(x * x, g) - mu_x**2
    var_y = _filter_valid(y * y, g) - mu_y**2
    cov_xy = _filter_valid(x * y, g) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + _C1) * (2 * cov_xy + _C2)) / ((mu_x**2 + mu_y**2 + _C1) * (var_x + var_y + _C2))
    return float(ssim_map.mean())


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Correlate (H, W) with the separable window outer(g, g), keeping only positions where it fits.

    BasicSR filters with the same-size `cv2.filter2D` and then crops `[5:-5, 5:-5]`, which drops every output that
    touched the padding: the same numbers.
    """
    k = len(g)
    h, w = img.shape
    rows = sum(g[i] * img[i : h - k + 1 + i] for i in range(k))  # (H-k+1, W)
    return sum(g[j] * rows[:, j : w - k + 1 + j] for j in range(k))  # (H-k+1, W-k+1)


def _prepare(
    img: np.ndarray, img2: np.ndarray, crop_border: int, test_y_channel: bool, input_order: str, channel_order: str
) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 (H, W, C) after the border crop and, if asked, the Y conversion."""
    if img.shape != img2.shape:
        raise ValueError(f"images to compare have different shapes: {tuple(img.shape)} and {tuple(img2.shape)}")
    if input_order not in ("HWC", "CHW"):
        raise ValueError(f"input_order must be 'HWC' or 'CHW', got {input_order!r}")
    _check_order(channel_order)
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    out = []
    for a in (img, img2):
        a = np.asarray(a)
        if a.ndim == 2:
            a = a[..., None]  # (H, W, 1)
        elif input_order == "CHW":
            a = a.transpose(1, 2, 0)  # (H, W, C)
        if a.ndim != 3:
            raise ValueError(f"expected an (H, W), (H, W, C) or (C, H, W) image, got shape {tuple(a.shape)}")
        if crop_border:
            a = a[crop_border:-crop_border, crop_border:-crop_border]
        if test_y_channel and a.shape[2] == 3:
            a = rgb_to_y(a, channel_order)[..., None]  # (H, W, 1)
        out.append(a.astype(np.float64))
    if out[0].size == 0:
        raise ValueError(f"nothing left to compare after cropping {crop_border} pixels per side of {tuple(img.shape)}")
    return out[0], out[1]


def _check_order(channel_order: str) -> str:
    if channel_order not in ("RGB", "BGR"):
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    return channel_order
