"""Evaluation metrics shared by projects. Import submodules directly, e.g.
`from shared.metrics.psnr_ssim import calculate_psnr, calculate_ssim` (super-resolution PSNR/SSIM exactly as BasicSR
computes them: Y channel of uint8 images, crop_border = scale, float64)."""
