"""Masked-LM pre-training of the padding-free BERT (Devlin et al. 2019's objective; ByteTransformer's model).

Metrics: `train/loss`, `val/loss` and `test/loss` (cross-entropy in nats over the masked tokens; chance is
ln(vocab)), `val/accuracy` and `test/accuracy` (masked tokens predicted exactly).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric

from projects.bytetransformer.model import (
    ARCHITECTURE_FIELDS,
    BertForMaskedLM,
    load_hf_state_dict,
    model_config,
    read_hf_config,
    read_hf_weights,
)
from shared.lit.errors import CheckpointError, ConfigError
from shared.lit.module import PaperModule


class MaskedLM(PaperModule):
    """Args:
    config: "tiny", "bert_base" or "bert_large" (`model.MODEL_CONFIGS`).
    vocab_size: the embedding table's size (the project config passes the data's `vocab_size`).
    pretrained: a local Hugging Face BERT directory (config.json, weights, vocab.txt) whose weights are loaded,
        strictly, when training starts (`setup`), once: a resumed run then restores its own checkpoint over them.
        Its config.json must describe the architecture `config` + `overrides` + `vocab_size` build (checked).
    overrides: BertConfig fields to change, e.g. {attention_backend: reference, hidden_dropout_prob: 0.0}.
    """

    def __init__(self, config: str = "tiny", vocab_size: int | None = None, pretrained: str | None = None,
                 overrides: dict[str, Any] | None = None, optimizer: dict[str, Any] | None = None,
                 scheduler: dict[str, Any] | None = None) -> None:
        super().__init__(optimizer or {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01}, scheduler)
        self.save_hyperparameters()
        overrides = dict(overrides or {})
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        self.model = BertForMaskedLM(model_config(config, **overrides))
        self._pretrained_loaded = False
        self.metrics = torch.nn.ModuleDict({
            f"{split}_{name}": MeanMetric() for split in ("val", "test") for name in ("loss", "accuracy")
        })

    def setup(self, stage: str) -> None:
        if self.hparams.pretrained and not self._pretrained_loaded:
            directory = self.hparams.pretrained
            expected, ours = read_hf_config(directory), self.model.config
            different = [f"{name}: config.json {getattr(expected, name)} vs model {getattr(ours, name)}"
                         for name in ARCHITECTURE_FIELDS if getattr(expected, name) != getattr(ours, name)]
            if different:
                raise CheckpointError(f"{directory}/config.json describes another BERT than model.config="
                                      f"{self.hparams.config} ({'; '.join(different)}); set model.config, "
                                      "model.overrides or data.vocab_size to match")
            load_hf_state_dict(self.model, read_hf_weights(directory), source=str(directory))
            self._pretrained_loaded = True

    def on_fit_start(self) -> None:
        data = getattr(self.trainer, "datamodule", None)
        tokens = getattr(data, "tokenizer_vocab_size", None)
        if tokens is not None and tokens > self.model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {tokens} tokens but the model's vocabulary is "
                              f"{self.model.config.vocab_size}: set data.vocab_size <= model.vocab_size, or use "
                              "the vocab.txt of model.pretrained")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        result = self.model.masked_lm_loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.log("train/loss", result.loss, prog_bar=True, sync_dist=True)
        return result.loss

    def _evaluate(self, batch: dict[str, torch.Tensor], split: str) -> None:
        result = self.model.masked_lm_loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
        count = result.count.float()
        loss, accuracy = self.metrics[f"{split}_loss"], self.metrics[f"{split}_accuracy"]
        loss.update(result.loss.detach(), weight=count)
        accuracy.update(result.correct.float() / count.clamp(min=1), weight=count)
        self.log(f"{split}/loss", loss, on_epoch=True, prog_bar=split == "val")
        self.log(f"{split}/accuracy", accuracy, on_epoch=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def samples_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())  # the padding-free model computes on these only

    def flops_per_sample(self) -> float | None:
        data = getattr(self.trainer, "datamodule", None)
        if not hasattr(data, "length_stats"):
            return None
        tokens, squared = data.length_stats()
        return 3 * self.model.forward_flops(tokens, 0.15 * (tokens - 2), squared)
