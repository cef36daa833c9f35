"""LP-BNN layers: members stay distinct, the VAE learns, reduction to BatchEnsemble."""

import pytest
import torch

from bnnkit import bayesify
from bnnkit.methods import ModelSpec, build_method
from bnnkit.models import build_model
from bnnkit.nn import BatchEnsembleLinear, FactorVAE, LPBNNConv2d, LPBNNLinear, aux_loss


def test_m_predictions_use_m_distinct_members():
    M, B = 4, 3
    layer = LPBNNLinear(6, 2, M)
    layer.sample = False
    x = torch.randn(B, 6).repeat(M, 1)
    out = layer(x).detach().view(M, B, 2)
    for i in range(M):
        for j in range(i + 1, M):
            assert not torch.allclose(out[i], out[j])
    # member 1's embedding moves only member 1's rows
    with torch.no_grad():
        layer.r[1] += 1.0
    moved = layer(x).detach().view(M, B, 2)
    assert [not torch.allclose(moved[m], out[m]) for m in range(M)] == [False, True, False, False]


def test_conv_member_chunks_are_independent():
    M, B = 3, 2
    layer = LPBNNConv2d(3, 4, 3, M, padding=1)
    layer.sample = False
    x = torch.randn(B, 3, 5, 5).repeat(M, 1, 1, 1)
    base = layer(x).detach()
    with torch.no_grad():
        layer.s[2] *= 2
    out = layer(x).detach()
    torch.testing.assert_close(out[: 2 * B], base[: 2 * B])
    # doubling s_2 doubles member 2's pre-bias output: 2 * (base - b) + b
    bias = layer.bias[2].detach().view(1, -1, 1, 1)
    torch.testing.assert_close(out[2 * B :], 2 * base[2 * B :] - bias)


def test_perfect_decoder_reduces_to_batch_ensemble():
    """If the decoder reproduces r exactly, the layer is BatchEnsemble with factors (r, s)."""
    M, B, d = 2, 4, 3
    layer = LPBNNLinear(d, 2, M, latent=d)
    vae = layer.vae
    with torch.no_grad():  # identity-like encoder/decoder: z = r, decoder(z) = z
        vae.encoder.weight.copy_(torch.eye(d)), vae.encoder.bias.fill_(0.0)
        vae.mean.weight.copy_(torch.eye(d)), vae.mean.bias.fill_(0.0)
        vae.decoder.weight.copy_(torch.eye(d)), vae.decoder.bias.fill_(0.0)
        layer.r.abs_()  # ReLU in the encoder keeps positive values unchanged
    layer.sample = False
    be = BatchEnsembleLinear(d, 2, M)
    with torch.no_grad():
        be.weight.copy_(layer.weight), be.r.copy_(layer.r), be.s.copy_(layer.s)
        be.bias.copy_(layer.bias)
    x = torch.randn(M * B, d)
    torch.testing.assert_close(layer(x), be(x))


def test_vae_elbo_decreases_on_fixed_vectors():
    torch.manual_seed(0)
    vectors = torch.randn(4, 20) + 1.0
    vae = FactorVAE(20, latent=8)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    with torch.no_grad():
        start = torch.stack([vae.neg_elbo(vectors, 16) for _ in range(20)]).mean()
    for _ in range(300):
        loss = vae.neg_elbo(vectors, 8)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = torch.stack([vae.neg_elbo(vectors, 16) for _ in range(20)]).mean()
    assert end < 0.5 * start


def test_sampling_gives_distinct_samples_and_aux_loss_in_training():
    net = bayesify(build_model("lenet5", (1, 28, 28), 10), {"*": "lpbnn"}, members=2)
    net.train()
    out = net(torch.rand(3, 1, 28, 28), samples=2)
    assert out.shape == (4, 3, 10)
    aux = aux_loss(net)
    assert aux.item() > 0 and aux.requires_grad
    (out.logsumexp(-1).mean() + aux).backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    with torch.no_grad():
        with_noise = net(torch.rand(3, 1, 28, 28).repeat(1, 1, 1, 1), samples=2)
    assert not torch.allclose(with_noise[0], with_noise[1])  # two samples of member 0


@pytest.mark.parametrize("name", ["rank1", "lpbnn"])
def test_methods_registered(name):
    model = build_method(name, ModelSpec("lenet5", (1, 28, 28), 10))
    pred = model.predict(torch.rand(5, 1, 28, 28))
    assert pred.probs.shape == (4 * 4, 5, 10)
