"""Attention Y-Net and the unpaired translators: shapes, gradients, and learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from deep3m.core.errors import InvalidArgumentError
from deep3m.models.translation import (
    CUT,
    CycleGAN,
    PatchDiscriminator,
    ResnetGenerator,
    TranslationConfig,
    build_translator,
)
from deep3m.models.ynet import AttentionYNet, mask_probability

TINY = TranslationConfig(ngf=4, ndf=4, n_blocks=1, nce_patches=16, mlp_channels=8, patch=32)


def test_ynet_shapes_and_gradients_reach_both_branches() -> None:
    torch.manual_seed(0)
    net = AttentionYNet(0.25, dropout=None)
    x = torch.rand(2, 1, 32, 48)
    image, mask = net(x)
    assert image.shape == (2, 1, 32, 48) and mask.shape == (2, 1, 32, 48)
    prob = mask_probability(net, x).detach()
    assert prob.shape == (2, 32, 48) and float(prob.min()) >= 0 and float(prob.max()) <= 1
    F.mse_loss(image, x).backward()
    assert net.image_head.weight.grad is not None
    assert net.mask_head.weight.grad is None  # the reconstruction does not touch the mask head
    assert net.encoder[0][0].weight.grad is not None
    with pytest.raises(InvalidArgumentError) as err:
        net(torch.rand(1, 1, 30, 32))
    assert err.value.field == "input"


def test_ynet_a_few_steps_lower_both_losses() -> None:
    torch.manual_seed(0)
    net = AttentionYNet(0.25, dropout=None)
    x = torch.rand(2, 1, 32, 32)
    y = (x[:, 0] > 0.5).float()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = net(x)
        return F.mse_loss(image, x), F.binary_cross_entropy_with_logits(mask[:, 0], y)

    first = [float(v.detach()) for v in losses()]
    for _ in range(15):
        opt.zero_grad()
        mse, bce = losses()
        (mse + bce).backward()
        opt.step()
    last = [float(v.detach()) for v in losses()]
    assert last[0] < first[0] and last[1] < first[1]


def test_generator_and_discriminator_shapes() -> None:
    g = ResnetGenerator(1, ngf=4, n_blocks=2)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    out = g(x).detach()
    assert out.shape == x.shape and float(out.abs().max()) <= 1
    feats = g.encode(x)
    assert [f.shape[1] for f in feats] == list(g.nce_channels)
    d = PatchDiscriminator(1, ndf=4)
    assert d(x).shape[:2] == (2, 1) and d(x).shape[2] > 1  # one logit per patch
    with pytest.raises(InvalidArgumentError):
        g(torch.rand(1, 1, 30, 32))


def test_cut_losses_and_a_few_steps_lower_patch_nce() -> None:
    torch.manual_seed(0)
    model = build_translator(TINY)
    assert isinstance(model, CUT)
    a, b = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    losses = model.generator_losses(a, b, torch.Generator().manual_seed(0))
    assert set(losses) == {"gan", "nce", "nce_idt", "total"}
    assert model.discriminator_loss(a, b).ndim == 0
    opt = torch.optim.Adam(model.generator_parameters(), lr=2e-3)
    first = float(model.generator_losses(a, b, torch.Generator().manual_seed(1))["nce"].detach())
    for i in range(12):
        opt.zero_grad()
        model.generator_losses(a, b, torch.Generator().manual_seed(i))["nce"].backward()
        opt.step()
    last = float(model.generator_losses(a, b, torch.Generator().manual_seed(1))["nce"].detach())
    assert last < first
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=2e-3)
    d_first = float(model.discriminator_loss(a, b).detach())
    for _ in range(12):
        opt_d.zero_grad()
        model.discriminator_loss(a, b).backward()
        opt_d.step()
    assert float(model.discriminator_loss(a, b).detach()) < d_first


def test_cyclegan_is_the_optional_translator() -> None:
    torch.manual_seed(0)
    model = build_translator(TranslationConfig(**{**TINY.__dict__, "kind": "cyclegan"}))
    assert isinstance(model, CycleGAN)
    a, b = torch.rand(1, 1, 32, 32) * 2 - 1, torch.rand(1, 1, 32, 32) * 2 - 1
    losses = model.generator_losses(a, b)
    assert {"gan", "cycle", "identity", "total"} <= set(losses)
    losses["total"].backward()
    assert model.translate(a).shape == a.shape
    with pytest.raises(InvalidArgumentError) as err:
        TranslationConfig(kind="pix2pix")
    assert err.value.field == "translation.kind"
