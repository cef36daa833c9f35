"""Approximate-posterior samples of bnnkit models as plain networks (effective weights), so that
every method's posterior can be stored in one collection format and compared.

Per layer kind, a sample is exact, i.e. the plain network computes what the bnnkit model computes
for that member and draw:

- deterministic layers and deep-ensemble members: the weights themselves;
- BatchEnsemble / rank-1 / LP-BNN (``y = ((x * r) W^T) * s + b_m``): ``W * (s r^T)`` with the
  member's factors (learnt, sampled from the rank-1 posterior, or decoded from an LP-BNN latent
  sample) and bias ``b_m``;
- MC dropout before a Linear (or channel dropout before a Conv2d): one mask shared by every
  input, folded into the weight's input columns, ``W * m / (1 - p)``;
- mean-field variational layers: ``mu + sigma * eps`` for weights and biases;
- per-member BatchNorm: member ``m``'s affine parameters and running statistics;
- post-hoc Laplace (subnetwork, last layer, diagonal): a draw from the Gaussian weight posterior
  ``N(theta_MAP, Sigma)`` written into the MAP network (the weights the ``sample_weights``
  predictive uses; the linearised predictives are a different function of the same posterior).

A kind without an exact weight-space sample is refused by name. Draws are seeded.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ConfigError
from ..methods import UQModel
from ..nn.dropout import MCDropoutConv2d, MCDropoutLinear
from ..nn.ensemble import EnsembleBatchNorm2d, _Rank1Structure
from ..nn.variational import _Variational


def _bodies(model: UQModel) -> list[tuple[nn.Module, int | None]]:
    """``(body, member)`` pairs: each deep-ensemble network with member None, or the one folded
    body with each member index."""
    net = model.net
    if hasattr(net, "ensemble"):
        return [(m.body, None) for m in net.ensemble]
    members = int(getattr(net, "members", 1))
    return [(net.body, m) for m in range(members)]


def _layer_sample(mod: nn.Module, member: int | None, g: torch.Generator) -> dict:
    """The plain ``weight`` / ``bias`` (or BatchNorm state) of one converted layer."""
    m = 0 if member is None else member
    if isinstance(mod, (MCDropoutLinear, MCDropoutConv2d)):
        drop, layer = mod[0], mod[1]
        w = layer.weight.detach()
        keep = (torch.rand(w.shape[1], generator=g) >= drop.p).to(w.dtype) / (1 - drop.p)
        shape = (1, -1) + (1,) * (w.dim() - 2)
        out = {"weight": w * keep.view(shape)}
        if layer.bias is not None:
            out["bias"] = layer.bias.detach().clone()
        return out
    if isinstance(mod, _Rank1Structure):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))
            r, s = mod.factors(1, m)
        out = {"weight": mod._fold_weight(r[:, 0], s[:, 0])[0].detach()}
        if mod.bias is not None:
            out["bias"] = mod.bias[m].detach().clone()
        return out
    if isinstance(mod, _Variational):
        mu = mod.weight_mu.detach()
        out = {"weight": mu + mod.sigma(mod.weight_rho.detach()) * torch.randn(
            mu.shape, generator=g, dtype=mu.dtype)}  # fmt: skip
        if mod.bias_mu is not None:
            bm = mod.bias_mu.detach()
            out["bias"] = bm + mod.sigma(mod.bias_rho.detach()) * torch.randn(
                bm.shape, generator=g, dtype=bm.dtype
            )
        return out
    if isinstance(mod, EnsembleBatchNorm2d):
        bn, c = mod.bn, mod.bn.num_features // mod.members
        sl = slice(m * c, (m + 1) * c)
        out = {}
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, name, None)
            if t is not None:
                out[name] = t.detach()[sl].clone()
        if bn.num_batches_tracked is not None:
            out["num_batches_tracked"] = bn.num_batches_tracked.clone()
        return out
    if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
        return {k: v.detach().clone() for k, v in mod.state_dict().items()}
    raise ConfigError(
        f"no exact weight-space sample for a layer of type {type(mod).__name__}; only "
        "deterministic, mc_dropout, batch_ensemble, rank1, lpbnn and variational layers export"
    )


def _laplace_draw(la, body: nn.Module, plain: nn.Module, g: torch.Generator) -> dict:
    """One weight-posterior draw of a fitted Laplace approximation as a plain state dict; the
    model is restored exactly afterwards (the posterior's own snapshot)."""
    la._check_fitted()
    saved = la._snapshot()
    try:
        la._sample_params(g)
        state = {k: v.detach().clone() for k, v in body.state_dict().items()}
    finally:
        la._restore(saved)
    extra = set(state) - set(plain.state_dict())
    if extra:
        raise ConfigError(f"the Laplace model's network has entries {sorted(extra)} that the "
                          "plain architecture lacks")  # fmt: skip
    return state


def network_samples(
    model: UQModel, samples: int = 1, seed: int = 0
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(tag, state dict of the plain architecture)`` for every member and ``samples`` draws
    per member (``m03-s001``); the state dicts load into ``model.spec.build()``."""
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    la = getattr(model, "posterior", None)
    plain = model.spec.build()
    layers = [n for n, m in plain.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d,
                                nn.modules.batchnorm._BatchNorm))]  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    for k, (body, member) in enumerate(_bodies(model)):
        base = {key: v.detach().clone() for key, v in body.state_dict().items()}
        for s in range(samples):
            if la is not None:
                yield f"m{k:02d}-s{s:03d}", _laplace_draw(la, body, plain, g)
                continue
            state = {}
            for key in plain.state_dict():
                owner = key.rsplit(".", 1)[0]
                if owner not in layers:
                    state[key] = base[key].clone()  # buffers of other modules (Normalize)
            for name in layers:
                part = _layer_sample(body.get_submodule(name), member, g)
                for p, v in part.items():
                    state[f"{name}.{p}"] = v
            missing = set(plain.state_dict()) - set(state)
            if missing:
                raise ConfigError(f"the exported sample lacks {sorted(missing)}")
            yield f"m{k:02d}-s{s:03d}", state
