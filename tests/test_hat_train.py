"""HAT's LightningModule: metrics per benchmark set, the paper's table, pretrained weights, sample images, and a
short training run that must beat bicubic upscaling on held-out photos."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from projects.hat.data import SRDataModule
from projects.hat.model import hat_tiny_x2
from projects.hat.module import HATModule, format_results_table
from shared.lit.errors import CheckpointError, ConfigError
from tests.test_hat_data import _write_layout


def _trainer(tmp_path, max_steps: int, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=CSVLogger(tmp_path, name="csv"),
        default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False, **kw,
    )


def test_fit_and_test_log_metrics_per_benchmark_set(tmp_path):
    _write_layout(tmp_path / "data")
    dm = SRDataModule(source="real", root=str(tmp_path / "data"), scale=2, patch_size=8, batch_size=2,
                      samples_per_epoch=4, val_sets=["Set5"], test_sets=["Set5", "Set14"])
    module = HATModule(arch="hat_tiny_x2", arch_kwargs={"img_size": 8}, log_images=1, sample_crop=16)
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[EMAWeightAveraging(decay=0.9)])
    trainer.fit(module, datamodule=dm)
    assert {"val/psnr", "val/ssim", "val/psnr_bicubic", "val/ssim_bicubic"} <= set(trainer.callback_metrics)
    (results,) = [trainer.test(module, datamodule=dm, verbose=False)]
    metrics = {k: v for r in results for k, v in r.items()}
    assert {"test/Set5/psnr", "test/Set5/ssim", "test/Set14/psnr", "test/Set14/ssim_bicubic"} <= set(metrics)
    table = module.results_table(metrics)
    assert "| Set5 | Set14 |" in table and "| hat_tiny_x2 | x2 |" in table and "| Bicubic | x2 |" in table
    # the CSV logger has no image API: the LR | bicubic | SR | HR strip is written into the run directory
    (sample,) = (tmp_path / "samples").glob("*_baby.png")
    assert Image.open(sample).size == (4 * 16, 16)


def test_results_table_layout():
    metrics = {"test/Set5/psnr": 32.9212, "test/Set5/ssim": 0.90471, "test/Urban100/psnr": 27.8712,
               "test/Urban100/ssim": 0.83461, "test/Set5/psnr_bicubic": 28.42, "test/Set5/ssim_bicubic": 0.8104}
    lines = format_results_table(metrics, 4, "HAT-S").splitlines()
    assert lines[1] == "| Method | Scale | Set5 | Urban100 |"
    assert lines[3] == "| Bicubic | x4 | 28.42/0.8104 | - |"
    assert lines[4] == "| HAT-S | x4 | 32.92/0.9047 | 27.87/0.8346 |"


def test_pretrained_weights_load_once(tmp_path):
    torch.manual_seed(1)
    source = hat_tiny_x2()
    path = tmp_path / "HAT_tiny.pth"
    torch.save({"params_ema": source.state_dict()}, path)
    module = HATModule(arch="hat_tiny_x2", pretrained=str(path))
    module.setup("fit")
    assert torch.equal(module.model.conv_first.weight, source.conv_first.weight)
    with torch.no_grad():
        module.model.conv_first.weight.zero_()  # training moved the weights: a later setup must not undo that
    module.setup("test")
    assert module.model.conv_first.weight.abs().sum() == 0

    x4 = HATModule(arch="hat_tiny_x4", pretrained=str(path))
    with pytest.raises(CheckpointError, match="upsample.2.weight"):
        x4.setup("fit")
    partial = HATModule(arch="hat_tiny_x4", pretrained=str(path), pretrained_strict=False)
    partial.setup("fit")  # x4 fine-tuned from x2: everything but the second upsampling stage loads
    assert torch.equal(partial.model.layers[0].conv.weight, source.layers[0].conv.weight)


def test_network_g_maps_an_official_option_block():
    network_g = {"type": "HAT", "upscale": 2, "in_chans": 3, "img_size": 16, "window_size": 8, "compress_ratio": 3,
                 "squeeze_factor": 12, "conv_scale": 0.01, "overlap_ratio": 0.5, "img_range": 1.0, "depths": [2, 2],
                 "embed_dim": 36, "num_heads": [3, 3], "mlp_ratio": 2, "upsampler": "pixelshuffle",
                 "resi_connection": "1conv"}
    module = HATModule(network_g=network_g)
    assert sum(p.numel() for p in module.model.parameters()) == sum(p.numel() for p in hat_tiny_x2().parameters())
    with pytest.raises(ConfigError, match="SwinIR"):
        HATModule(network_g={**network_g, "type": "SwinIR"})


@pytest.mark.slow
def test_short_training_beats_bicubic_on_held_out_photos(tmp_path):
    """The default recipe, shortened to 1,000 steps: PSNR-Y on the 3 held-out photos must exceed MATLAB bicubic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is several times faster than two
    try:
        pl.seed_everything(0)
        dm = SRDataModule(scale=2, patch_size=16, batch_size=8, samples_per_epoch=8000)
        module = HATModule(arch="hat_tiny_x2", log_images=0,
                           optimizer={"name": "adam", "lr": 2e-3, "betas": [0.9, 0.99]},
                           scheduler={"name": "multistep", "milestones": [500, 700, 850, 950], "gamma": 0.5})
        trainer = _trainer(tmp_path, max_steps=1000, callbacks=[EMAWeightAveraging(decay=0.99)],
                           limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
        (result,) = trainer.test(module, datamodule=dm, verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert result["test/Photos3/psnr"] > result["test/Photos3/psnr_bicubic"] + 0.2
    assert result["test/Photos3/ssim"] > result["test/Photos3/ssim_bicubic"]
