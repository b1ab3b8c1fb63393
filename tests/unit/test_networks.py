"""The networks: shapes, width scaling, published size, registry errors, card round trip."""

from __future__ import annotations

import pytest
import torch
from deep3m.core.errors import InvalidArgumentError
from deep3m.core.store import Store
from deep3m.models.card import MemberCard, ModelCard, load_member, save_model
from deep3m.models.deepem3d import PUBLISHED_WIDTHS, DeepEM3D
from deep3m.models.registry import (
    ARCHITECTURES,
    DEFAULT_WIDTH,
    INPUT_MULTIPLE,
    build_network,
    parameter_count,
    seamless_halo_yx,
)
from torch import nn

TINY = 0.0625


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("frames", [1, 3, 5])
def test_output_is_logits_for_the_centre_slice(architecture: str, frames: int) -> None:
    torch.manual_seed(0)
    net = build_network(architecture, frames=frames, width=TINY).eval()
    x = torch.randn(2, frames, 32, 48)  # non-square, multiples of 16
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 2, 32, 48)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_num_classes_sets_the_output_channels(architecture: str) -> None:
    net = build_network(architecture, frames=3, width=TINY, num_classes=4).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 16, 16)).shape == (1, 4, 16, 16)


def test_deepem3d_uses_its_frames() -> None:
    """Changing a neighbouring slice changes a 3-frame prediction (z is really read)."""
    torch.manual_seed(1)
    net = build_network("deepem3d", frames=3, width=TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    x2 = x.clone()
    x2[:, 0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(net(x), net(x2))


def test_width_scales_every_channel() -> None:
    half = DeepEM3D(frames=1, width=0.5)
    assert half.feature_channels == tuple(round(c * 0.5) for c in (192, *PUBLISHED_WIDTHS[3:]))
    sizes = [
        parameter_count(build_network("deepem3d", frames=1, width=w)) for w in (0.0625, 0.125, 0.25)
    ]
    assert sizes[0] < sizes[1] < sizes[2]
    assert sizes[2] > 2 * sizes[1]  # encoder weights grow with width², the heads linearly


def test_published_width_has_tens_of_millions_of_parameters() -> None:
    assert DEFAULT_WIDTH == 1.0
    net = DeepEM3D(frames=1)
    assert net.feature_channels == (192, 384, 1154, 2048)
    assert 1e7 < parameter_count(net) < 1e8
    assert 1e6 < parameter_count(build_network("resunet2d", frames=1)) < 1e8


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        build_network("vgg", frames=1)
    assert err.value.field == "architecture"
    assert "vgg" in err.value.message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"frames": 2}, "frames"),
        ({"frames": 0}, "frames"),
        ({"frames": 1, "width": 0.0}, "width"),
        ({"frames": 1, "num_classes": 1}, "num_classes"),
    ],
)
def test_bad_network_parameters(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        build_network("deepem3d", **kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_input_not_a_multiple_of_16_is_refused() -> None:
    assert INPUT_MULTIPLE == 16
    net = build_network("deepem3d", frames=1, width=TINY)
    with pytest.raises(InvalidArgumentError, match="multiples of 16"):
        net(torch.randn(1, 1, 40, 32))
    with pytest.raises(InvalidArgumentError, match="3 frames"):
        build_network("resunet2d", frames=3, width=TINY)(torch.randn(1, 1, 32, 32))


def test_card_round_trip_loads_the_same_network(tmp_path: object) -> None:
    store = Store(f"file://{tmp_path}")
    torch.manual_seed(2)
    nets = {
        m: build_network("deepem3d", frames=f, width=TINY).eval()
        for m, f in (("1fm", 1), ("3fm", 3))
    }
    card = ModelCard(
        id="net",
        width=TINY,
        members=(MemberCard(name="1fm", frames=1), MemberCard(name="3fm", frames=3)),
    )
    save_model(store, card, {m: n.state_dict() for m, n in nets.items()})
    from deep3m.models.card import load_card

    loaded = load_card(store, "net")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for m, net in nets.items():
            again = load_member(store, loaded, m)
            xm = x[:, 1:2] if m == "1fm" else x
            assert torch.equal(again(xm), net(xm))


def test_weights_that_are_not_safetensors_are_one_clear_error(tmp_path: object) -> None:
    store = Store(f"file://{tmp_path}")
    net = build_network("deepem3d", frames=1, width=TINY)
    card = save_model(
        store,
        ModelCard(id="net", width=TINY, members=(MemberCard(name="1fm", frames=1),)),
        {"1fm": net.state_dict()},
    )
    key = "models/net/1fm/weights.safetensors"
    store.write_bytes(key, b"\x80\x04PK pickled, not safetensors" * 10)  # e.g. a torch.save file
    with pytest.raises(InvalidArgumentError, match="not a valid safetensors file") as err:
        load_member(store, card, "1fm")
    assert err.value.field == key and not err.value.retryable
    assert store.key_url(key) in err.value.message


def test_unet2d_runs_nothing_at_full_resolution_but_its_last_two_layers() -> None:
    """The layout's point: the input is read only by stride-2 convolutions, and the only
    layers whose output has the input's size are the top transposed convolution and
    the logits convolution after it."""
    net = build_network("unet2d", frames=3, width=0.5).eval()
    x = torch.randn(1, 3, 64, 64)
    full_resolution: list[nn.Module] = []
    readers: list[nn.Module] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        if output.shape[-2:] == (64, 64):
            full_resolution.append(module)
        if inputs[0] is x:
            readers.append(module)

    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            module.register_forward_hook(record)
    with torch.no_grad():
        net(x)
    assert [type(m) for m in full_resolution] == [nn.ConvTranspose2d, nn.Conv2d]
    assert len(readers) == 2  # the first unit's body and its strided skip
    assert all(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in readers)
    assert [m.out_channels for m in net.down] == [16, 32, 64, 128]  # type: ignore[union-attr]


def test_unet2d_tile_with_a_receptive_field_halo_equals_the_whole_image() -> None:
    """Eval-mode BatchNorm keeps a voxel's logits a function of its receptive field
    (about ±93 px here): a crop on the 16-px grid with a 96-px margin predicts its
    core like the whole image does, and a 32-px margin does not."""
    torch.manual_seed(3)
    net = build_network("unet2d", frames=1, width=TINY)
    with torch.no_grad():
        net(torch.randn(4, 1, 64, 64))  # running statistics that are not the identity
    net.eval()
    x = torch.randn(1, 1, 320, 320)
    core = (slice(128, 192), slice(128, 192))
    with torch.no_grad():
        whole = net(x)[0, :, core[0], core[1]]
        for margin, seamless in ((96, True), (32, False)):
            lo, hi = 128 - margin, 192 + margin
            tile = net(x[..., lo:hi, lo:hi])[0, :, margin:-margin, margin:-margin]
            assert torch.allclose(tile, whole, atol=1e-5) is seamless


def _reach(net: nn.Module, size: int) -> int:
    """How far from the centre pixel its foreground logit has a non-zero gradient."""
    x = torch.randn(1, 1, size, size, requires_grad=True)
    centre = size // 2
    net(x)[0, 1, centre, centre].backward()
    assert x.grad is not None
    ys, xs = torch.nonzero(x.grad[0, 0] != 0, as_tuple=True)
    return int(torch.cat([ys, xs]).sub(centre).abs().max())


@pytest.mark.parametrize("input_scale", [1, 2])
@pytest.mark.parametrize("architecture", [*ARCHITECTURES, "ynet"])
def test_the_seamless_halo_covers_the_measured_receptive_field(
    architecture: str, input_scale: int
) -> None:
    """The card's halo (``seamless_halo_yx``) reaches as far as the network looks,
    on the grid the network pools on, and not a grid cell more."""
    torch.manual_seed(0)
    net = build_network(architecture, frames=1, width=TINY, input_scale=input_scale).eval()
    halo = seamless_halo_yx(architecture, input_scale)
    cell = INPUT_MULTIPLE * input_scale
    reach = _reach(net, 2 * halo + 2 * cell)  # room for the field on both sides
    assert halo % cell == 0
    assert halo - cell < reach <= halo


def test_an_unknown_architecture_has_no_halo() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown architecture 'vit'"):
        seamless_halo_yx("vit")


def test_deepem3d_runs_its_dilated_upsampling_in_float32_under_cpu_autocast() -> None:
    """PyTorch has no fast bfloat16 CPU kernel for a dilated transposed convolution;
    those layers run in float32, the rest of the network in bfloat16."""
    torch.manual_seed(0)
    net = DeepEM3D(3, TINY).eval()
    seen: dict[bool, set[torch.dtype]] = {True: set(), False: set()}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
        assert isinstance(module, nn.ConvTranspose2d)
        seen[module.dilation != (1, 1)].add(inputs[0].dtype)

    for module in net.modules():
        if isinstance(module, nn.ConvTranspose2d):
            module.register_forward_hook(record)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        exact = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net(x)
    assert seen == {True: {torch.float32}, False: {torch.float32, torch.bfloat16}}
    assert torch.allclose(mixed.float(), exact, atol=0.05 * float(exact.abs().max()))
