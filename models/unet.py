"""3D residual U-Nets for organ-at-risk segmentation.

Tensors are (batch, channels, slices, rows, columns) in the canonical orientation
(see docs/ARCHITECTURE.md). Outputs are raw logits, one channel per structure
(multi-label, apply a per-channel sigmoid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ResidualBlock", "ResidualUNet3D", "deep_residual_unet"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class ResidualBlock(nn.Module):
    """Two 3x3x3 convolutions with instance norm and LeakyReLU plus an identity/1x1 shortcut.

    Examples:
        >>> block = ResidualBlock(8, 16, stride=2)
        >>> block(torch.zeros(1, 8, 16, 16, 16)).shape
        torch.Size([1, 16, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.InstanceNorm3d(out_channels, affine=True),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + residual)


class ResidualUNet3D(nn.Module):
    """3D U-Net with residual blocks in the encoder and decoder.

    Downsampling by stride-2 convolution (the first conv of each level's first block),
    upsampling by stride-2 transposed convolution, skip connections by concatenation.

    Args:
        in_channels: input channels (1 for CT).
        out_channels: output channels (one logit per structure).
        base_channels: channels at full resolution; level ``l`` has
            ``min(base_channels * 2**l, max_channels)``.
        levels: number of resolution levels (including the full-resolution one), >= 2.
            Spatial input sizes must be divisible by ``2**(levels-1)``.
        encoder_blocks: residual blocks per encoder level.
        decoder_blocks: residual blocks per decoder level.
        max_channels: channel cap.
        deep_supervision: number of extra 1x1x1 heads on the decoder levels below full
            resolution (level 1 = half resolution, ...), at most ``levels - 2``. They serve
            :meth:`forward_deep` in training only; :meth:`forward` (and so an ONNX export)
            never runs them.

    Examples:
        >>> net = ResidualUNet3D(in_channels=1, out_channels=7, base_channels=8, levels=4)
        >>> net(torch.zeros(2, 1, 32, 64, 64)).shape
        torch.Size([2, 7, 32, 64, 64])
        >>> net = ResidualUNet3D(base_channels=4, levels=4, deep_supervision=2)
        >>> [tuple(o.shape) for o in net.forward_deep(torch.zeros(1, 1, 16, 32, 32))]
        [(1, 7, 16, 32, 32), (1, 7, 8, 16, 16), (1, 7, 4, 8, 8)]
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 7,
        base_channels: int = 16,
        levels: int = 5,
        encoder_blocks: int | Sequence[int] = 1,
        decoder_blocks: int = 1,
        max_channels: int = 256,
        deep_supervision: int = 0,
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        _check_positive_int("base_channels", base_channels)
        _check_positive_int("decoder_blocks", decoder_blocks)
        _check_positive_int("max_channels", max_channels)
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
        if max_channels < base_channels:
            raise ValueError(
                f"max_channels must be >= base_channels ({base_channels}), got {max_channels!r}"
            )
        if isinstance(encoder_blocks, int):
            blocks_per_level = [encoder_blocks] * levels
        else:
            blocks_per_level = list(encoder_blocks)
            if len(blocks_per_level) != levels:
                raise ValueError(
                    f"encoder_blocks must have one entry per level ({levels}), "
                    f"got {encoder_blocks!r}"
                )
        for count in blocks_per_level:
            _check_positive_int("encoder_blocks", count)
        if (isinstance(deep_supervision, bool) or not isinstance(deep_supervision, int)
                or not 0 <= deep_supervision <= levels - 2):
            raise ValueError(f"deep_supervision must be an integer in [0, levels - 2 = "
                             f"{levels - 2}], got {deep_supervision!r}")

        self.levels = levels
        widths = [min(base_channels * 2**level, max_channels) for level in range(levels)]
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.InstanceNorm3d(widths[0], affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )
        self.encoders = nn.ModuleList()
        for level in range(levels):
            in_width = widths[0] if level == 0 else widths[level - 1]
            stride = 1 if level == 0 else 2
            blocks: list[nn.Module] = [ResidualBlock(in_width, widths[level], stride=stride)]
            blocks += [
                ResidualBlock(widths[level], widths[level])
                for _ in range(blocks_per_level[level] - 1)
            ]
            self.encoders.append(nn.Sequential(*blocks))
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(levels - 2, -1, -1):
            self.upsamplers.append(
                nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2, bias=False)
            )
            dec: list[nn.Module] = [ResidualBlock(2 * widths[level], widths[level])]
            dec += [ResidualBlock(widths[level], widths[level]) for _ in range(decoder_blocks - 1)]
            self.decoders.append(nn.Sequential(*dec))
        self.head = nn.Conv3d(widths[0], out_channels, 1)
        # registered last, so a checkpoint without them loads as a prefix of the parameters
        self.aux_heads = nn.ModuleList(
            nn.Conv3d(widths[level], out_channels, 1) for level in range(1, deep_supervision + 1)
        )

    @property
    def divisor(self) -> int:
        """Spatial sizes of the input must be multiples of this."""
        return int(2 ** (self.levels - 1))

    def _decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Decoder outputs from the coarsest decoded level to full resolution."""
        skips: list[torch.Tensor] = []
        out = self.stem(x)
        for encoder in self.encoders:
            out = encoder(out)
            skips.append(out)
        skips.pop()
        decoded = []
        for upsampler, decoder in zip(self.upsamplers, self.decoders, strict=True):
            out = upsampler(out)
            out = decoder(torch.cat([out, skips.pop()], dim=1))
            decoded.append(out)
        return decoded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, out_channels, D, H, W) at the input's resolution."""
        return self.head(self._decode(x)[-1])

    def forward_deep(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Full-resolution logits, then one per auxiliary head at 1/2, 1/4, ... resolution."""
        decoded = self._decode(x)
        outputs = [self.head(decoded[-1])]
        for level, head in enumerate(self.aux_heads, start=1):
            outputs.append(head(decoded[-1 - level]))
        return outputs


def deep_residual_unet(
    in_channels: int = 1, out_channels: int = 7, base_channels: int = 16,
    deep_supervision: int = 0,
) -> ResidualUNet3D:
    """Deeper variant: 6 levels, 1-2-2-3-3-3 encoder blocks, 2 decoder blocks, channels <= 320.

    Examples:
        >>> net = deep_residual_unet(base_channels=4)
        >>> net(torch.zeros(1, 1, 64, 64, 64)).shape
        torch.Size([1, 7, 64, 64, 64])
    """
    return ResidualUNet3D(
        in_channels=in_channels,
        out_channels=out_channels,
        base_channels=base_channels,
        levels=6,
        encoder_blocks=(1, 2, 2, 3, 3, 3),
        decoder_blocks=2,
        max_channels=320,
        deep_supervision=deep_supervision,
    )
