"""Linearised Laplace approximations for classifiers: subnetwork (full covariance over chosen
parameters; Daxberger et al., 2021), last-layer, and diagonal over all parameters.

Habits follow laplace-torch: ``la = SubnetLaplace(model, indices); la.fit(train);
la.optimize_prior_precision(); la.predict(x)``. The differences are in how the work is done:

* Jacobians are computed for the subnetwork only (:mod:`bnnkit.laplace.jacobians`), chunked over
  inputs and parameter entries within a byte budget; nothing of size batch x classes x all
  parameters is ever allocated.
* The generalised Gauss-Newton (GGN) ``G = sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n`` is
  accumulated in float64; the posterior precision is ``G + diag(prior precision)``.
* Scalar prior precision by marginal likelihood uses the eigenvalues of ``G`` once: the log
  evidence is then a concave function of ``log(prior precision)`` whose maximiser is found by
  bisection on its derivative, with no refactorisation per step. Validation grid search uses the
  eigenbasis too, so every grid point costs a matrix-vector product, not a new factorisation.
* Predictive: the linearised (GLM) model ``f(x) + J(x)(theta - theta*)`` with the probit
  approximation or Monte Carlo samples of the logits, or the non-linearised network with sampled
  weights, for comparison.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..metrics._checks import check_labels
from ..options import Option, OptionTable
from ..predictive import Predictive
from .jacobians import (
    logits_of,
    param_fingerprint,
    parse_budget,
)

LINKS = ("probit", "mc", "sample_weights")

PREDICTIVE_OPTIONS = OptionTable(
    "Laplace predictive",
    [
        Option("link", "choice", "probit", "linearised probit, linearised Monte Carlo, or the "
               "network with sampled weights", choices=LINKS),
        Option("n_samples", "int", 100, "samples for link mc / sample_weights", low=1),
        Option("seed", "int", 0, "seed of the samples", low=0),
    ],
)  # fmt: skip
TUNING_OPTIONS = OptionTable(
    "optimize_prior_precision",
    [
        Option("method", "choice", "marglik", "marginal likelihood or validation grid search",
               choices=("marglik", "gridsearch")),
        Option("per_layer", "bool", False, "one prior precision per layer (marglik)"),
        Option("steps", "int", 100, "Adam steps of the per-layer marglik", low=1),
        Option("lr", "float", 0.1, "Adam learning rate of the per-layer marglik", low=0.0,
               low_open=True),
    ],
)  # fmt: skip


# ---------------------------------------------------------------------------- helpers


class _Logits(nn.Module):
    """Adapts a bnnkit single-network model (``[1, B, C]`` outputs) to ``[B, C]`` logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x, 1)[0]


def as_logits_model(model: nn.Module) -> nn.Module:
    """A module ``x -> logits [B, C]``: plain classifiers as they are, bnnkit models unwrapped."""
    net = getattr(model, "net", None)
    if net is not None and hasattr(model, "method"):  # a UQModel
        model = net
    members = getattr(model, "members", None)
    if members is not None and hasattr(model, "body"):  # a Folded network
        if members != 1:
            raise InputError(
                f"a Laplace approximation needs one trained network (the MAP), got an ensemble of "
                f"{members} members; use the deterministic model"
            )
        return _Logits(model)
    return model


def _batches(data, batch_size: int):
    """Yield ``(x, y)`` from a DataLoader-like iterable or an ``(x, y)`` tensor pair."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if len(x) != len(y):
            raise InputError(f"inputs and labels differ in length: {len(x)} vs {len(y)}")
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    if not isinstance(data, Iterable):
        raise InputError("data must be a DataLoader of (inputs, labels) or a tuple (x, y)")
    for batch in data:
        yield batch[0], batch[1]


def _check_inputs(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise InputError("inputs must be a float tensor")
    if x.shape[0] == 0:
        raise InputError("empty batch: at least one input is needed")
    if x.dim() < 2:
        raise InputError(
            f"inputs of shape {tuple(x.shape)} have no axis beside the batch: give a batch "
            "[B, ...] of what the model takes (one feature per example: x[:, None])"
        )
    if not torch.isfinite(x).all():
        raise InputError("input contains NaN or inf values; clean the data first")


def _check_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The metrics' label check, with the hint a Laplace user needs for float labels."""
    if isinstance(y, torch.Tensor) and y.dtype.is_floating_point:
        raise InputError(
            "labels are floats: a classification Laplace needs integer class labels "
            "(likelihood='regression' is not supported for classifiers)"
        )
    check_labels(y, len(y), num_classes)
    return y.long()


def probit_probs(f: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Multi-class probit approximation ``softmax(f / sqrt(1 + pi/8 var))``; ``[.., C]``."""
    return torch.softmax(f / torch.sqrt(1.0 + math.pi / 8.0 * var), dim=-1)


#: the scalar marginal-likelihood search covers prior precisions in [e^-30, e^30]
LOG_PRIOR_BOUND = 30.0


class MarglikBoundWarning(UserWarning):
    """The marginal-likelihood optimum of the prior precision lies outside the searched range;
    the bound was used."""


def _scalar_marglik_optimum(eigs: torch.Tensor, theta_sq: float, dim: int) -> float:
    """argmax over delta > 0 of ``dim/2 log delta - delta/2 theta_sq - 1/2 sum log(eigs+delta)``.

    Concave in ``t = log delta``; the root of its derivative is found by bisection."""
    lam = eigs.double().clamp_min(0.0)

    def grad(t: float) -> float:
        d = math.exp(t)
        return 0.5 * dim - 0.5 * d * theta_sq - 0.5 * float((d / (lam + d)).sum())

    lo, hi = -LOG_PRIOR_BOUND, LOG_PRIOR_BOUND
    if grad(hi) > 0:
        warnings.warn(
            f"the marginal likelihood still rises at prior precision e^{hi:g}: its optimum lies "
            f"beyond (|theta|^2 = {theta_sq:.3g} over {dim} weights; the weights are ~0 or carry "
            f"no curvature); the prior precision is set to e^{hi:g}. Check the subnetwork and the "
            "fit data, or set the prior precision yourself",
            MarglikBoundWarning,
            stacklevel=3,
        )
        return math.exp(hi)
    if grad(lo) < 0:
        warnings.warn(
            f"the marginal likelihood still rises at prior precision e^{lo:g}: its optimum lies "
            f"below (|theta|^2 = {theta_sq:.3g} over {dim} weights); the prior precision is set "
            f"to e^{lo:g}, an essentially flat prior. Check the fit data, or set the prior "
            "precision yourself",
            MarglikBoundWarning,
            stacklevel=3,
        )
        return math.exp(lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if grad(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return math.exp(0.5 * (lo + hi))


def _flush_(total: torch.Tensor, acc: torch.Tensor, block: int = 1024) -> None:
    """``total += acc; acc = 0`` in row blocks: an in-place add across dtypes (float64 +=
    float32) would otherwise make a full float64 copy of ``acc`` first."""
    for i in range(0, acc.shape[0], block):
        total[i : i + block].add_(acc[i : i + block].to(total.device))
    acc.zero_()


def _symmetrise_(M: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``M <- (M + M^T) / 2`` in place, in row blocks (no second S x S matrix)."""
    for i in range(0, M.shape[0], block):
        avg = 0.5 * (M[i : i + block, i:] + M[i:, i : i + block].T)
        M[i : i + block, i:] = avg
        M[i:, i : i + block] = avg.T
    return M


# ---------------------------------------------------------------------------- base class


class _Laplace(abc.ABC):
    """Shared fit / tune / predict logic; subclasses define the curvature and its use."""

    kind = "laplace"

    def __init__(
        self,
        model: nn.Module,
        prior_precision: float | torch.Tensor = 1.0,
        memory_budget: str | int = "2GB",
        likelihood: str = "classification",
    ) -> None:
        if likelihood != "classification":
            raise InputError(
                f"likelihood={likelihood!r} is not supported: bnnkit's Laplace approximations "
                "are for classifiers (likelihood='classification')"
            )
        self.model = as_logits_model(model)
        self.model.eval()
        self.budget = parse_budget(memory_budget)
        self.likelihood = likelihood
        self.num_classes: int | None = None
        self.n_data = 0
        self.loss = 0.0  # summed NLL of the training data at the MAP
        self._prior = self._as_prior(prior_precision)
        self._fitted = False
        # derived quantities are cached with the generations they were made in: the fit
        # generation (bumped by fit / load_state) and the prior generation (bumped by every new
        # prior precision); see :meth:`_cached`
        self._fit_generation = 0
        self._prior_generation = 0
        self._cache: dict = {}  # key -> (stamp, value)
        self._fingerprint: tuple[float, float] | None = None

    # ---------------------------------------------------------------- prior
    @property
    def n_prior_groups(self) -> int:
        return 1

    def _as_prior(self, value) -> torch.Tensor:
        p = torch.as_tensor(value, dtype=torch.float64).flatten()
        if p.numel() not in (1, self.n_prior_groups):
            raise InputError(
                f"prior precision must be a scalar or one value per layer ({self.n_prior_groups}), "
                f"got {p.numel()} values"
            )
        if not torch.isfinite(p).all() or (p <= 0).any():
            raise InputError(f"prior precision must be positive and finite, got {p.tolist()}")
        return p.clone()

    @property
    def prior_precision(self) -> torch.Tensor:
        return self._prior

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        self._prior = self._as_prior(value)
        self._prior_generation += 1

    def _curvature_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The curvature tensors a structure keeps (GGN, its diagonal): part of every cache
        stamp, so replacing one or writing into it in place also invalidates what was derived
        from it."""
        return ()

    def _stamp(self, uses_prior: bool) -> tuple:
        fit = (self._fit_generation,) + tuple(
            None if t is None else (id(t), t._version) for t in self._curvature_tensors()
        )
        return (fit, self._prior_generation) if uses_prior else (fit,)

    def _cached(self, key, build: Callable, uses_prior: bool = True):
        """``build()`` once per key and generation: a quantity of the curvature alone
        (``uses_prior=False``, e.g. the GGN's eigenbasis) survives a new prior, one that uses the
        prior (Cholesky factor, covariance root) does not; stale entries are dropped."""
        self._cache = {
            k: (stamp, v)
            for k, (stamp, v) in self._cache.items()
            if stamp == self._stamp(len(stamp) == 2)
        }
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = (self._stamp(uses_prior), build())
        return hit[1]

    def _mark_fitted(self) -> None:
        """Record the weights the posterior belongs to (see :meth:`_check_weights`)."""
        self._fitted = True
        self._fingerprint = param_fingerprint(self.model)
        self._fit_generation += 1

    def _load_common(self, state: dict[str, Any]):
        """What every structure's ``load_state`` restores once its curvature is set: the mean
        (which must be the model's current weights), loss, sizes and prior."""
        mean = state["mean"].double()
        if not torch.allclose(mean, self._snapshot().double().cpu(), rtol=1e-6, atol=1e-7):
            raise ConfigError(
                "the saved Laplace state was fitted at other weights than the model's; load "
                "the weights saved with it"
            )
        self.mean = mean
        self.loss, self.n_data = float(state["loss"]), int(state["n_data"])
        self.num_classes = int(state["num_classes"])
        self.prior_precision = state["prior_precision"]
        self._mark_fitted()
        return self

    def _check_weights(self) -> None:
        """The linearised predictive uses the model's current weights with the fitted
        posterior: refuse if they are no longer the weights it was fitted at."""
        now = param_fingerprint(self.model)
        then = self._fingerprint
        if then is not None and any(
            abs(a - b) > 1e-12 * max(1.0, abs(b)) for a, b in zip(now, then)
        ):
            raise ConfigError(
                f"the model's parameters changed since this {type(self).__name__} was fitted "
                "(training, load_state_dict or a write through .data); the posterior no longer "
                "belongs to them: call fit() again"
            )

    # ---------------------------------------------------------------- fit
    def _check_fitted(self) -> None:
        if not self._fitted:
            raise ConfigError(f"{type(self).__name__} is not fitted: call .fit(train_data) first")

    def _first_logits(self, x: torch.Tensor) -> int:
        try:
            with torch.no_grad():
                f = logits_of(self.model(x[:1]))
        except (RuntimeError, ValueError, IndexError) as e:  # shape errors inside the model
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise InputError(
                f"the model cannot run on these inputs (one example of shape "
                f"{tuple(x.shape[1:])}; {type(e).__name__}: {first}); give batches [B, ...] of "
                "the inputs the model was trained on"
            ) from None
        if f.dim() != 2:
            raise InputError(f"the model must return logits [batch, classes], got {tuple(f.shape)}")
        if f.shape[1] < 2:
            raise InputError(
                "the model has a single output: a classification Laplace needs logits for >= 2 "
                "classes (regression is not supported)"
            )
        return f.shape[1]

    def _params_device(self):
        p = next(self.model.parameters())
        return p.device, p.dtype

    # ---------------------------------------------------------------- what subclasses define
    @abc.abstractmethod
    def fit(self, data, batch_size: int = 256, progress=None, n_total: int | None = None):
        """Accumulate the curvature over training data. ``n_total``: the size of the whole
        training set when ``data`` is a subset of it; curvature and loss are then rescaled by
        ``n_total / len(data)`` (the posterior of the whole set, estimated from a subset)."""

    def _rescale(self, n: int, n_total: int | None) -> float:
        if n == 0:
            raise InputError("no training data: the Laplace fit needs at least one example")
        if n_total is None:
            return 1.0
        if n_total < n:
            raise InputError(f"n_total={n_total} is smaller than the {n} examples fitted on")
        return n_total / n

    @abc.abstractmethod
    def _mean_cov(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Linearised logits mean ``[n, C]`` and covariance ``[n, C, C]`` for a chunk."""

    @abc.abstractmethod
    def _rows(self) -> int:
        """Inputs per chunk for Jacobian work."""

    @abc.abstractmethod
    def _sample_params(self, generator) -> None:
        """Overwrite the model's parameters with one posterior sample."""

    @abc.abstractmethod
    def _snapshot(self) -> torch.Tensor:
        """The model's current values of the parameters that sampling overwrites."""

    @abc.abstractmethod
    def _restore(self, saved: torch.Tensor) -> None:
        """Write a :meth:`_snapshot` back (the model exactly as it was before sampling)."""

    @abc.abstractmethod
    def _log_evidence(self, prior: torch.Tensor) -> torch.Tensor:
        """Laplace log evidence for a prior precision (differentiable in it)."""

    @abc.abstractmethod
    def _marglik_scalar(self) -> float:
        """The evidence-maximising scalar prior precision."""

    @abc.abstractmethod
    def _grid_variance(self, grid: torch.Tensor) -> Callable:
        """A function ``x -> (f [n, C], var [n, C, G])``: probit variances for every grid value."""

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """Tensors and numbers that :meth:`load_state` restores."""

    # ---------------------------------------------------------------- predictive
    def predictive(
        self,
        x: torch.Tensor,
        link: str = "probit",
        n_samples: int = 100,
        seed: int = 0,
    ) -> Predictive:
        """Predictive for inputs ``x``.

        ``link='probit'``: linearised model, probit approximation (``S = 1``).
        ``link='mc'``: linearised model, ``n_samples`` logit samples (``S = n_samples``).
        ``link='sample_weights'``: the network itself with ``n_samples`` sampled weight vectors.
        """
        self._check_fitted()
        PREDICTIVE_OPTIONS.resolve({"link": link, "n_samples": n_samples, "seed": seed})
        _check_inputs(x)
        self._check_weights()
        device, dtype = self._params_device()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if link == "sample_weights":
            return self._predict_sampled_weights(x, n_samples, gen)
        rows = self._rows()
        outs = []
        for i in range(0, len(x), rows):
            f, cov = self._mean_cov(x[i : i + rows].to(device, dtype))
            f, cov = f.double().cpu(), cov.double().cpu()
            if link == "probit":
                outs.append(probit_probs(f, torch.diagonal(cov, dim1=-2, dim2=-1))[None])
            else:
                # a symmetric square root with negative eigenvalues clipped: the logit covariance
                # is often singular and, from float32 products, PSD only up to rounding
                lam, V = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)))
                chol = V * lam.clamp_min(0.0).sqrt()[:, None, :]
                eps = torch.randn(n_samples, *f.shape, generator=gen, dtype=f.dtype)
                samples = f + torch.einsum("ncd,snd->snc", chol, eps)
                outs.append(torch.softmax(samples, -1))
        return Predictive(torch.cat(outs, dim=1).float())

    def predict(self, x: torch.Tensor, link: str = "probit", n_samples: int = 100, seed: int = 0):
        """Predictive class probabilities ``[B, C]`` (the model average)."""
        return self.predictive(x, link, n_samples, seed).mean()

    @torch.no_grad()
    def _predict_sampled_weights(self, x, n_samples, gen) -> Predictive:
        device, dtype = self._params_device()
        probs = []
        saved = self._snapshot()
        try:
            for _ in range(n_samples):
                self._sample_params(gen)
                out = [
                    torch.softmax(
                        logits_of(self.model(x[i : i + 1024].to(device, dtype))).float(), -1
                    ).cpu()
                    for i in range(0, len(x), 1024)
                ]
                probs.append(torch.cat(out))
        finally:
            self._restore(saved)
        return Predictive(torch.stack(probs))

    # ---------------------------------------------------------------- tuning
    def optimize_prior_precision(
        self,
        method: str = "marglik",
        per_layer: bool = False,
        val: Any = None,
        grid: torch.Tensor | None = None,
        steps: int = 100,
        lr: float = 0.1,
    ) -> torch.Tensor:
        """Tune the prior precision: ``'marglik'`` (log evidence, scalar or per layer) or
        ``'gridsearch'`` (validation NLL of the probit predictive; ``val=(x, y)``)."""
        self._check_fitted()
        TUNING_OPTIONS.resolve({"method": method, "per_layer": per_layer, "steps": steps, "lr": lr})
        if method == "marglik":
            if per_layer and self.n_prior_groups > 1:
                self._marglik_per_layer(steps, lr)
            else:
                self.prior_precision = self._marglik_scalar()
        elif method == "gridsearch":
            if val is None:
                raise InputError("gridsearch needs validation data: val=(x_val, y_val)")
            if per_layer:
                raise InputError("gridsearch tunes a scalar prior precision; use per_layer=False")
            grid = torch.logspace(-4, 4, 33, dtype=torch.float64) if grid is None else grid
            grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
            if (grid <= 0).any():
                raise InputError("grid values must be positive prior precisions")
            nll = self._grid_nll(val, grid)
            self.prior_precision = float(grid[int(torch.argmin(nll))])
            self.grid_nll = nll
        else:
            raise InputError(f"unknown method {method!r}; use 'marglik' or 'gridsearch'")
        return self.prior_precision

    def _marglik_per_layer(self, steps: int, lr: float) -> None:
        log_d = torch.log(self.prior_precision.expand(self.n_prior_groups)).clone()
        log_d.requires_grad_(True)
        opt = torch.optim.Adam([log_d], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = -self._log_evidence(log_d.exp())
            loss.backward()
            opt.step()
        self.prior_precision = log_d.detach().exp()

    def log_marginal_likelihood(self, prior_precision=None) -> torch.Tensor:
        """Laplace log evidence ``log p(D|theta*) + log p(theta*) + S/2 log 2pi - 1/2 log det P``
        (up to the constant ``S/2 log 2pi`` terms, which cancel)."""
        self._check_fitted()
        prior = self.prior_precision if prior_precision is None else self._as_prior(prior_precision)
        return self._log_evidence(prior).detach()

    def _grid_nll(self, val, grid: torch.Tensor) -> torch.Tensor:
        """Validation NLL of the probit predictive for every prior precision in ``grid``."""
        self._check_weights()
        variance = self._grid_variance(grid)
        device, dtype = self._params_device()
        nll = torch.zeros(len(grid), dtype=torch.float64)
        n = 0
        rows = self._rows()
        for xb, yb in _batches(val, 1024):
            _check_inputs(xb)
            yb = _check_labels(yb, self.num_classes)
            for i in range(0, len(xb), rows):
                f, var = variance(xb[i : i + rows].to(device, dtype))  # [n, C], [n, C, G]
                f = f.double().cpu()[..., None].expand_as(var)
                probs = probit_probs(f.transpose(1, 2), var.transpose(1, 2))  # [n, G, C]
                y = yb[i : i + rows].cpu()
                nll -= torch.log(probs[torch.arange(len(y)), :, y].clamp_min(1e-12)).sum(0)
                n += len(y)
        return nll / max(n, 1)
