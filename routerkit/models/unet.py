"""A plain UNet family with configurable width and depth, and the paper-sized presets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """UNet (Ronneberger et al. 2015) with widths ``base, 2 base, ..., 2^depth base``.

    Any input size works: the input is zero-padded to a multiple of ``2 ** depth`` and the
    output cropped back, so patches such as 56 x 64 or 28 x 32 need no special care.

    Args:
        in_channels: Input channels.
        num_classes: Output channels (logits).
        base_channels: Width of the first level.
        depth: Number of down-sampling steps.
        dropout: Dropout2d probability; used by Monte-Carlo-dropout uncertainty (0 disables it).
        dropout_at: ``"both"`` (the bottleneck and before the classifier) or ``"head"`` (before
            the classifier only). With ``"head"`` the rest of the network is deterministic, so
            MC dropout runs `forward_features` once and only the 1 x 1 classifier N times.

    Example:
        >>> import torch
        >>> net = UNet(1, 3, base_channels=4, depth=2)
        >>> net(torch.randn(2, 1, 28, 32)).shape
        torch.Size([2, 3, 28, 32])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        base_channels: int = 16,
        depth: int = 3,
        dropout: float = 0.0,
        dropout_at: str = "both",
    ) -> None:
        super().__init__()
        if dropout_at not in ("both", "head"):
            raise ValueError(f"Expected dropout_at 'both' or 'head' but got {dropout_at!r}.")
        if in_channels < 1 or num_classes < 1 or base_channels < 1 or depth < 0:
            raise ValueError(
                "Expected in_channels, num_classes, base_channels >= 1 and depth >= 0 but got "
                f"{in_channels}, {num_classes}, {base_channels}, {depth}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected dropout in [0, 1) but got {dropout}.")
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = _DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(_DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth)))
        self.up_convs = nn.ModuleList(_DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.dropout_at = dropout_at
        self.bottleneck_dropout = nn.Dropout2d(dropout if dropout_at == "both" else 0.0)
        self.head_dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def _decode(self, x: Tensor) -> Tensor:
        """Features before the classifier, on the input zero-padded to a multiple of ``2 ** depth``."""
        multiple = 2**self.depth
        pad_h, pad_w = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = self.bottleneck_dropout(skips.pop())
        for up, conv in zip(self.ups, self.up_convs, strict=True):
            y = conv(torch.cat([skips.pop(), up(y)], dim=1))
        return y

    def forward_features(self, x: Tensor) -> Tensor:
        """timm's split: the encoder-decoder up to the classifier, cropped to the input size."""
        return self._decode(x)[..., : x.shape[-2], : x.shape[-1]]

    def forward_head(self, features: Tensor) -> Tensor:
        """Dropout and the 1 x 1 classifier: logits of the same height and width as ``features``."""
        logits: Tensor = self.head(self.head_dropout(features))
        return logits

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(self.head_dropout(self._decode(x)))
        return logits[..., : x.shape[-2], : x.shape[-1]]


#: Paper-sized presets: (base_channels, depth) giving about 16.6k, 1.08M and 17.3M parameters
#: for one input channel and three classes (17,226 / 1,093,191 / 17,460,627 here; PaSeR: 16,571 / 1,080,595 / 17,275,459).
PAPER_PRESETS: dict[str, tuple[int, int]] = {
    "small": (3, 3),
    "medium": (12, 4),
    "large": (48, 4),
}
