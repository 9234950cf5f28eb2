"""HAT's training objective and evaluation protocol as a LightningModule.

Training (paper §4.1, official options/train): L1 loss between the super-resolved patch and the HR patch; Adam
(0.9, 0.99) and a multi-step schedule come from the `optimizer` / `scheduler` config; the EMA of the weights
(decay 0.999, BasicSR's `net_g_ema`) is the `shared.lit.callbacks.EMA` callback, which also swaps the averaged
weights in for validation, test and the saved checkpoint, as BasicSR evaluates `params_ema`.

Evaluation (BasicSR's protocol): whole images padded to the window multiple and cropped back (optionally in tiles,
optionally the x8 self-ensemble), outputs rounded to uint8, then PSNR and SSIM on the Y channel with
`crop_border = scale` in float64 (`shared.metrics.psnr_ssim`). The MATLAB-bicubic upscaling is measured the same
way as the baseline. Metrics: `val/psnr`, `val/ssim`, `val/psnr_bicubic`, ...; at test, one loader per
benchmark set: `test/<set>/psnr`, `test/<set>/ssim`, ... `results_table` prints them in the paper's layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from projects.hat.inference import super_resolve
from projects.hat.model import HAT, build_hat
from shared.lit.errors import ConfigError
from shared.lit.logging import get_logger
from shared.lit.module import PaperModule, count_forward_flops
from shared.metrics.psnr_ssim import calculate_psnr, calculate_ssim, tensor_to_uint8

log = get_logger(__name__)
# The column order of the paper's tables (Table 6 of the CVPR paper).
PAPER_SETS = ("Set5", "Set14", "B100", "Urban100", "Manga109")


class HATModule(PaperModule):
    """Args:
    arch: a named configuration of projects.hat.model (`hat_x4`, `hat_s_x2`, `hat_tiny_x2`, ...).
    arch_kwargs: overrides of HAT's constructor arguments (e.g. {use_checkpoint: true, drop_path_rate: 0.}).
    network_g: instead of `arch`, the `network_g` block of an official option file (HAT's arguments by name).
    pretrained: an official `.pth` (`params_ema`, else `params`) or one of our checkpoints to start from.
    pretrained_key: read this key of `pretrained` instead (e.g. `params`).
    pretrained_strict: all keys must match (official `strict_load_g`); false loads what matches (x4 from x2).
    tile_size / tile_pad: evaluate large images in tiles (official tile mode); None: whole images.
    self_ensemble: evaluate with the x8 self-ensemble.
    log_images: how many validation images to log as LR | bicubic | SR | HR strips.
    sample_crop: HR side of the centre crop shown in those strips (None: whole images).
    optimizer / scheduler: see shared.lit.optim.
    """

    def __init__(
        self,
        arch: str = "hat_tiny_x2",
        arch_kwargs: dict[str, Any] | None = None,
        network_g: dict[str, Any] | None = None,
        pretrained: str | None = None,
        pretrained_key: str | None = None,
        pretrained_strict: bool = True,
        tile_size: int | None = None,
        tile_pad: int = 32,
        self_ensemble: bool = False,
        log_images: int = 3,
        sample_crop: int | None = 192,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(optimizer or {"name": "adam", "lr": 2e-4, "betas": [0.9, 0.99]}, scheduler)
        self.save_hyperparameters()
        if network_g is not None:
            args = {k: v for k, v in network_g.items() if k != "type"}
            if network_g.get("type", "HAT") != "HAT":
                raise ConfigError(f"model.network_g.type={network_g['type']!r}: this project builds 'HAT'")
            self.model: HAT = HAT(**{**args, **(arch_kwargs or {})})
        else:
            self.model = build_hat(arch, **(arch_kwargs or {}))
        self.scale = self.model.upscale
        self.pretrained, self.pretrained_key, self.pretrained_strict = pretrained, pretrained_key, pretrained_strict
        self.tile_size, self.tile_pad, self.self_ensemble = tile_size, tile_pad, self_ensemble
        self.log_images, self.sample_crop = log_images, sample_crop
        self._weights_ready = False  # set once pretrained weights or a checkpoint have been loaded
        self.eval_metrics = torch.nn.ModuleDict()

    # -- weights -------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Here rather than in __init__: a checkpoint restored afterwards (resume, eval) must win, and a module
        # rebuilt from a checkpoint's hyper-parameters must not need the original pretrained file.
        data_scale = getattr(getattr(self._trainer, "datamodule", None), "scale", self.scale)
        if data_scale != self.scale:
            raise ConfigError(f"data.scale={data_scale} but the model upscales x{self.scale} (model.arch)")
        if self.pretrained and not self._weights_ready:
            used = self.model.load_official_state_dict(self.pretrained, self.pretrained_key, self.pretrained_strict)
            log.info(f"loaded HAT weights from {self.pretrained} ({used or 'state_dict'})")
        self._weights_ready = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._weights_ready = True

    # -- training ------------------------------------------------------------------------------------------------
    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        return self.model(lq)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.l1_loss(self.model(batch["lq"]), batch["gt"])
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, on_step=True, on_epoch=False)
        return loss

    def flops_per_sample(self) -> float | None:
        """Training FLOPs of one LR patch: 3x the forward (forward + backward), at the data's patch size."""
        patch = getattr(getattr(self.trainer, "datamodule", None), "patch_size", None)
        if patch is None:
            return None
        ws = self.model.window_size
        patch = -(-patch // ws) * ws
        return 3 * count_forward_flops(self.model, torch.zeros(1, self.model.in_chans, patch, patch))

    # -- evaluation ----------------------------------------------------------------------------------------------
    def _set_names(self, stage: str) -> list[str]:
        dm = getattr(self._trainer, "datamodule", None)
        getter = getattr(dm, f"{stage}_set_names", None)
        return getter() if getter else ["default"]

    def _metric(self, prefix: str, name: str) -> tuple[MeanMetric, str]:
        """The running mean of one metric and its attribute path (Lightning needs it for metrics made lazily)."""
        key = f"{prefix}/{name}".replace("/", "__").replace(".", "_")  # ModuleDict keys may not hold '/' or '.'
        if key not in self.eval_metrics:
            # float64 end to end: per-image PSNRs are averaged as BasicSR does, in double precision
            self.eval_metrics[key] = MeanMetric().set_dtype(torch.float64).to(self.device)
        return self.eval_metrics[key], f"eval_metrics.{key}"

    def _prefix(self, stage: str, dataloader_idx: int) -> str:
        if stage == "val":
            return "val"
        return f"test/{self._set_names('test')[dataloader_idx]}"

    def _evaluate(self, batch: dict[str, Any], prefix: str) -> torch.Tensor:
        sr = super_resolve(self.model, batch["lq"], self.tile_size, self.tile_pad, self.self_ensemble)
        sr_img, gt_img = tensor_to_uint8(sr[0]), tensor_to_uint8(batch["gt"][0])
        values = {"psnr": calculate_psnr(sr_img, gt_img, self.scale),
                  "ssim": calculate_ssim(sr_img, gt_img, self.scale)}
        if "bicubic" in batch:
            bic = tensor_to_uint8(batch["bicubic"][0])
            values["psnr_bicubic"] = calculate_psnr(bic, gt_img, self.scale)
            values["ssim_bicubic"] = calculate_ssim(bic, gt_img, self.scale)
        for name, value in values.items():
            metric, attribute = self._metric(prefix, name)
            metric.update(torch.tensor(value, dtype=torch.float64, device=self.device))
            self.log(f"{prefix}/{name}", metric, on_step=False, on_epoch=True, add_dataloader_idx=False,
                     prog_bar=prefix == "val" and name == "psnr", batch_size=1, metric_attribute=attribute)
        return sr

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        sr = self._evaluate(batch, self._prefix("val", dataloader_idx))
        if batch_idx < self.log_images and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._log_sample(batch, sr, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, self._prefix("test", dataloader_idx))

    # -- sample images -------------------------------------------------------------------------------------------
    def _log_sample(self, batch: dict[str, Any], sr: torch.Tensor, index: int) -> None:
        strip = sample_strip(batch["lq"][0], batch.get("bicubic", sr)[0], sr[0], batch["gt"][0], self.scale,
                             self.sample_crop)
        name = str(batch.get("name", index))
        key, step = f"val/sample_{index}", self.global_step
        caption = f"{name}: LR | bicubic | SR | HR (step {step})"
        logged = False
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B (and others with the same API)
                logger.log_image(key=key, images=[strip], caption=[caption], step=step)
                logged = True
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image(key, strip, step, dataformats="HWC")
                logged = True
        if not logged:  # CSV or no logger: PNG files in the run directory
            from PIL import Image

            folder = Path(self.trainer.default_root_dir) / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(strip).save(folder / f"step{step:07d}_{name}.png")

    # -- tables --------------------------------------------------------------------------------------------------
    def results_table(self, metrics: dict[str, float]) -> str:
        """The paper's table layout (PSNR/SSIM on Y per benchmark set) from logged `test/<set>/<metric>` values."""
        return format_results_table(metrics, self.scale, "HAT" if self.hparams.network_g else self.hparams.arch)


def sample_strip(lq: torch.Tensor, bicubic: torch.Tensor, sr: torch.Tensor, gt: torch.Tensor, scale: int,
                 crop: int | None) -> np.ndarray:
    """LR (nearest-upscaled) | bicubic | SR | HR side by side as one uint8 (H, 4W, 3) image, centre-cropped."""
    lr_up = F.interpolate(lq[None].float(), scale_factor=scale, mode="nearest")[0]
    panels = [lr_up, bicubic, sr, gt]
    h, w = gt.shape[-2:]
    if crop is not None and (h > crop or w > crop):
        top, left = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        panels = [p[:, top : top + crop, left : left + crop] for p in panels]
    return tensor_to_uint8(torch.cat([p.detach().float().cpu() for p in panels], dim=-1))


def format_results_table(metrics: dict[str, float], scale: int, method: str = "HAT") -> str:
    """A markdown table: one row per method (ours, and Bicubic when measured), PSNR/SSIM per set as in the paper."""
    def value(key: str) -> float | None:
        v = metrics.get(key)
        return None if v is None else float(v)

    sets = [s for s in PAPER_SETS if value(f"test/{s}/psnr") is not None]
    sets += sorted({k.split("/")[1] for k in metrics if k.startswith("test/") and k.count("/") == 2} - set(sets))
    header = "| Method | Scale | " + " | ".join(sets) + " |"
    rule = "|---|---|" + "---|" * len(sets)
    rows = []
    for label, suffix in (("Bicubic", "_bicubic"), (method, "")):
        cells = []
        for s in sets:
            p, q = value(f"test/{s}/psnr{suffix}"), value(f"test/{s}/ssim{suffix}")
            cells.append("-" if p is None else f"{p:.2f}/{q:.4f}" if q is not None else f"{p:.2f}")
        if any(c != "-" for c in cells):
            rows.append(f"| {label} | x{scale} | " + " | ".join(cells) + " |")
    return "\n".join([f"PSNR(dB)/SSIM on the Y channel, crop_border={scale}", header, rule, *rows])
