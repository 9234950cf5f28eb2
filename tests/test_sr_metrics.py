"""Super-resolution metrics and the MATLAB bicubic resize, checked against values derived by hand.

Every expected number here comes from a definition worked out in the test (a known MSE, the BT.601 luma weights,
the SSIM formula for constant images, the cubic kernel's tap weights as exact fractions), or from OpenCV / MATLAB
outputs quoted as literals, never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from shared.data.imresize import imresize, imresize_uint8
from shared.metrics.psnr_ssim import calculate_psnr, calculate_ssim, gaussian_kernel, rgb_to_y, tensor_to_uint8

C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

# cv2.getGaussianKernel(11, 1.5)[:, 0] as printed by OpenCV 5.0 (opencv-python-headless), the window BasicSR uses.
CV2_GAUSSIAN_11_15 = [
    0.0010283800844791097, 0.007598758135239182, 0.03600077212843082, 0.10936068950970002, 0.21300553771125372,
    0.2660117248617943,
    0.21300553771125372, 0.10936068950970002, 0.03600077212843082, 0.007598758135239182, 0.0010283800844791097,
]  # fmt: skip

# MATLAB's antialiased cubic for a x1/2 shrink: 0.5 * cubic(0.5 * d) at d = 3.5, 2.5, ..., -3.5, in 1/256ths.
# Keys (a = -0.5): cubic(0.25) = 111/128, cubic(0.75) = 29/128, cubic(1.25) = -9/128, cubic(1.75) = -3/128.
TAPS_DOWN2 = np.array([-3, -9, 29, 111, 111, 29, -9, -3]) / 256
# A x2 enlargement (no antialiasing): even outputs sit 0.25 px left of an input pixel, odd ones 0.25 px right.
TAPS_UP2_EVEN = np.array([-3, 29, 111, -9]) / 128  # on x[k-2 .. k+1]
TAPS_UP2_ODD = np.array([-9, 111, 29, -3]) / 128  # on x[k-1 .. k+2]


def keys_cubic(t: np.ndarray) -> np.ndarray:
    """Keys (1981) cubic convolution kernel, a = -0.5, written out piecewise."""
    t = np.abs(t)
    inner = 1.5 * t**3 - 2.5 * t**2 + 1
    outer = -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return np.where(t <= 1, inner, np.where(t < 2, outer, 0.0))


def down2(x: np.ndarray, axis: int) -> np.ndarray:
    """x1/2 along `axis` with the literal taps and numpy's edge-including mirror (MATLAB's 'symmetric')."""
    x = np.moveaxis(x, axis, 0).astype(np.float64)
    xp = np.pad(x, [(3, 4)] + [(0, 0)] * (x.ndim - 1), mode="symmetric")  # one spare row for odd lengths
    out = np.stack([np.tensordot(TAPS_DOWN2, xp[2 * k : 2 * k + 8], axes=1) for k in range((len(x) + 1) // 2)])
    return np.moveaxis(out, 0, axis)


def matlab_round(x: np.ndarray) -> np.ndarray:
    """MATLAB's uint8(x): round half away from zero, saturate."""
    return np.clip(np.floor(x + 0.5), 0, 255)


# --------------------------------------------------------------------------------------------------------- PSNR


def test_psnr_of_a_known_mse():
    a = np.full((6, 6, 3), 100, np.uint8)
    b = a + 5  # MSE 25 -> PSNR = 20 log10(255 / 5) = 20 log10(51)
    assert calculate_psnr(a, b, crop_border=0, test_y_channel=False) == pytest.approx(34.15140352195873, abs=1e-12)
    g1, g2 = np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
    g2[2, 1] = 16  # MSE = 256 / 16 = 16
    assert calculate_psnr(g1, g2, 0) == pytest.approx(10 * math.log10(255**2 / 16), abs=1e-12)


def test_psnr_identical_is_inf():
    img = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    assert calculate_psnr(img, img.copy(), 2) == math.inf
    assert calculate_psnr(img, img.copy(), 0, test_y_channel=False) == math.inf


def test_psnr_crop_border():
    a = np.full((8, 8), 50, np.uint8)
    b = a.copy()
    b[0, :] = 0
    b[:, -2] = 0  # differences only in the outer two-pixel frame
    assert calculate_psnr(a, b, crop_border=2) == math.inf
    b = a.copy()
    b[1, 3] += 10  # inside the 1-pixel crop, outside the 2-pixel one
    assert calculate_psnr(a, b, crop_border=2) == math.inf
    # 6 x 6 = 36 pixels remain, one of them off by 10: MSE = 100 / 36.
    assert calculate_psnr(a, b, crop_border=1) == pytest.approx(10 * math.log10(255**2 * 36 / 100), abs=1e-12)


@pytest.mark.parametrize(
    "rgb, y",
    [((255, 0, 0), 16 + 65.481), ((0, 255, 0), 16 + 128.553), ((0, 0, 255), 16 + 24.966),
     ((255, 255, 255), 235.0), ((0, 0, 0), 16.0), ((128, 128, 128), 16 + 219 * 128 / 255)],
)  # fmt: skip
def test_y_channel_of_pure_colours(rgb, y):
    img = np.tile(np.array(rgb, np.uint8), (2, 3, 1))
    assert rgb_to_y(img).dtype == np.float64
    np.testing.assert_allclose(rgb_to_y(img), y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rgb_to_y(img[..., ::-1], channel_order="BGR"), y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rgb_to_y(img.astype(np.float32)), y, rtol=0, atol=1e-12)


def test_psnr_y_white_against_black():
    white, black = np.full((5, 5, 3), 255, np.uint8), np.zeros((5, 5, 3), np.uint8)
    # Y: 235 vs 16, a difference of 219 everywhere; on RGB the difference is 255 (0 dB).
    assert calculate_psnr(white, black, 1) == pytest.approx(20 * math.log10(255 / 219), abs=1e-12)
    assert calculate_psnr(white, black, 1, test_y_channel=False) == pytest.approx(0.0, abs=1e-12)


def test_psnr_input_order_and_errors():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, (2, 10, 12, 3), dtype=np.uint8)
    hwc = calculate_psnr(a, b, 2)
    assert calculate_psnr(a.transpose(2, 0, 1), b.transpose(2, 0, 1), 2, input_order="CHW") == hwc
    assert calculate_psnr(a.astype(np.float64), b.astype(np.float64), 2) == hwc
    with pytest.raises(ValueError, match="different shapes"):
        calculate_psnr(a, b[:-1], 2)
    with pytest.raises(ValueError, match="channel_order"):
        calculate_psnr(a, b, 2, channel_order="YUV")


# --------------------------------------------------------------------------------------------------------- SSIM


def test_gaussian_window_matches_opencv():
    np.testing.assert_allclose(gaussian_kernel(11, 1.5), CV2_GAUSSIAN_11_15, rtol=0, atol=1e-15)


def test_ssim_identical_is_one():
    img = np.random.default_rng(2).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    assert calculate_ssim(img, img.copy(), 2) == pytest.approx(1.0, abs=1e-12)
    assert calculate_ssim(img, img.copy(), 0, test_y_channel=False) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_constant_images():
    # Zero variances leave SSIM = (2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1) at every position.
    def const_ssim(m1: float, m2: float) -> float:
        return (2 * m1 * m2 + C1) / (m1**2 + m2**2 + C1)

    a, b = np.full((16, 16), 100, np.uint8), np.full((16, 16), 120, np.uint8)
    assert calculate_ssim(a, b, 2) == pytest.approx(const_ssim(100, 120), abs=1e-12)
    # Without the Y channel a 3-channel image averages its channels.
    a = np.tile(np.array([10, 200, 30], np.uint8), (14, 15, 1))
    b = np.tile(np.array([40, 50, 255], np.uint8), (14, 15, 1))
    expected = np.mean([const_ssim(10, 40), const_ssim(200, 50), const_ssim(30, 255)])
    assert calculate_ssim(a, b, 1, test_y_channel=False) == pytest.approx(expected, abs=1e-12)
    # With it, pure red against pure green compares Y = 81.481 with Y = 144.553.
    red = np.tile(np.array([255, 0, 0], np.uint8), (13, 13, 1))
    green = np.tile(np.array([0, 255, 0], np.uint8), (13, 13, 1))
    assert calculate_ssim(red, green, 1) == pytest.approx(const_ssim(81.481, 144.553), abs=1e-12)


@pytest.mark.parametrize("shape", [(11, 11), (12, 14)])
def test_ssim_is_the_mean_over_every_window_that_fits(shape):
    """Eq. 13 of Wang et al. with Gaussian-weighted statistics, summed directly over each 11x11 window."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, shape).astype(np.float64)
    y = np.clip(x + rng.normal(0, 20, shape), 0, 255)
    w = np.outer(CV2_GAUSSIAN_11_15, CV2_GAUSSIAN_11_15)
    values = []
    for i in range(shape[0] - 10):
        for j in range(shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2)))
    assert calculate_ssim(x, y, 0) == pytest.approx(np.mean(values), abs=1e-10)


def test_ssim_needs_a_full_window():
    img = np.zeros((14, 14), np.uint8)
    with pytest.raises(ValueError, match="11x11"):
        calculate_ssim(img, img, crop_border=2)


# ------------------------------------------------------------------------------------------------ tensor_to_uint8


def test_tensor_to_uint8_clamps_rounds_and_moves_channels():
    values = torch.tensor([-0.2, 0.0, 1.0, 1.3, 0.5, 2.5 / 255, 3.5 / 255, 0.5 / 255], dtype=torch.float32)
    # In float32 the last three land exactly on 2.5, 3.5, 0.5: BasicSR's numpy round takes them to the even integer.
    assert (values[5:] * 255).tolist() == [2.5, 3.5, 0.5]
    x = values.reshape(2, 1, 4)  # (C=2, H=1, W=4)
    out = tensor_to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 4, 2)
    assert out[0, :, 0].tolist() == [0, 0, 255, 255]
    assert out[0, :, 1].tolist() == [128, 2, 4, 0]  # 127.5 -> 128, 2.5 -> 2, 3.5 -> 4, 0.5 -> 0
    batch = torch.rand(3, 3, 5, 6)
    assert tensor_to_uint8(batch).shape == (3, 5, 6, 3)
    np.testing.assert_array_equal(tensor_to_uint8(batch)[1], tensor_to_uint8(batch[1]))
    assert tensor_to_uint8(batch.bfloat16()).dtype == np.uint8


# ------------------------------------------------------------------------------------------------------ imresize


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 0.7, 2, 3, 4])
def test_imresize_keeps_a_constant_image(scale):
    img = np.full((13, 17, 3), 77, np.uint8)
    out = imresize(img, scale)
    assert out.dtype == np.uint8 and out.shape == (math.ceil(13 * scale), math.ceil(17 * scale), 3)
    assert np.all(out == 77)
    np.testing.assert_allclose(imresize(img.astype(np.float64) / 255, scale), 77 / 255, rtol=0, atol=1e-12)


def test_imresize_half_uses_the_antialiased_cubic_taps():
    rng = np.random.default_rng(4)
    column = rng.random((16, 1)) * 255
    np.testing.assert_allclose(imresize(column, 1 / 2), down2(column, 0), rtol=0, atol=1e-10)
    img = rng.random((12, 11)) * 255  # odd width: ceil(11 / 2) = 6 columns
    out = imresize(img, 1 / 2)
    assert out.shape == (6, 6) and out.dtype == np.float64
    np.testing.assert_allclose(out, down2(down2(img, 0), 1), rtol=0, atol=1e-10)


def test_imresize_double_uses_the_plain_cubic_taps():
    x = np.random.default_rng(5).random((9, 1)) * 255
    xp = np.pad(x[:, 0], 2, mode="symmetric")
    expected = np.empty(18)
    expected[0::2] = [TAPS_UP2_EVEN @ xp[k : k + 4] for k in range(9)]
    expected[1::2] = [TAPS_UP2_ODD @ xp[k + 1 : k + 5] for k in range(9)]
    np.testing.assert_allclose(imresize(x, 2)[:, 0], expected, rtol=0, atol=1e-10)


def test_imresize_quarter_against_matlab_contributions_formula():
    # Output k (0-based) samples u = 4k + 1.5; the stretched kernel 0.25 * cubic(0.25 d) reaches 16 pixels,
    # x[4k-6 .. 4k+9]; the weights are normalised to sum to 1 (MATLAB's `contributions`).
    d = 1.5 - np.arange(-6, 10)
    taps = 0.25 * keys_cubic(0.25 * d)
    taps /= taps.sum()
    x = np.random.default_rng(6).random(24) * 255
    xp = np.pad(x, 6, mode="symmetric")
    expected = [taps @ xp[4 * k : 4 * k + 16] for k in range(6)]
    np.testing.assert_allclose(imresize(x[:, None], 1 / 4)[:, 0], expected, rtol=0, atol=1e-10)
    # Without antialiasing the plain 4-tap kernel samples the same positions.
    plain = keys_cubic(1.5 - np.arange(0, 4))
    expected = [plain @ xp[4 * k + 6 : 4 * k + 10] for k in range(6)]
    np.testing.assert_allclose(imresize(x[:, None], 1 / 4, antialiasing=False)[:, 0], expected, rtol=0, atol=1e-10)


def test_imresize_uint8_rounds_each_pass_like_matlab():
    img = np.random.default_rng(7).integers(0, 256, (10, 8), dtype=np.uint8)
    rows = matlab_round(down2(img, 0))  # MATLAB keeps the uint8 class between the two passes
    np.testing.assert_array_equal(imresize(img, 1 / 2), matlab_round(down2(rows, 1)))
    # A step centred between two output taps lands exactly on 100.5: MATLAB rounds half away from zero.
    step = np.array([100] * 9 + [101] * 7, np.uint8)[:, None]
    assert imresize(step, 1 / 2)[4, 0] == 101


def test_imresize_uint8_through_doubles_rounds_once():
    img = np.random.default_rng(8).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    exact = down2(down2(img, 0), 1)
    out = imresize_uint8(img, 1 / 2)
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
    away_from_ties = np.abs(exact - np.floor(exact) - 0.5) > 1e-9
    np.testing.assert_array_equal(out[away_from_ties], matlab_round(exact)[away_from_ties])
    assert np.any(out != imresize(img, 1 / 2))  # rounding once is not rounding twice


def test_imresize_output_shape_resizes_the_smaller_scale_first():
    img = np.random.default_rng(9).integers(0, 256, (8, 16), dtype=np.uint8)
    # Rows scale 1/2, columns 1/4: MATLAB resizes columns first, rounding in between.
    d = 1.5 - np.arange(-6, 10)
    quarter = 0.25 * keys_cubic(0.25 * d)
    quarter /= quarter.sum()
    xp = np.pad(img.astype(np.float64), [(0, 0), (6, 6)], mode="symmetric")
    cols = matlab_round(np.stack([xp[:, 4 * k : 4 * k + 16] @ quarter for k in range(4)], axis=1))
    np.testing.assert_array_equal(imresize(img, None, output_shape=(4, 4)), matlab_round(down2(cols, 0)))


def test_imresize_rejects_bad_input():
    with pytest.raises(ValueError, match="dtype"):
        imresize(np.zeros((4, 4), np.int32), 0.5)
    with pytest.raises(ValueError, match="shape"):
        imresize(np.zeros((2, 4, 4, 3), np.uint8), 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(np.zeros((4, 4), np.uint8), 0.5, output_shape=(2, 2))


def test_pil_and_torch_bicubic_are_not_matlab():
    """The pitfall: LR images made with PIL or torch are a different degradation from the benchmarks' MATLAB one."""
    rng = np.random.default_rng(10)
    hr = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    lr = imresize_uint8(hr, 1 / 2).astype(np.float64)
    pil = np.asarray(Image.fromarray(hr).resize((24, 24), Image.BICUBIC)).astype(np.float64)
    x = torch.from_numpy(hr).permute(2, 0, 1)[None].double()  # (1, 3, H, W)
    torch_default = F.interpolate(x, size=(24, 24), mode="bicubic", align_corners=False)
    torch_default = torch_default.round().clamp(0, 255)[0].permute(1, 2, 0).numpy()
    # PIL truncates the kernel at the image edge instead of mirroring: the border rows differ by many grey levels.
    assert np.abs(pil - lr)[[0, -1]].max() >= 5
    # torch's default bicubic is the a = -0.75 kernel without antialiasing: a different image altogether.
    assert calculate_psnr(lr, torch_default, 0, test_y_channel=False) < 30
    # The a = -0.5 cubic's x2 enlargement weights are (-3, 29, 111, -9) / 128; torch's a = -0.75 ones differ.
    impulse = torch.zeros(1, 1, 1, 8, dtype=torch.float64)
    impulse[..., 4] = 128
    torch_up = F.interpolate(impulse, scale_factor=2, mode="bicubic", align_corners=False)[0, 0, 0].numpy()
    ours = imresize(impulse[0, 0].numpy(), 2)[0]
    np.testing.assert_allclose(ours[5:13], [-3, -9, 29, 111, 111, 29, -9, -3], rtol=0, atol=1e-10)
    assert np.abs(torch_up[5:13] - ours[5:13]).max() >= 1  # e.g. 128 * cubic_{-0.75}(0.25) = 112.5, not 111
