"""Last-layer Laplace for semantic segmentation networks (per-pixel GLM over a 1x1 conv head).

A segmentation network that ends in a 1x1 ``nn.Conv2d`` head ``(W [C, d], b [C])`` applied to
features ``phi [B, d, h, w]``, possibly followed by a bilinear upsampling to the input size
(``align_corners=False``), computes at every full-resolution pixel ``p``::

    f_p = W psi_p + b,    psi_p = up(phi)_p,    up = F.interpolate(., (H, W), "bilinear")

because bilinear upsampling is linear per channel with weights that sum to 1 (it commutes with
the head, bias included). In ``theta = (W, b)`` the network is therefore exactly a generalised
linear model with per-pixel features ``[psi_p; 1]``: the Laplace approximation over the head is
a Gaussian posterior over ``theta``, and its predictive needs the backbone once per image, not
once per sample.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.segmentation import IGNORE_INDEX
from ..errors import ConfigError, InputError
from ..predictive import Predictive
from .base import (
    PREDICTIVE_OPTIONS,
    TUNING_OPTIONS,
    _batches,
    _check_inputs,
    _Laplace,
    _scalar_marglik_optimum,
    _symmetrise_,
)
from .jacobians import check_eval, logits_of
from .subnetwork import LINALG_DEVICES


def _up(t: torch.Tensor, size) -> torch.Tensor:
    """The bilinear resize (``align_corners=False``) the model is required to use; identity when
    the sizes already agree."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)


def _normals(rows: int, n_samples: int, gen: torch.Generator) -> torch.Tensor:
    """``[rows, n_samples]`` standard normals (float64), one draw per column in turn: column
    ``k`` is the same for every ``n_samples > k`` (one ``randn`` of the whole matrix is not:
    torch's CPU sampler transforms blocks of 16 values)."""
    cols = [torch.randn(rows, generator=gen, dtype=torch.float64) for _ in range(n_samples)]
    return torch.stack(cols, 1)


def find_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Conv2d]:
    """The 1x1 convolution that produces the logits: the module called ``name`` (an exact module
    name, or a unique suffix such as ``"classifier"`` for ``net.body.classifier``), else the last
    ``nn.Conv2d`` with a 1x1 kernel in module order."""
    # names as the user wrote them: without the prefix of bnnkit's wrappers (UQModel.net,
    # Folded.body)
    mods = [(re.sub(r"^(net\.)?(body\.)?", "", n), m) for n, m in model.named_modules()]
    if name is not None:
        hits = [(n, m) for n, m in mods if n == name]
        hits = hits or [(n, m) for n, m in mods if n.endswith("." + name)]
        if not hits:
            convs = [n for n, m in mods if isinstance(m, nn.Conv2d)]
            raise ConfigError(
                f"the model has no module named {name!r} (its convolutions: "
                f"{', '.join(convs[-5:]) or 'none'}); pass head= the 1x1 conv that makes the logits"
            )
        if len(hits) > 1:
            raise ConfigError(
                f"head={name!r} matches {len(hits)} modules ({', '.join(n for n, _ in hits)}); "
                "give its full name"
            )
        hname, head = hits[0]
    else:
        found = [(n, m) for n, m in mods if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
        if not found:
            raise ConfigError(
                "the model has no 1x1 nn.Conv2d: pixel last-layer Laplace needs a segmentation "
                "network whose logits come from a 1x1 convolution head (name it with head=...)"
            )
        hname, head = found[-1]
    if not isinstance(head, nn.Conv2d):
        raise ConfigError(
            f"the head {hname!r} is a {type(head).__name__}; it must be an nn.Conv2d with a 1x1 "
            "kernel that produces the logits"
        )
    if (
        head.kernel_size != (1, 1)
        or head.groups != 1
        or head.stride != (1, 1)
        or head.padding not in ((0, 0), "valid")
    ):
        raise ConfigError(
            f"the head {hname!r} is Conv2d(kernel={head.kernel_size}, stride={head.stride}, "
            f"padding={head.padding}, groups={head.groups}); pixel last-layer Laplace needs a "
            "1x1 convolution with stride 1, no padding and groups=1"
        )
    return hname, head


class PixelLastLayerLaplace(_Laplace):
    """Full-covariance last-layer Laplace for segmentation networks.

    ``model``: any segmentation network ``x [B, 3, H, W] -> logits [B, C, H, W]`` (a bnnkit
    UQModel or a plain ``nn.Module``) whose logits are ``head(up(phi))``: a 1x1 ``nn.Conv2d``
    head (``head=``: its name; default: the last 1x1 Conv2d) on features ``phi``, optionally
    upsampled bilinearly (``align_corners=False``) to the input size. That structure is checked,
    not assumed: the first chunk of every fit and predictive compares the model's output with
    ``head(up(phi))`` and refuses a model with anything after the head (a softmax, another
    layer, nearest-neighbour upsampling).

    Parameters ``theta``: per class its weight row and bias, ``theta.view(C, d + 1) = [W | b]``
    (``[W]`` for a head without bias), ``P = C (d + 1)`` entries.

    Curvature: the generalised Gauss-Newton matrix of the pixel cross-entropy,
    ``G = sum_p Lambda_p (x) psi_p psi_p^T`` with ``Lambda_p = diag(pi_p) - pi_p pi_p^T`` and
    ``psi_p = [up(phi)_p; 1]``, accumulated in float64 over non-void pixels. For this model the
    GGN is the exact Hessian of the NLL in ``theta`` (the logits are linear in ``theta``), so the
    linearised model and the network with sampled head weights are the same function. What is
    approximated:

    * pixels are treated as independent observations. Neighbouring pixels of one image are
      strongly correlated, so ``G`` counts far more independent evidence than the images carry
      and the posterior is overconfident relative to the number of images (the prior precision
      tuned by marginal likelihood compensates only partly);
    * pixel subsampling: only every ``pixel_stride``-th pixel in each direction (the non-void
      ones) enters ``G``, which is rescaled by (non-void pixels seen) / (non-void pixels used);
      cost ``O(pixels used x P^2)``;
    * ``fit(data, n_total=N)`` on a subset rescales ``G`` and the loss by ``N / len(data)``.

    ``memory_budget`` bounds the working tensors of the fit and the predictive (upsampled
    features, the per-pixel products, the sample logits of a chunk), not the network's own
    activations nor the ``P x P`` posterior or the returned Predictive. ``linalg_device``:
    ``"cpu"`` or ``"model"``, where the ``P x P`` Cholesky and eigendecomposition run.
    """

    kind = "pixel_last_layer"

    def __init__(
        self,
        model: nn.Module,
        head: str | None = None,
        pixel_stride: int = 4,
        prior_precision: float | torch.Tensor = 1.0,
        memory_budget: str | int = "2GB",
        likelihood: str = "classification",
        linalg_device: str = "cpu",
    ) -> None:
        if isinstance(pixel_stride, bool) or not isinstance(pixel_stride, int) or pixel_stride < 1:
            raise InputError(f"pixel_stride must be an integer >= 1, got {pixel_stride!r}")
        if linalg_device not in LINALG_DEVICES:
            raise ConfigError(
                f"linalg_device must be one of {', '.join(LINALG_DEVICES)}, got {linalg_device!r}"
            )
        super().__init__(model, prior_precision, memory_budget, likelihood)
        self.head_name, self.head = find_head(self.model, head)
        self.pixel_stride = pixel_stride
        self.linalg_device = linalg_device
        self.has_bias = self.head.bias is not None
        self.feature_dim = self.head.in_channels
        self.num_classes = self.head.out_channels
        self.pixels_seen = 0  # non-void pixels of the fit data
        self.pixels_used = 0  # those that entered the GGN (pixel_stride)
        self.mean = self._snapshot()
        self._ggn: torch.Tensor | None = None
        self._image_rows = 1

    # ---------------------------------------------------------------- layout
    @property
    def n_params(self) -> int:
        return self.num_classes * self._width

    @property
    def _width(self) -> int:
        """Entries of theta per class: ``d + 1`` (weights and bias) or ``d``."""
        return self.feature_dim + int(self.has_bias)

    @property
    def ggn(self) -> torch.Tensor | None:
        """The ``[P, P]`` float64 GGN (scaled to the data set)."""
        return self._ggn

    @ggn.setter
    def ggn(self, value: torch.Tensor | None) -> None:
        if value is not None:
            P = self.n_params
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (P, P):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise InputError(f"the GGN must be a [{P}, {P}] tensor, got {shape}")
        self._ggn = value
        self._fit_generation += 1

    def _curvature_tensors(self):
        return (self._ggn,)

    def _snapshot(self) -> torch.Tensor:
        C = self.head.out_channels
        parts = [self.head.weight.detach().reshape(C, -1)]
        if self.head.bias is not None:
            parts.append(self.head.bias.detach()[:, None])
        return torch.cat(parts, 1).double().cpu().reshape(-1)

    @torch.no_grad()
    def _restore(self, saved: torch.Tensor) -> None:
        theta = saved.reshape(self.num_classes, self._width)
        w = self.head.weight
        w.copy_(theta[:, : self.feature_dim].reshape(w.shape).to(w))
        if self.has_bias:
            self.head.bias.copy_(theta[:, -1].to(self.head.bias))

    def _sample_params(self, generator) -> None:
        self._restore(self._draw(1, generator)[0].reshape(-1))

    def _rows(self) -> int:
        return self._image_rows

    def _la_device(self) -> torch.device:
        return self._params_device()[0] if self.linalg_device == "model" else torch.device("cpu")

    # ---------------------------------------------------------------- features
    @contextlib.contextmanager
    def _capture(self):
        store: list[torch.Tensor] = []

        def hook(mod, inputs, output):
            store.append(inputs[0].detach())

        handle = self.head.register_forward_hook(hook)
        try:
            yield store
        finally:
            handle.remove()

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: the model's logits ``[b, C, H, W]`` and the head's input ``phi``."""
        with self._capture() as store:
            out = logits_of(self.model(x))
        if len(store) != 1:
            raise ConfigError(
                f"the head {self.head_name!r} ran {len(store)} times in one forward pass; pixel "
                "last-layer Laplace needs a head that runs exactly once (name it with head=...)"
            )
        phi = store[0]
        if out.dim() != 4:
            raise ConfigError(
                f"the model returned {tuple(out.shape)}, not dense logits [B, C, H, W]: "
                "PixelLastLayerLaplace is for segmentation networks (LastLayerLaplace for "
                "classifiers)"
            )
        want = (x.shape[0], self.num_classes, *x.shape[-2:])
        if tuple(out.shape) != want:
            raise ConfigError(
                f"the model returned {tuple(out.shape)} for input {tuple(x.shape)}, but its head "
                f"{self.head_name!r} ({self.num_classes} outputs) would make logits "
                f"{list(want)}: is {self.head_name!r} the layer that makes the logits? name that "
                "1x1 Conv2d with head=... (by default the last 1x1 Conv2d in module order)"
            )
        if phi.dim() != 4:
            raise ConfigError(
                f"the head {self.head_name!r} received {tuple(phi.shape)}, not feature maps "
                "[B, d, h, w]"
            )
        return out, phi

    def check(self, x: torch.Tensor) -> None:
        """Refuse (ConfigError) unless the model's logits on images ``x`` are its head applied to
        the head's input upsampled bilinearly: the precondition of the per-pixel GLM, checked
        on the model's own output. It holds or fails whatever the weights, so a method can
        check it before training."""
        out, phi = self._features(x)
        self._check_head_output(out, phi)

    def _check_head_output(self, out: torch.Tensor, phi: torch.Tensor) -> None:
        """Refuse unless the model's output is ``head(up(phi))`` (relative tolerance 1e-4)."""
        with torch.no_grad():
            ref = self.head(_up(phi, out.shape[-2:]))
        scale = float(out.abs().max())
        err = float((ref - out).abs().max())
        if not err <= 1e-4 * max(scale, 1e-3):
            raise ConfigError(
                f"the model's output is not its head {self.head_name!r} applied to the head's "
                f"input upsampled bilinearly to the output size (max |difference| {err:.3g}, "
                f"max |logit| {scale:.3g}): pixel last-layer Laplace needs logits = 1x1 conv "
                "head, then at most a bilinear upsampling (align_corners=False); no softmax, "
                "layer or other upsampling after the head (name the right layer with head=...)"
            )

    def _psi(self, feats: torch.Tensor) -> torch.Tensor:
        """Rows ``[m, d]`` of features -> GLM features ``[m, D]`` (a column of ones for b)."""
        if not self.has_bias:
            return feats
        return torch.cat([feats, feats.new_ones(len(feats), 1)], 1)

    def _check_maps(self, y, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise InputError("label maps must be an integer tensor [B, H, W] (void = 255)")
        if tuple(y.shape) != (x.shape[0], *x.shape[-2:]):
            raise InputError(
                f"label maps {tuple(y.shape)} do not match the images {tuple(x.shape)}; "
                "expected [B, H, W] at the images' size"
            )
        y = y.long()
        bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= self.num_classes))
        if bad.any():
            raise InputError(
                f"label value {int(y[bad][0])} is neither a class (0..{self.num_classes - 1}) "
                f"nor void ({IGNORE_INDEX})"
            )
        return y

    def _fit_rows(self, H: int, W: int) -> int:
        per_image = 4 * H * W * (self.feature_dim + 6 * self.num_classes)
        return max(1, self.budget // max(per_image, 1))

    # ---------------------------------------------------------------- fit
    @torch.no_grad()
    def fit(
        self, data, batch_size: int = 32, progress=None, n_total: int | None = None
    ) -> PixelLastLayerLaplace:
        """Accumulate the GGN over ``data``: ``(images [N, 3, H, W], label maps [N, H, W])`` or a
        DataLoader of such pairs. Void pixels (255) are skipped. ``n_total``: images of the
        whole training set when ``data`` is a subset (curvature and loss rescaled)."""
        check_eval(self.model)
        device, dtype = self._params_device()
        C, D = self.num_classes, self._width
        P = C * D
        ggn = torch.zeros(P, P, dtype=torch.float64, device=device)
        pix_rows = max(1, self.budget // (8 * 3 * P))
        s = self.pixel_stride
        loss, n, seen, used = 0.0, 0, 0, 0
        first = True
        for xb, yb in _batches(data, batch_size):
            _check_inputs(xb)
            yb = self._check_maps(yb, xb)
            rows = self._fit_rows(*xb.shape[-2:])
            for i in range(0, len(xb), rows):
                x, y = xb[i : i + rows].to(device, dtype), yb[i : i + rows].to(device)
                out, phi = self._features(x)
                if first:
                    self._check_head_output(out, phi)
                    first = False
                valid = y != IGNORE_INDEX
                seen += int(valid.sum())
                if valid.any():
                    loss += float(
                        F.cross_entropy(out.double(), y, ignore_index=IGNORE_INDEX, reduction="sum")
                    )
                keep = valid[:, ::s, ::s]
                m = int(keep.sum())
                if m == 0:
                    n += len(x)
                    continue
                feats = _up(phi, out.shape[-2:])[:, :, ::s, ::s].permute(0, 2, 3, 1)[keep]
                pi = torch.softmax(out[:, :, ::s, ::s].double(), 1).permute(0, 2, 3, 1)[keep]
                for j in range(0, m, pix_rows):
                    self._accumulate(ggn, self._psi(feats[j : j + pix_rows].double()),
                                     pi[j : j + pix_rows])  # fmt: skip
                used += m
                n += len(x)
            if progress is not None:
                progress(len(xb))
        scale = self._rescale(n, n_total)
        if seen == 0:
            raise InputError("every pixel of the fit data is void (255): nothing to fit on")
        if used == 0:
            raise InputError(
                f"pixel_stride={s} picked no non-void pixel of the fit data; use a smaller "
                "pixel_stride"
            )
        ggn = _symmetrise_(ggn.cpu())
        self.ggn = ggn.mul_(scale * seen / used)
        self.pixels_seen, self.pixels_used = seen, used
        self.mean = self._snapshot()
        self.loss, self.n_data = loss * scale, n_total or n
        self._mark_fitted()
        return self

    def _accumulate(self, ggn: torch.Tensor, psi: torch.Tensor, pi: torch.Tensor) -> None:
        """``ggn += sum_p (diag(pi_p) - pi_p pi_p^T) (x) psi_p psi_p^T`` for rows ``psi [m, D]``
        and ``pi [m, C]`` (float64): the block-diagonal term as one batched GEMM over classes,
        the rank term as ``U^T U`` with ``U_p = pi_p (x) psi_p``."""
        C, D = pi.shape[1], psi.shape[1]
        A = pi[:, :, None] * psi[:, None, :]  # [m, C, D]
        blocks = torch.einsum("mci,mj->cij", A, psi)  # [C, D, D]
        ggn.view(C, D, C, D).diagonal(dim1=0, dim2=2).add_(blocks.permute(1, 2, 0))
        U = A.reshape(len(pi), C * D)
        ggn.addmm_(U.T, U, alpha=-1.0)

    # ---------------------------------------------------------------- posterior
    @property
    def posterior_precision(self) -> torch.Tensor:
        self._check_fitted()
        return self.ggn + float(self.prior_precision) * torch.eye(
            self.n_params, dtype=torch.float64
        )

    def cholesky(self) -> torch.Tensor:
        """Lower Cholesky factor of the posterior precision ``G + delta I`` (float64)."""
        return self._cached("cholesky", self._cholesky)

    def _cholesky(self) -> torch.Tensor:
        P = self.ggn.to(self._la_device(), copy=True)
        P.diagonal().add_(float(self.prior_precision))
        L, info = torch.linalg.cholesky_ex(P)
        if int(info) != 0:
            raise ConfigError(
                "the posterior precision is not positive definite; use a larger prior precision "
                f"(now {float(self.prior_precision):.3g})"
            )
        return L

    @property
    def posterior_covariance(self) -> torch.Tensor:
        return torch.cholesky_inverse(self.cholesky()).cpu()

    def _eigvalsh(self) -> torch.Tensor:
        return self._cached(
            "eigvalsh",
            lambda: torch.linalg.eigvalsh(self.ggn.to(self._la_device())).cpu(),
            uses_prior=False,
        )

    def _eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        def eigh():
            lam, V = torch.linalg.eigh(self.ggn.to(self._la_device()))
            return lam.cpu(), V.cpu()

        return self._cached("eigh", eigh, uses_prior=False)

    def _log_evidence(self, prior: torch.Tensor) -> torch.Tensor:
        """``log p(D|theta*) - delta/2 |theta*|^2 + P/2 log delta - 1/2 log det(G + delta I)``
        (the ``P/2 log 2 pi`` terms cancel), from the eigenvalues of ``G``."""
        d = prior.reshape(())
        lam = self._eigvalsh().clamp_min(0.0)
        theta_sq = float((self.mean**2).sum())
        return (
            -self.loss
            - 0.5 * d * theta_sq
            + 0.5 * self.n_params * torch.log(d)
            - 0.5 * torch.log(lam + d).sum()
        )

    def _marglik_scalar(self) -> float:
        # concave in log(delta): bisection on its derivative over [e^-30, e^30]
        lam = self._eigvalsh()
        return _scalar_marglik_optimum(lam, float((self.mean**2).sum()), self.n_params)

    def _mean_cov(self, x):  # pragma: no cover - the per-pixel predictive is separate
        raise NotImplementedError("PixelLastLayerLaplace predicts per pixel: use predictive()")

    def _grid_variance(self, grid):  # pragma: no cover - gridsearch uses the MC predictive
        raise NotImplementedError("PixelLastLayerLaplace tunes on the MC predictive's NLL")

    # ---------------------------------------------------------------- samples
    def _draw(self, n_samples: int, gen: torch.Generator) -> torch.Tensor:
        """``n_samples`` draws of ``theta ~ N(theta*, (G + delta I)^-1)``: ``[K, C, D]`` float64.
        Draw ``k`` of a seed is the same whatever ``n_samples > k``."""
        L = self.cholesky()
        eps = _normals(self.n_params, n_samples, gen)
        step = torch.linalg.solve_triangular(L.T, eps.to(L.device), upper=True).cpu()
        return (self.mean[:, None] + step).T.reshape(n_samples, self.num_classes, self._width)

    def _sample_logits(self, phi: torch.Tensor, theta: torch.Tensor, size) -> torch.Tensor:
        """Logits ``[k, b, C, H, W]`` of the heads ``theta [k, C, D]`` on features ``phi``:
        the head at the features' resolution, then the upsampling (the same function as
        ``W_k up(phi) + b_k``, since both are linear and the upsampling's weights sum to 1)."""
        k, C = theta.shape[:2]
        b, d = phi.shape[:2]
        theta = theta.to(phi)
        weight = theta[..., :d].reshape(k * C, d, 1, 1)
        bias = theta[..., d].reshape(k * C) if self.has_bias else None
        f = _up(F.conv2d(phi, weight, bias), size)  # [b, k*C, H, W]
        return f.view(b, k, C, *f.shape[-2:]).transpose(0, 1)

    def _chunk_rows(self, n_samples: int, H: int, W: int) -> tuple[int, int]:
        """(images, samples) per chunk: ``3 x 4 bytes`` per sample logit (logits, softmax and
        the upsampling's work) plus the upsampled features of the precondition check."""
        per_sample = 12 * self.num_classes * H * W
        k_rows = max(1, min(n_samples, self.budget // max(per_sample, 1)))
        per_image = per_sample * k_rows + 4 * self.feature_dim * H * W
        return max(1, self.budget // max(per_image, 1)), k_rows

    def _logit_chunks(self, x: torch.Tensor, theta: torch.Tensor):
        """Yield ``(image slice, sample slice, logits [k, b, C, H, W])``; the network runs once
        per image chunk, whatever the number of samples."""
        device, dtype = self._params_device()
        K = len(theta)
        rows, k_rows = self._chunk_rows(K, *x.shape[-2:])
        self._image_rows = rows
        for i in range(0, len(x), rows):
            out, phi = self._features(x[i : i + rows].to(device, dtype))
            if i == 0:
                self._check_head_output(out, phi)
            del out
            for k in range(0, K, k_rows):
                f = self._sample_logits(phi, theta[k : k + k_rows], x.shape[-2:])
                yield slice(i, i + len(phi)), slice(k, k + len(f)), f

    def _check_call(self, x: torch.Tensor) -> None:
        self._check_fitted()
        _check_inputs(x)
        if x.dim() != 4:
            raise InputError(f"expected images [B, C, H, W], got {tuple(x.shape)}")
        self._check_weights()
        check_eval(self.model)

    @torch.no_grad()
    def sample_logits(self, x: torch.Tensor, n_samples: int = 100, seed: int = 0):
        """Logits ``[K, B, C, H, W]`` of ``K = n_samples`` heads drawn from the posterior."""
        self._check_call(x)
        PREDICTIVE_OPTIONS.resolve({"link": "mc", "n_samples": n_samples, "seed": seed})
        theta = self._draw(n_samples, torch.Generator().manual_seed(seed))
        out = torch.empty(n_samples, len(x), self.num_classes, *x.shape[-2:])
        for ib, ik, f in self._logit_chunks(x, theta):
            out[ik, ib] = f.float().cpu()
        return out

    # ---------------------------------------------------------------- predictive
    @torch.no_grad()
    def predictive(
        self, x: torch.Tensor, link: str = "mc", n_samples: int = 100, seed: int = 0
    ) -> Predictive:
        """Per-pixel predictive ``[S, B, C, H, W]`` for float images ``x [B, 3, H, W]``.

        ``link='mc'`` (default) and ``'sample_weights'``: ``S = n_samples`` heads drawn from the
        posterior (seeded), each applied to the features of one backbone pass; the two links are
        the same here, because the network is linear in the head's parameters (the linearised
        model is the network). ``link='probit'``: ``S = 1``, every pixel's softmax of its MAP
        logits scaled by ``1 / sqrt(1 + pi/8 var)`` with the logit variances
        ``var_c = psi^T Sigma_cc psi`` (no mutual information; costs ``O(H W C D^2)`` per
        image against ``O(h w C D K)`` for ``K`` samples)."""
        self._check_call(x)
        PREDICTIVE_OPTIONS.resolve({"link": link, "n_samples": n_samples, "seed": seed})
        if link == "probit":
            return Predictive(self._probit(x)[None])
        theta = self._draw(n_samples, torch.Generator().manual_seed(seed))
        probs = torch.empty(n_samples, len(x), self.num_classes, *x.shape[-2:])
        for ib, ik, f in self._logit_chunks(x, theta):
            probs[ik, ib] = torch.softmax(f, 2).float().cpu()
        return Predictive(probs)

    def predict(self, x: torch.Tensor, link: str = "mc", n_samples: int = 100, seed: int = 0):
        """Predictive class probabilities ``[B, C, H, W]`` (the model average)."""
        return self.predictive(x, link, n_samples, seed).mean()

    def _covariance_blocks(self, like: torch.Tensor) -> torch.Tensor:
        """The per-class diagonal blocks of the posterior covariance, ``[D, C*D]`` with
        ``[:, c*D:(c+1)*D] = Sigma_cc``, in ``like``'s dtype and device (cached per prior)."""

        def build():
            C, D = self.num_classes, self._width
            cov = torch.cholesky_inverse(self.cholesky()).cpu().view(C, D, C, D)
            blocks = cov.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [C, D, D]
            return blocks.permute(1, 0, 2).reshape(D, C * D).to(like.device, like.dtype)

        return self._cached(("blocks", like.device, like.dtype), build)

    def _probit(self, x: torch.Tensor) -> torch.Tensor:
        device, dtype = self._params_device()
        C, D = self.num_classes, self._width
        H, W = x.shape[-2:]
        rows = max(1, self.budget // (4 * H * W * (self.feature_dim + 1 + 4 * C)))
        pix_rows = max(1, self.budget // (4 * 3 * C * D))
        self._image_rows = rows
        out_probs = torch.empty(len(x), C, H, W)
        blocks = None
        for i in range(0, len(x), rows):
            out, phi = self._features(x[i : i + rows].to(device, dtype))
            if i == 0:
                self._check_head_output(out, phi)
                blocks = self._covariance_blocks(phi)
            feats = _up(phi, (H, W)).permute(0, 2, 3, 1).reshape(-1, self.feature_dim)
            var = torch.empty(len(feats), C, dtype=feats.dtype, device=feats.device)
            for j in range(0, len(feats), pix_rows):
                psi = self._psi(feats[j : j + pix_rows])
                var[j : j + pix_rows] = ((psi @ blocks).view(-1, C, D) * psi[:, None, :]).sum(-1)
            var = var.clamp_min_(0.0).view(len(phi), H, W, C).permute(0, 3, 1, 2)
            scaled = out / torch.sqrt(1.0 + math.pi / 8.0 * var)
            out_probs[i : i + len(phi)] = torch.softmax(scaled, 1).float().cpu()
        return out_probs

    # ---------------------------------------------------------------- tuning
    def optimize_prior_precision(
        self,
        method: str = "marglik",
        per_layer: bool = False,
        val: Any = None,
        grid: torch.Tensor | None = None,
        steps: int = 100,
        lr: float = 0.1,
        n_samples: int = 32,
        seed: int = 0,
    ) -> torch.Tensor:
        """Tune the scalar prior precision ``delta`` (prior ``N(0, I / delta)`` on theta):
        ``'marglik'`` maximises the Laplace log evidence (a concave function of ``log delta``,
        from the eigenvalues of ``G``); ``'gridsearch'`` minimises the validation pixel NLL
        (non-void pixels of ``val=(images, label maps)``) of the MC predictive with
        ``n_samples`` samples and a fixed ``seed`` (the same normal draws for every grid value).
        ``per_layer``, ``steps`` and ``lr`` exist for the other Laplace classes' signature: one
        layer, one prior precision."""
        self._check_fitted()
        TUNING_OPTIONS.resolve({"method": method, "per_layer": per_layer, "steps": steps, "lr": lr})
        PREDICTIVE_OPTIONS.resolve({"link": "mc", "n_samples": n_samples, "seed": seed})
        if method == "marglik":
            self.prior_precision = self._marglik_scalar()
            return self.prior_precision
        if val is None:
            raise InputError("gridsearch needs validation data: val=(images, label maps)")
        grid = torch.logspace(-4, 4, 33, dtype=torch.float64) if grid is None else grid
        grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
        if grid.numel() == 0 or not torch.isfinite(grid).all() or (grid <= 0).any():
            raise InputError("grid values must be positive, finite prior precisions")
        nll = self._grid_nll(val, grid, n_samples, seed)
        self.prior_precision = float(grid[int(torch.argmin(nll))])
        self.grid_nll = nll
        return self.prior_precision

    @torch.no_grad()
    def _grid_nll(self, val, grid: torch.Tensor, n_samples: int = 32, seed: int = 0):
        """Mean NLL over the non-void validation pixels of the MC predictive, per grid value."""
        self._check_weights()
        check_eval(self.model)
        lam, V = self._eigh()
        gen = torch.Generator().manual_seed(seed)
        Z = V.T @ _normals(self.n_params, n_samples, gen)
        C, D = self.num_classes, self._width
        # theta = theta* + V (Lambda + g)^(-1/2) V^T eps: the same eps for every grid value
        steps = [V @ (Z / (lam.clamp_min(0.0) + g).sqrt()[:, None]) for g in grid.tolist()]
        thetas = [(self.mean[:, None] + st).T.reshape(n_samples, C, D) for st in steps]
        device, dtype = self._params_device()
        nll = torch.zeros(len(grid), dtype=torch.float64)
        count = 0
        first = True
        for xb, yb in _batches(val, 64):
            _check_inputs(xb)
            yb = self._check_maps(yb, xb)
            rows, k_rows = self._chunk_rows(n_samples, *xb.shape[-2:])
            for i in range(0, len(xb), rows):
                out, phi = self._features(xb[i : i + rows].to(device, dtype))
                if first:
                    self._check_head_output(out, phi)
                    first = False
                y = yb[i : i + rows].to(device)
                valid = y != IGNORE_INDEX
                target = y.masked_fill(~valid, 0)[:, None]  # [b, 1, H, W]
                for gi, theta in enumerate(thetas):
                    p = torch.zeros(target.shape, dtype=torch.float64, device=device)
                    for k in range(0, n_samples, k_rows):
                        f = self._sample_logits(phi, theta[k : k + k_rows], xb.shape[-2:])
                        probs = torch.softmax(f, 2)
                        p += probs.gather(2, target.expand(len(f), *target.shape)).sum(0).double()
                    p = (p[:, 0] / n_samples)[valid]
                    nll[gi] -= float(torch.log(p.clamp_min(1e-12)).sum())
                count += int(valid.sum())
        if count == 0:
            raise InputError("every validation pixel is void (255): nothing to tune on")
        return nll / count

    # ---------------------------------------------------------------- persistence
    def state(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "kind": self.kind,
            "head": self.head_name,
            "pixel_stride": self.pixel_stride,
            "prior_precision": self.prior_precision,
            "ggn": self.ggn,
            "mean": self.mean,
            "loss": self.loss,
            "n_data": self.n_data,
            "num_classes": self.num_classes,
            "pixels_seen": self.pixels_seen,
            "pixels_used": self.pixels_used,
        }

    def load_state(self, state: dict[str, Any]) -> PixelLastLayerLaplace:
        if state.get("head") != self.head_name:
            raise ConfigError(
                f"the saved Laplace state is for head {state.get('head')!r}, this model's head "
                f"is {self.head_name!r}"
            )
        if int(state["num_classes"]) != self.num_classes:
            raise ConfigError(
                f"the saved Laplace state has {state['num_classes']} classes, the head "
                f"{self.num_classes}"
            )
        P = self.n_params
        if tuple(state["ggn"].shape) != (P, P):
            raise ConfigError(f"saved GGN has shape {tuple(state['ggn'].shape)}, expected {(P, P)}")
        self.ggn = state["ggn"].double()
        self.pixel_stride = int(state.get("pixel_stride", self.pixel_stride))
        self.pixels_seen = int(state.get("pixels_seen", 0))
        self.pixels_used = int(state.get("pixels_used", 0))
        return self._load_common(state)
