"""The dose network: a residual 3D U-Net from the input channels to dose in Gy (torch)."""

from __future__ import annotations

import torch
from torch import nn

from rtcontour.models.dose.features import N_CHANNELS, PTV_SCALE_GY
from rtcontour.models.unet import ResidualUNet3D

__all__ = ["DoseUNet"]


class DoseUNet(nn.Module):
    """:class:`models.unet.ResidualUNet3D` with one linear output channel scaled to Gy.

    The network regresses dose / ``dose_scale_gy`` (about 0..1.1), the wrapper multiplies
    back, so the exported ONNX graph outputs Gy directly.

    Args:
        in_channels: input channels (:data:`models.dose.features.N_CHANNELS`).
        base_channels, levels, max_channels: as for ``ResidualUNet3D``; spatial sizes must
            be multiples of ``2**(levels-1)``.
        dose_scale_gy: output scale, > 0.

    Examples:
        >>> net = DoseUNet(base_channels=4, levels=3)
        >>> net(torch.zeros(1, 10, 16, 8, 12)).shape
        torch.Size([1, 1, 16, 8, 12])
    """

    def __init__(
        self,
        in_channels: int = N_CHANNELS,
        base_channels: int = 16,
        levels: int = 4,
        max_channels: int = 128,
        dose_scale_gy: float = PTV_SCALE_GY,
    ) -> None:
        super().__init__()
        if not dose_scale_gy > 0:
            raise ValueError(f"dose_scale_gy must be positive, got {dose_scale_gy!r}")
        self.unet = ResidualUNet3D(in_channels, 1, base_channels, levels,
                                   max_channels=max_channels)
        self.dose_scale_gy = float(dose_scale_gy)

    @property
    def divisor(self) -> int:
        return self.unet.divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, D, H, W) -> (B, 1, D, H, W) dose in Gy."""
        return self.unet(x) * self.dose_scale_gy
