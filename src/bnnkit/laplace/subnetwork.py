"""Full-covariance linearised Laplace over a subnetwork (Daxberger et al., 2021): the GGN of
the chosen parameters accumulated in float32 chunks into a float64 matrix, Cholesky, a covariance
root for a one-GEMM predictive, scalar marginal likelihood by bisection on the GGN eigenvalues."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from .base import (
    _batches,
    _check_inputs,
    _check_labels,
    _flush_,
    _Laplace,
    _scalar_marglik_optimum,
    _symmetrise_,
    as_logits_model,
)
from .jacobians import (
    SubnetJacobian,
)

# ---------------------------------------------------------------------------- subnetwork


#: where :class:`SubnetLaplace` runs its dense S x S linear algebra
LINALG_DEVICES = ("cpu", "model")


class SubnetLaplace(_Laplace):
    """Full-covariance linearised Laplace over a subnetwork (flat parameter ``indices``).

    The remaining parameters stay at their MAP values. ``memory_budget`` bounds the Jacobian
    work (bytes or a string like '2GB'); the ``S x S`` posterior itself is extra.

    ``linalg_device``: where the dense ``S x S`` float64 work runs (Cholesky factor, the GGN's
    eigendecomposition for marginal-likelihood tuning, triangular solves): ``"cpu"`` (default:
    the host, where the float64 GGN is accumulated) or ``"model"`` (the model's device, e.g. a
    GPU, which holds a float64 copy of the GGN and its factor there, 2 x 8 S² bytes: the host's
    eigendecomposition grows as S³ and took 108 s at S = 12,000 on 2 cores).
    """

    kind = "subnetwork"

    def __init__(
        self,
        model: nn.Module,
        subnetwork_indices,
        prior_precision: float | torch.Tensor = 1.0,
        memory_budget: str | int = "2GB",
        likelihood: str = "classification",
        linalg_device: str = "cpu",
    ) -> None:
        if linalg_device not in LINALG_DEVICES:
            raise ConfigError(
                f"linalg_device must be one of {', '.join(LINALG_DEVICES)}, got {linalg_device!r}"
            )
        self.linalg_device = linalg_device
        # layout first: the prior's shape depends on the layers the subnetwork touches
        logits_model = as_logits_model(model)
        self.jac = SubnetJacobian(logits_model, subnetwork_indices, memory_budget)
        self.indices = self.jac.indices
        slot_of = torch.zeros(self.indices.numel(), dtype=torch.long)
        names: list[str] = []
        module_ids: dict[int, int] = {}
        for g in self.jac.groups:
            key = id(g.slot.module)
            if key not in module_ids:
                module_ids[key] = len(module_ids)
                names.append(g.slot.name.rsplit(".", 1)[0])
            slot_of[g.cols] = module_ids[key]
        self.layer_of = slot_of
        self.layer_names = names
        super().__init__(logits_model, prior_precision, memory_budget, likelihood)
        self.mean = self._snapshot().double().cpu()  # the MAP; set again by every fit
        self._ggn: torch.Tensor | None = None

    @property
    def ggn(self) -> torch.Tensor | None:
        """The ``[S, S]`` float64 GGN of the subnetwork (scaled to the data set). Writing to it
        (``la.ggn = G``, ``la.ggn *= 2``, ``la.ggn[i, j] = v``) invalidates every quantity derived
        from it (factors, eigenbasis, marginal likelihood)."""
        return self._ggn

    @ggn.setter
    def ggn(self, value: torch.Tensor | None) -> None:
        if value is not None:
            S = self.n_params
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (S, S):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise InputError(f"the GGN must be a [{S}, {S}] tensor, got {shape}")
        self._ggn = value
        self._fit_generation += 1

    def _curvature_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self._ggn,)

    @property
    def n_params(self) -> int:
        return self.indices.numel()

    def _la_device(self) -> torch.device:
        return self._params_device()[0] if self.linalg_device == "model" else torch.device("cpu")

    def _ggn_la(self) -> torch.Tensor:
        """The float64 GGN where the dense linear algebra runs: the GGN itself on the host (not
        to be modified), a transient copy elsewhere (not kept: the device holds at most the
        copy and one factor at a time)."""
        dev = self._la_device()
        return self.ggn if dev == self.ggn.device else self.ggn.to(dev)

    def _precision_la(self, d: torch.Tensor) -> torch.Tensor:
        """``GGN + diag(d)`` where the dense algebra runs (differentiable in ``d``); on another
        device built in place on the transient copy."""
        G = self._ggn_la()
        if G is self.ggn:
            return G + torch.diag(d)
        G.diagonal().add_(d.to(G.device))
        return G

    @property
    def n_prior_groups(self) -> int:
        return len(self.layer_names)

    def _prior_diag(self, prior: torch.Tensor) -> torch.Tensor:
        return (
            prior.expand(self.n_prior_groups)[self.layer_of]
            if prior.numel() > 1
            else (prior.expand(self.n_params))
        )

    def _rows(self) -> int:
        return self.jac.rows_per_chunk(self.num_classes or 10)

    # ---------------------------------------------------------------- fit
    def fit(
        self, data, batch_size: int = 256, progress=None, n_total: int | None = None
    ) -> SubnetLaplace:
        """Accumulate the GGN over the training data (``DataLoader`` or ``(x, y)``); see
        :meth:`_Laplace.fit` for ``n_total``."""
        device, dtype = self._params_device()
        S = self.n_params
        ggn = torch.zeros(S, S, dtype=torch.float64)
        # chunk products go into an S x S accumulator in the model's dtype on its device (in
        # place, no S x S temporaries), flushed into the float64 GGN every few chunks: peak
        # memory ~1.5x the float64 matrix, float32 rounding only over a few chunks' sums
        acc = torch.zeros(S, S, dtype=dtype, device=device)
        pending = 0
        loss, n = 0.0, 0
        C = None
        for xb, yb in _batches(data, batch_size):
            _check_inputs(xb)
            if C is None:
                C = self._first_logits(xb.to(device, dtype))
                self.num_classes = C
                rows = self.jac.rows_per_chunk(C)
            yb = _check_labels(yb, C)
            for i in range(0, len(xb), rows):
                x, y = xb[i : i + rows].to(device, dtype), yb[i : i + rows].to(device)
                f, J = self.jac.logits_and_jacobian(x, reuse=True)
                p = torch.softmax(f, -1)
                Jp = torch.bmm(p.unsqueeze(1), J).squeeze(1)  # [n, S]
                A = J.mul_(p.sqrt()[..., None]).reshape(-1, S)  # in place: J is not needed again
                acc.addmm_(A.T, A).addmm_(Jp.T, Jp, alpha=-1.0)
                pending += 1
                if pending == 8:
                    _flush_(ggn, acc)
                    pending = 0
                loss += float(F.cross_entropy(f.double(), y, reduction="sum"))
                n += len(x)
            if progress is not None:
                progress(len(xb))
        _flush_(ggn, acc)
        del acc
        scale = self._rescale(n, n_total)
        _symmetrise_(ggn)
        self.ggn = ggn.mul_(scale) if scale != 1.0 else ggn
        self.mean = self._snapshot().double().cpu()  # the weights the GGN was computed at
        self.loss, self.n_data = loss * scale, n_total or n
        self._mark_fitted()
        return self

    # ---------------------------------------------------------------- posterior
    @property
    def posterior_precision(self) -> torch.Tensor:
        self._check_fitted()
        return self.ggn + torch.diag(self._prior_diag(self.prior_precision))

    def cholesky(self) -> torch.Tensor:
        """Lower Cholesky factor of the posterior precision (float64)."""
        return self._cached("cholesky", self._cholesky)

    def _cholesky(self) -> torch.Tensor:
        P = self._precision_la(self._prior_diag(self.prior_precision))
        L, info = torch.linalg.cholesky_ex(P)
        if int(info) != 0:
            smallest = float(torch.linalg.eigvalsh(P)[0])
            raise ConfigError(
                f"the posterior precision is not positive definite (smallest eigenvalue "
                f"{smallest:.3g}); use a larger prior precision (now "
                f"{self.prior_precision.tolist()})"
            )
        return L

    @property
    def posterior_covariance(self) -> torch.Tensor:
        return torch.cholesky_inverse(self.cholesky()).cpu()

    def _log_evidence(self, prior: torch.Tensor) -> torch.Tensor:
        d = self._prior_diag(prior)
        P = self._precision_la(d)
        L, info = torch.linalg.cholesky_ex(P)
        if int(info) != 0:
            raise ConfigError(
                "posterior precision not positive definite; raise the prior precision"
            )
        logdet = (2 * torch.log(torch.diagonal(L)).sum()).cpu()
        theta = self.mean
        return -self.loss - 0.5 * (d * theta**2).sum() + 0.5 * torch.log(d).sum() - 0.5 * logdet

    def _eigh(self, vectors: bool):
        """Eigen-decomposition of the GGN (independent of the prior: kept across priors)."""
        if vectors:

            def eigh():
                lam, V = torch.linalg.eigh(self._ggn_la())
                return lam.cpu(), V

            return self._cached("eigh", eigh, uses_prior=False)
        return self._cached(
            "eigvalsh", lambda: (torch.linalg.eigvalsh(self._ggn_la()).cpu(), None),
            uses_prior=False,
        )  # fmt: skip

    def _marglik_scalar(self) -> float:
        lam, _ = self._eigh(vectors=False)
        return _scalar_marglik_optimum(lam, float((self.mean**2).sum()), self.n_params)

    def _grid_variance(self, grid):
        lam, V = self._eigh(vectors=True)
        inv = 1.0 / (lam.clamp_min(0.0)[:, None] + grid[None, :])  # [S, G]

        V_ = V.to(*self._params_device())  # the Jacobians' device and dtype

        def variance(x):
            f, J = self.jac.logits_and_jacobian(x, reuse=True)
            JV = J @ V_  # [n, C, S] in the GGN's eigenbasis
            return f, JV.square_().double().cpu() @ inv

        return variance

    # ---------------------------------------------------------------- predictive pieces
    def _covariance_root(self, like: torch.Tensor) -> torch.Tensor:
        """``M = L^{-T}`` (``Sigma = M M^T``) in the Jacobian's dtype and device, cached per
        prior: the predictive is then one GEMM ``J M`` per chunk (float32 for a float32 model)
        instead of a float64 triangular solve per chunk."""
        return self._cached(("root", like.device, like.dtype), lambda: self._root_of(like))

    def _root_of(self, like: torch.Tensor) -> torch.Tensor:
        L = self.cholesky()
        S, block = L.shape[0], 2048
        root = torch.empty(S, S, dtype=like.dtype, device=like.device)
        for i in range(0, S, block):  # columns of L^{-1} = rows of M, a block at a time
            E = torch.zeros(S, min(block, S - i), dtype=L.dtype, device=L.device)
            E[i : i + block].fill_diagonal_(1.0)
            root[i : i + block] = torch.linalg.solve_triangular(L, E, upper=False).T.to(root)
        return root

    def _mean_cov(self, x):
        f, J = self.jac.logits_and_jacobian(x, reuse=True)
        n, C, S = J.shape
        Z = (J.reshape(n * C, S) @ self._covariance_root(J)).reshape(n, C, S)
        return f, torch.bmm(Z, Z.transpose(1, 2)).double().cpu()

    def _sample_params(self, gen) -> None:
        L = self.cholesky()
        eps = torch.randn(self.n_params, generator=gen, dtype=torch.float64).to(L.device)
        step = torch.linalg.solve_triangular(L.T, eps[:, None], upper=True)[:, 0]
        theta = self.mean + step.cpu()
        self._write(theta)

    def _snapshot(self) -> torch.Tensor:
        out = torch.empty(self.n_params, dtype=torch.float64)
        for g in self.jac.groups:
            p = g.slot.param.detach()
            out[g.cols] = p.reshape(-1)[g.local.to(p.device)].double().cpu()
        return out

    def _restore(self, saved: torch.Tensor) -> None:
        self._write(saved)

    @torch.no_grad()
    def _write(self, theta: torch.Tensor) -> None:
        for g in self.jac.groups:
            p = g.slot.param
            p.view(-1)[g.local.to(p.device)] = theta[g.cols].to(p.device, p.dtype)

    # ---------------------------------------------------------------- persistence
    def state(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "kind": self.kind,
            "indices": self.indices,
            "prior_precision": self.prior_precision,
            "ggn": self.ggn,
            "mean": self.mean,
            "loss": self.loss,
            "n_data": self.n_data,
            "num_classes": self.num_classes,
        }

    def load_state(self, state: dict[str, Any]) -> SubnetLaplace:
        if not torch.equal(state["indices"].long(), self.indices):
            raise ConfigError("the saved Laplace state is for a different subnetwork")
        S = self.n_params
        if tuple(state["ggn"].shape) != (S, S):
            raise ConfigError(f"saved GGN has shape {tuple(state['ggn'].shape)}, expected {(S, S)}")
        self.ggn = state["ggn"].double()
        return self._load_common(state)
