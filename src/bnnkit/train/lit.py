"""The one Lightning routine that trains every method.

Loss per batch: ``mean over S*B of CE(logits, y) + w_t * KL / N + aux`` where the network returns
``S`` stochastic passes or ensemble members per example (every member sees every example),
(segmentation: logits ``[S, B, C, H, W]``, the mean over every non-void pixel of every pass),
``N`` is the number of training examples, ``w_t = kl_weight * min(1, (epoch+1) / anneal)`` and
``aux`` collects layer-specific training losses (LP-BNN's weighted VAE negative ELBO).
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
import torch.nn.functional as F

from ..data.loader import Augment
from ..data.segmentation import IGNORE_INDEX
from ..methods import UQModel
from ..models import Folded
from .config import TrainConfig


class LitUQ(L.LightningModule):
    def __init__(
        self, model: UQModel, cfg: TrainConfig, n_train: int, augment: Augment | None
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.n_train = n_train
        self.augment = augment
        self.kl_weight = float(model.options.get("kl_weight", 1.0))
        # the compiled forward lives in a dict: as an attribute it would be registered as a
        # submodule and add its own keys to the checkpoints
        self._compiled: dict[str, object] = {}
        #: channels-last in effect (``cfg.channels_last`` on a non-CPU device): set at fit start
        self.channels_last = False

    def _inputs(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        if augment and self.augment is not None:
            x = self.augment(x, None)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def on_fit_start(self) -> None:
        self.channels_last = channels_last_applies(self.cfg.channels_last, self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _forward(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        """The training forward pass, through ``torch.compile`` when asked for (the model
        itself stays uncompiled: evaluation and checkpoints see plain modules)."""
        if self.cfg.compile == "none":
            return self.model(x, samples)
        fn = self._compiled.get("forward")
        if fn is None:
            fn = self._compiled["forward"] = torch.compile(self.model, mode=self.cfg.compile)
        return fn(x, samples)

    def current_kl_weight(self) -> float:
        anneal = self.cfg.kl_anneal_epochs
        if anneal <= 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, (self.current_epoch + 1) / anneal)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self._inputs(x, augment=True)
        streams = self.model.data_streams
        if streams > 1 or (
            self.cfg.ensemble_protocol == "split" and isinstance(self.model.net, Folded)
        ):
            # member m sees only chunk m of the batch: BatchEnsemble's original protocol
            # ("split"), or a deep ensemble's own data order (the loader stacks one batch per
            # member, so every member still sees every example each epoch)
            M = self.model.net.members
            n = (len(y) // M) * M
            logits = self.model.net.forward_folded(x[:n])  # [n, C(, H, W)], member-major
            nll = cross_entropy(logits, y[:n])
        else:
            logits = self._forward(x, 1)  # [S, B, C(, H, W)]: every member sees every example
            S = logits.shape[0]
            nll = cross_entropy(logits.flatten(0, 1), y.repeat(S, *[1] * (y.dim() - 1)))
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
        probs = logits.softmax(2).mean(0)  # [B, C] or [B, C, H, W]
        y = y.long()
        ignore = IGNORE_INDEX if y.dim() > 1 else -100  # label maps: void pixels not scored
        nll = F.nll_loss(probs.clamp_min(1e-12).log(), y, ignore_index=ignore)
        acc = (probs.argmax(1) == y)[y != ignore].float().mean()
        self.log("val_nll", nll, prog_bar=True, sync_dist=True)
        self.log("val_acc", acc, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        # weight decay on shared weights only: rank-1 factors, posterior scales, biases and
        # ensemble factors are left alone (their prior, if any, is in the KL)
        decay, rest = [], []
        for name, p in self.model.named_parameters():
            (decay if name.rsplit(".", 1)[-1] == "weight" else rest).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}]
        if rest:
            groups.append({"params": rest, "weight_decay": 0.0})
        c = self.cfg
        if c.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0)
        else:
            opt = torch.optim.Adam(groups, lr=c.lr)
        if c.warmup_epochs:
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda e: warmup_cosine(e, c.warmup_epochs, c.epochs)
            )
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, c.epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``[N, C]`` or ``[N, C, H, W]`` over the labels that are not
    ``IGNORE_INDEX`` (void pixels); 0 (with a gradient path) when every label is void, where
    ``F.cross_entropy`` would return NaN."""
    y = y.long()
    if y.dim() == 1:  # one label per example: every label counts (255 may be a class)
        return F.cross_entropy(logits.float(), y)
    if not (y != IGNORE_INDEX).any():
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)


def warmup_cosine(epoch: int, warmup: int, epochs: int) -> float:
    """Learning-rate factor of epoch ``epoch``: linear from ``1/warmup`` to 1 over the first
    ``warmup`` epochs, then a cosine from 1 down to 0 at ``epochs``."""
    if epoch < warmup:
        return (epoch + 1) / warmup
    t = (epoch - warmup) / max(1, epochs - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def channels_last_applies(requested: bool, device: torch.device | str) -> bool:
    """Whether the ``channels_last`` option takes effect on ``device``: only on accelerators.

    On a CPU it is ignored with a warning: oneDNN's channels-last convolution backward crashes
    (segmentation fault, double free) or never returns on some AVX2-only CPUs with torch 2.13
    (e.g. a 1x1 stride-2 convolution from 3-4 channels at batch 16-50), and on the CPUs where it
    runs it was measured no faster than the standard layout (BENCHMARKS.md, "channels-last on
    CPU"). The standard layout computes the same function."""
    if not requested:
        return False
    if torch.device(device).type == "cpu":
        warnings.warn(
            "channels_last is ignored on a CPU device: it is a GPU optimisation, and oneDNN's "
            "channels-last convolution kernels crash or hang on some CPUs; training runs in the "
            "standard memory layout (same results). Set channels_last=false to silence this.",
            stacklevel=2,
        )
        return False
    return True
