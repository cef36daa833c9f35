"""Diagonal linearised Laplace over all trainable parameters (the GGN diagonal), which also
accumulates the Jacobian energy that the predictive-variance subnetwork rule needs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from .base import (
    _batches,
    _check_inputs,
    _check_labels,
    _Laplace,
    _scalar_marglik_optimum,
    as_logits_model,
)
from .jacobians import (
    flat_params,
    full_jacobians,
    ggn_diagonal,
    n_params,
    param_slots,
)

# ---------------------------------------------------------------------------- diagonal


class DiagLaplace(_Laplace):
    """Diagonal linearised Laplace over all trainable parameters (GGN diagonal)."""

    kind = "diag"

    def __init__(
        self, model, prior_precision=1.0, memory_budget="2GB", likelihood="classification"
    ):
        logits_model = as_logits_model(model)
        self.slots = param_slots(logits_model)
        self.total = n_params(logits_model)
        super().__init__(logits_model, prior_precision, memory_budget, likelihood)
        self.mean = self._flat().double().cpu()
        self._h: torch.Tensor | None = None
        self.layer_of = torch.cat(
            [torch.full((s.numel,), i, dtype=torch.long) for i, s in enumerate(self.slots)]
        )

    @property
    def h(self) -> torch.Tensor | None:
        """The ``[P]`` float64 GGN diagonal (scaled to the data set). Writing to it (``la.h =
        d``, ``la.h *= 2``) invalidates every quantity derived from it."""
        return self._h

    @h.setter
    def h(self, value: torch.Tensor | None) -> None:
        if value is not None and (
            not isinstance(value, torch.Tensor) or tuple(value.shape) != (self.total,)
        ):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
            raise InputError(f"the GGN diagonal must be a [{self.total}] tensor, got {shape}")
        self._h = value
        self._fit_generation += 1

    def _curvature_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self._h,)

    @property
    def n_prior_groups(self) -> int:
        return len(self.slots) if hasattr(self, "slots") else 1

    def _flat(self) -> torch.Tensor:
        return flat_params(self.model)

    def _prior_diag(self, prior):
        return (
            prior.expand(self.n_prior_groups)[self.layer_of]
            if prior.numel() > 1
            else (prior.expand(self.total))
        )

    def _rows(self) -> int:
        return min(j.rows_per_chunk(self.num_classes) for j in self._jac)

    def fit(
        self, data, batch_size: int = 256, progress=None, n_total: int | None = None
    ) -> DiagLaplace:
        """Accumulate the GGN diagonal ``h`` over the training data; on the way also the
        Jacobian energy ``jacobian_energy = sum_n sum_c J_nc**2`` (what the predictive-variance
        subnetwork rule needs), at the cost of one more reduction."""
        device, dtype = self._params_device()
        h = torch.zeros(self.total, dtype=torch.float64)
        q = torch.zeros(self.total, dtype=torch.float64)
        loss, n, C = 0.0, 0, None
        for xb, yb in _batches(data, batch_size):
            _check_inputs(xb)
            if C is None:
                C = self._first_logits(xb.to(device, dtype))
                self.num_classes = C
                self._jac = full_jacobians(self.model, self.budget, C)
                rows = self._rows()
            yb = _check_labels(yb, C)
            for i in range(0, len(xb), rows):
                x, y = xb[i : i + rows].to(device, dtype), yb[i : i + rows].to(device)
                for jac in self._jac:
                    f, J = jac.logits_and_jacobian(x, reuse=True)
                    h[jac.indices] += ggn_diagonal(J, torch.softmax(f, -1), True).double().cpu()
                    q[jac.indices] += J.sum((0, 1)).double().cpu()  # J now holds J**2
                loss += float(F.cross_entropy(f.double(), y, reduction="sum"))
                n += len(x)
            if progress is not None:
                progress(len(xb))
        scale = self._rescale(n, n_total)
        self.h, self.loss, self.n_data = h.clamp_min(0.0) * scale, loss * scale, n_total or n
        self.mean = self._flat().double().cpu()  # the weights the curvature was computed at
        self.jacobian_energy = q * scale
        self._mark_fitted()
        return self

    @property
    def posterior_variance(self) -> torch.Tensor:
        self._check_fitted()
        return 1.0 / (self.h + self._prior_diag(self.prior_precision))

    def _log_evidence(self, prior):
        d = self._prior_diag(prior)
        return (
            -self.loss
            - 0.5 * (d * self.mean**2).sum()
            + 0.5 * torch.log(d).sum()
            - 0.5 * torch.log(self.h + d).sum()
        )

    def _marglik_scalar(self) -> float:
        return _scalar_marglik_optimum(self.h, float((self.mean**2).sum()), self.total)

    def _grid_variance(self, grid):
        inv = 1.0 / (self.h[:, None] + grid[None, :])  # [P, G]

        device, dtype = self._params_device()
        weights = [inv[jac.indices].to(device, dtype) for jac in self._jac]

        def variance(x):
            var = 0.0
            for jac, w in zip(self._jac, weights):
                f, J = jac.logits_and_jacobian(x, reuse=True)
                var = var + (J.square_() @ w).double().cpu()  # [n, C, G]
            return f, var

        return variance

    def _mean_cov(self, x):
        sd = self.posterior_variance.sqrt().float()
        cov = 0.0
        for jac in self._jac:
            f, J = jac.logits_and_jacobian(x, reuse=True)
            Js = J.mul_(sd[jac.indices].to(J.device))  # float32 GEMM: [n, C, S] @ [n, S, C]
            cov = cov + torch.bmm(Js, Js.transpose(1, 2)).double().cpu()
        return f, cov

    def _sample_params(self, gen) -> None:
        eps = torch.randn(self.total, generator=gen, dtype=torch.float64)
        self._write(self.mean + self.posterior_variance.sqrt() * eps)

    def _snapshot(self) -> torch.Tensor:
        return self._flat().double().cpu()

    def _restore(self, saved: torch.Tensor) -> None:
        self._write(saved)

    @torch.no_grad()
    def _write(self, theta):
        for s in self.slots:
            s.param.copy_(theta[s.offset : s.offset + s.numel].view_as(s.param))

    def state(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "kind": self.kind,
            "prior_precision": self.prior_precision,
            "h": self.h,
            "mean": self.mean,
            "loss": self.loss,
            "n_data": self.n_data,
            "num_classes": self.num_classes,
        }

    def load_state(self, state: dict[str, Any]) -> DiagLaplace:
        if state["h"].numel() != self.total:
            raise ConfigError(
                f"saved diagonal has {state['h'].numel()} entries, model {self.total}"
            )
        self.h = state["h"].double()
        self._jac = full_jacobians(self.model, self.budget, int(state["num_classes"]))
        return self._load_common(state)
        return self
