from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from rtcontour.models.unet import ResidualBlock, ResidualUNet3D, deep_residual_unet  # noqa: E402


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        (dict(base_channels=4, levels=3), (2, 1, 16, 24, 32)),
        (dict(base_channels=4, levels=4, encoder_blocks=(1, 2, 2, 1), decoder_blocks=2),
         (1, 1, 16, 16, 16)),
    ],
    ids=["three-levels", "four-levels-more-blocks"],
)
def test_unet_output_has_one_channel_per_structure_and_input_spatial_shape(kwargs, shape):
    net = ResidualUNet3D(in_channels=1, out_channels=7, **kwargs)
    out = net(torch.zeros(shape))
    assert out.shape == (shape[0], 7, *shape[2:])


def test_deep_variant_keeps_shape_and_is_deeper():
    deep = deep_residual_unet(base_channels=2)
    plain = ResidualUNet3D(base_channels=2, levels=5)
    assert deep.divisor == 32 and plain.divisor == 16
    assert deep(torch.zeros(1, 1, 64, 64, 64)).shape == (1, 7, 64, 64, 64)


def test_residual_block_downsamples_with_stride_two():
    assert ResidualBlock(2, 4, stride=2)(torch.zeros(1, 2, 8, 8, 8)).shape == (1, 4, 4, 4, 4)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(in_channels=0), "in_channels"),
        (dict(out_channels=-1), "out_channels"),
        (dict(base_channels=2.5), "base_channels"),
        (dict(levels=1), "levels"),
        (dict(levels=3, encoder_blocks=(1, 1)), "encoder_blocks"),
        (dict(decoder_blocks=0), "decoder_blocks"),
        (dict(base_channels=32, max_channels=16), "max_channels"),
    ],
    ids=["in-zero", "out-negative", "base-float", "levels-one", "blocks-length",
         "decoder-zero", "max-below-base"],
)
def test_unet_rejects_invalid_arguments_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ResidualUNet3D(**kwargs)


def test_residual_block_rejects_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        ResidualBlock(2, 2, stride=3)


def test_deep_supervision_heads_give_coarser_outputs_only_in_forward_deep():
    net = ResidualUNet3D(base_channels=4, levels=4, deep_supervision=2)
    x = torch.zeros(2, 1, 16, 24, 32)
    outputs = net.forward_deep(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 7, 16, 24, 32), (2, 7, 8, 12, 16),
                                                 (2, 7, 4, 6, 8)]
    torch.testing.assert_close(net(x), outputs[0])


def test_deep_supervision_is_bounded_by_the_levels():
    with pytest.raises(ValueError, match="deep_supervision"):
        ResidualUNet3D(base_channels=4, levels=3, deep_supervision=2)
