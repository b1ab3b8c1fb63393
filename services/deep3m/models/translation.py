"""Unpaired image translation: CUT (default) and CycleGAN.

Translating the labelled source images into the target's look lets a segmenter
train on target-like images with the source labels (Franco-Barranco et al. 2022
used CycleGAN and CUT this way).

- :class:`ResnetGenerator`: c7s1-ngf, two stride-2 downsamplings, ``n_blocks``
  residual blocks, two transposed-convolution upsamplings, c7s1 + tanh (images
  in [-1, 1]); instance norm, reflection padding (Johnson et al. / CycleGAN).
- :class:`PatchDiscriminator`: the 70×70 PatchGAN (C64-C128-C256-C512 at
  ``ndf=64``), one real/fake logit per overlapping patch.
- :class:`CUT` (Park et al. 2020, contrastive unpaired translation): adversarial
  loss (least squares) + PatchNCE: a patch of the output must be closer to the
  input patch at the same place than to other input patches, in the generator's
  own encoder features (layers: the input, the stem, both downsamplings, the
  middle residual block), through a small MLP head per layer, temperature 0.07;
  PatchNCE on target → target as identity term (``nce_idt``).
- :class:`CycleGAN` (Zhu et al. 2017): two generators, two discriminators,
  cycle consistency (λ 10) and identity (λ 0.5·10) terms.

Sizes come from :class:`TranslationConfig`: ``TranslationConfig.paper()`` is the
published size (ngf 64, 9 blocks, 256 NCE patches); ``TranslationConfig.cpu()``
is a small network for CPU budgets: the same code with other numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deep3m.core.errors import InvalidArgumentError

TRANSLATORS: tuple[str, ...] = ("cut", "cyclegan")
GENERATOR_MULTIPLE = 4


@dataclass(frozen=True)
class TranslationConfig:
    kind: str = "cut"
    ngf: int = 64
    ndf: int = 64
    n_blocks: int = 9
    nce_patches: int = 256
    mlp_channels: int = 256
    tau: float = 0.07
    lambda_gan: float = 1.0
    lambda_nce: float = 1.0
    nce_idt: bool = True
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5
    lr: float = 2e-4
    patch: int = 256

    def __post_init__(self) -> None:
        if self.kind not in TRANSLATORS:
            raise InvalidArgumentError(
                f"unknown translator {self.kind!r}; choose one of {', '.join(TRANSLATORS)}",
                field="translation.kind",
            )
        for name in ("ngf", "ndf", "n_blocks", "nce_patches", "mlp_channels", "patch"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(
                    f"translation.{name} must be >= 1, got {getattr(self, name)!r}",
                    field=f"translation.{name}",
                )
        if self.patch % GENERATOR_MULTIPLE:
            raise InvalidArgumentError(
                f"translation.patch must be a multiple of {GENERATOR_MULTIPLE}, got {self.patch}",
                field="translation.patch",
            )

    @classmethod
    def paper(cls, kind: str = "cut") -> TranslationConfig:
        return cls(kind=kind)

    @classmethod
    def cpu(cls, kind: str = "cut") -> TranslationConfig:
        return cls(kind=kind, ngf=8, ndf=8, n_blocks=2, nce_patches=64, mlp_channels=32, patch=64)


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(c, c, 3),
            nn.InstanceNorm2d(c),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(c, c, 3),
            nn.InstanceNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)  # type: ignore[no-any-return]


class ResnetGenerator(nn.Module):
    """Image (B, C, Y, X) in [-1, 1] → image of the same shape; Y, X multiples of 4."""

    def __init__(self, channels: int = 1, ngf: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        )
        self.downs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(ngf * m, ngf * m * 2, 3, stride=2, padding=1),
                nn.InstanceNorm2d(ngf * m * 2),
                nn.ReLU(True),
            )
            for m in (1, 2)
        )
        self.blocks = nn.ModuleList(_ResBlock(ngf * 4) for _ in range(n_blocks))
        self.ups = nn.Sequential(
            *(
                layer
                for m in (4, 2)
                for layer in (
                    nn.ConvTranspose2d(ngf * m, ngf * m // 2, 3, 2, padding=1, output_padding=1),
                    nn.InstanceNorm2d(ngf * m // 2),
                    nn.ReLU(True),
                )
            )
        )
        self.out = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, channels, 7), nn.Tanh())
        self.nce_channels = (channels, ngf, ngf * 2, ngf * 4, ngf * 4)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[2] % GENERATOR_MULTIPLE or x.shape[3] % GENERATOR_MULTIPLE:
            raise InvalidArgumentError(
                f"generator input must be (batch, channels, y, x) with y, x multiples of "
                f"{GENERATOR_MULTIPLE}, got {tuple(x.shape)}",
                field="input",
            )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The PatchNCE layers: input, stem, both downsamplings, the middle residual block."""
        self._check(x)
        feats = [x]
        y = self.stem(x)
        feats.append(y)
        for down in self.downs:
            y = down(y)
            feats.append(y)
        mid = len(self.blocks) // 2
        for i, block in enumerate(self.blocks):
            y = block(y)
            if i == mid:
                feats.append(y)
        if not self.blocks:
            feats.append(y)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        y = self.stem(x)
        for down in self.downs:
            y = down(y)
        for block in self.blocks:
            y = block(y)
        return self.out(self.ups(y))  # type: ignore[no-any-return]


class PatchDiscriminator(nn.Module):
    """PatchGAN: (B, C, Y, X) → (B, 1, Y', X') real/fake logits, one per patch."""

    def __init__(self, channels: int = 1, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ndf
        for n in range(1, n_layers + 1):
            c_next = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(c, c_next, 4, stride, 1),
                nn.InstanceNorm2d(c_next),
                nn.LeakyReLU(0.2, True),
            ]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def _lsgan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(pred, torch.full_like(pred, 1.0 if real else 0.0))


class PatchSampleMLP(nn.Module):
    """Per-layer two-layer MLP heads; samples the same locations from query and key."""

    def __init__(self, channels: tuple[int, ...], out: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(c, out), nn.ReLU(True), nn.Linear(out, out)) for c in channels
        )

    def forward(
        self,
        feats: list[torch.Tensor],
        n: int,
        ids: list[torch.Tensor] | None,
        gen: torch.Generator | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out, chosen = [], []
        for i, (feat, head) in enumerate(zip(feats, self.heads, strict=True)):
            b, c, h, w = feat.shape
            flat = feat.permute(0, 2, 3, 1).reshape(b, h * w, c)
            # Keys pick the locations; queries reuse them (the positive is the same place).
            idx = (
                ids[i] if ids is not None else torch.randperm(h * w, generator=gen)[: min(n, h * w)]
            )
            x = head(flat[:, idx, :])
            out.append(F.normalize(x, dim=-1))
            chosen.append(idx)
        return out, chosen


def patch_nce_loss(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE over patches of one image: (B, P, C) queries vs keys, positives on the diagonal."""
    k = k.detach()
    b, p, _ = q.shape
    logits = torch.bmm(q, k.transpose(1, 2)) / tau  # (B, P, P)
    target = torch.arange(p).expand(b, p)
    return F.cross_entropy(logits.reshape(b * p, p), target.reshape(-1))


class CUT(nn.Module):
    """Contrastive unpaired translation source (A) → target (B)."""

    def __init__(self, config: TranslationConfig, channels: int = 1) -> None:
        super().__init__()
        self.config = config
        self.generator = ResnetGenerator(channels, config.ngf, config.n_blocks)
        self.discriminator = PatchDiscriminator(channels, config.ndf)
        self.mlp = PatchSampleMLP(self.generator.nce_channels, config.mlp_channels)

    def translate(self, a: torch.Tensor) -> torch.Tensor:
        return self.generator(a)  # type: ignore[no-any-return]

    def _nce(
        self, src: torch.Tensor, out: torch.Tensor, gen: torch.Generator | None
    ) -> torch.Tensor:
        cfg = self.config
        q_feats = self.generator.encode(out)
        k_feats = self.generator.encode(src)
        k, ids = self.mlp(k_feats, cfg.nce_patches, None, gen)
        q, _ = self.mlp(q_feats, cfg.nce_patches, ids, gen)
        losses = [patch_nce_loss(qi, ki, cfg.tau) for qi, ki in zip(q, k, strict=True)]
        return torch.stack(losses).mean()

    def discriminator_loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fake = self.generator(a)
        return 0.5 * (_lsgan(self.discriminator(fake), False) + _lsgan(self.discriminator(b), True))

    def generator_losses(
        self, a: torch.Tensor, b: torch.Tensor, gen: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        both = torch.cat([a, b]) if cfg.nce_idt else a
        out = self.generator(both)
        fake, idt = out[: a.shape[0]], out[a.shape[0] :]
        gan = _lsgan(self.discriminator(fake), True)
        nce = self._nce(a, fake, gen)
        losses = {"gan": gan, "nce": nce}
        total = cfg.lambda_gan * gan
        if cfg.nce_idt:
            losses["nce_idt"] = self._nce(b, idt, gen)
            total = total + cfg.lambda_nce * 0.5 * (nce + losses["nce_idt"])
        else:
            total = total + cfg.lambda_nce * nce
        losses["total"] = total
        return losses

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.generator.parameters()) + list(self.mlp.parameters())


class CycleGAN(nn.Module):
    """CycleGAN source (A) ↔ target (B); ``translate`` is A → B."""

    def __init__(self, config: TranslationConfig, channels: int = 1) -> None:
        super().__init__()
        self.config = config
        self.g_ab = ResnetGenerator(channels, config.ngf, config.n_blocks)
        self.g_ba = ResnetGenerator(channels, config.ngf, config.n_blocks)
        self.d_a = PatchDiscriminator(channels, config.ndf)
        self.d_b = PatchDiscriminator(channels, config.ndf)

    def translate(self, a: torch.Tensor) -> torch.Tensor:
        return self.g_ab(a)  # type: ignore[no-any-return]

    def discriminator_loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fake_b, fake_a = self.g_ab(a), self.g_ba(b)
        loss_b = _lsgan(self.d_b(fake_b), False) + _lsgan(self.d_b(b), True)
        loss_a = _lsgan(self.d_a(fake_a), False) + _lsgan(self.d_a(a), True)
        return 0.5 * (loss_a + loss_b)

    def generator_losses(
        self, a: torch.Tensor, b: torch.Tensor, gen: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        fake_b, fake_a = self.g_ab(a), self.g_ba(b)
        gan = _lsgan(self.d_b(fake_b), True) + _lsgan(self.d_a(fake_a), True)
        cycle = F.l1_loss(self.g_ba(fake_b), a) + F.l1_loss(self.g_ab(fake_a), b)
        identity = F.l1_loss(self.g_ab(b), b) + F.l1_loss(self.g_ba(a), a)
        total = (
            cfg.lambda_gan * gan
            + cfg.lambda_cycle * cycle
            + cfg.lambda_cycle * cfg.lambda_identity * identity
        )
        return {"gan": gan, "cycle": cycle, "identity": identity, "total": total}

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.g_ab.parameters()) + list(self.g_ba.parameters())

    @property
    def discriminator(self) -> nn.ModuleList:
        return nn.ModuleList([self.d_a, self.d_b])


def build_translator(config: TranslationConfig, channels: int = 1) -> CUT | CycleGAN:
    return CUT(config, channels) if config.kind == "cut" else CycleGAN(config, channels)
