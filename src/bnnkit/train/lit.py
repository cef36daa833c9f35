"""The one Lightning routine that trains every method.

Loss per batch: ``mean over S*B of CE(logits, y) + w_t * KL / N + aux`` where the network returns
``S`` stochastic passes or ensemble members per example (every member sees every example),
``N`` is the number of training examples, ``w_t = kl_weight * min(1, (epoch+1) / anneal)`` and
``aux`` collects layer-specific training losses (LP-BNN's weighted VAE negative ELBO).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from ..data.transforms import random_crop_flip
from ..methods import UQModel
from .config import TrainConfig


class LitUQ(L.LightningModule):
    def __init__(self, model: UQModel, cfg: TrainConfig, n_train: int, augment: bool) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.n_train = n_train
        self.augment = augment
        self.kl_weight = float(model.options.get("kl_weight", 1.0))

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x

    def current_kl_weight(self) -> float:
        anneal = self.cfg.kl_anneal_epochs
        if anneal <= 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, (self.current_epoch + 1) / anneal)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self._inputs(x)
        if self.augment:
            x = random_crop_flip(x)
        logits = self.model(x, 1)  # [S, B, C]
        S = logits.shape[0]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.repeat(S))
        kl = self.model.kl()
        aux = self.model.aux_loss()
        loss = nll + self.current_kl_weight() * kl / self.n_train + aux
        self.log("train_nll", nll, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        if aux.requires_grad:
            self.log("train_aux", aux, on_step=False, on_epoch=True, sync_dist=True)
        if kl.requires_grad:
            self.log("train_kl", kl / self.n_train, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(self._inputs(x), 1).float()
        probs = logits.softmax(-1).mean(0)
        nll = F.nll_loss(probs.clamp_min(1e-12).log(), y)
        acc = (probs.argmax(-1) == y).float().mean()
        self.log("val_nll", nll, prog_bar=True, sync_dist=True)
        self.log("val_acc", acc, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(
            self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.cfg.epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
