"""Peak dense throughput of the devices we train on, for model-FLOPs utilisation (MFU).

Numbers are the vendors' dense (no sparsity) tensor-core peaks for the given precision; MFU is the achieved
model FLOP/s over this peak, as in the PaLM paper's appendix B and nanoGPT's `estimate_mfu`.
"""

from __future__ import annotations

import os

import torch

# TFLOP/s, dense. Keys are matched as substrings of torch.cuda.get_device_name(), most specific first.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "V100": {"bf16": 0.0, "fp16": 125.0, "tf32": 0.0, "fp32": 15.7},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
}


def precision_key(trainer_precision: str) -> str:
    """Map a Lightning precision string to the table's column."""
    p = str(trainer_precision)
    if "bf16" in p:
        return "bf16"
    if "16" in p:
        return "fp16"
    if torch.get_float32_matmul_precision() in ("high", "medium"):
        return "tf32"
    return "fp32"


def cpu_peak_tflops() -> float:
    """Rough fp32 peak of this process's CPU cores: cores x 2.5 GHz x FMA lanes (AVX-512: 32, AVX2: 16) x 2."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    lanes = 32 if "avx512f" in flags else 16
    return cores * 2.5e9 * lanes * 2 / 1e12


def peak_tflops(device: torch.device, trainer_precision: str) -> float | None:
    """The peak TFLOP/s of `device` at `trainer_precision`, or None for a device not in the table."""
    if device.type == "cpu":
        return cpu_peak_tflops()
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = precision_key(trainer_precision)
    for model, peaks in GPU_PEAK_TFLOPS.items():
        if model in name and peaks.get(key):
            return peaks[key]
    return None
