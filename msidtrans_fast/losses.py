"""The training loss of MSI-DTrans (docs/design.md, "Training").

``loss = 0.7 * L1(D, DM) + 0.1 * Dice(D, DM) + 0.2 * (1 - SSIM(DM, D))``

``D`` is the network's decision map and ``DM`` the ground-truth decision map, both (b, 1, H, W) with
values in [0, 1]. The original computes the SSIM term with ``.item()``, which turns it into a
constant without gradient; here the SSIM term is differentiable, so it trains the network.

Everything is computed in float32 whatever the input dtype (the terms are sums over many pixels and
the SSIM constants are small), so the loss is safe to call on bf16/fp16 outputs of autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Weights of the three terms, as in the original.
L1_WEIGHT, DICE_WEIGHT, SSIM_WEIGHT = 0.7, 0.1, 0.2
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
#: Smoothing constant of the Dice term (keeps it defined for empty masks).
DICE_SMOOTH = 1.0


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 2-D Gaussian window, (size, size) float32, summing to 1."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd integer, got {size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def _check_maps(pred: torch.Tensor, target: torch.Tensor) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (b, c, H, W), got {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")


def ssim_map(x: torch.Tensor, y: torch.Tensor, window_size: int = SSIM_WINDOW,
             sigma: float = SSIM_SIGMA, data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel structural similarity of two image batches, differentiable in both arguments.

    Local statistics use a Gaussian window (``window_size`` x ``window_size``, ``sigma``) applied
    per channel with zero padding of ``window_size // 2`` (output the size of the input, as the
    original's SSIM), constants ``C1 = (0.01 L)^2`` and ``C2 = (0.03 L)^2`` with ``L = data_range``.

    Args:
        x, y: (b, c, H, W) floating tensors of the same shape.

    Returns:
        (b, c, H, W) float32 SSIM map (1 everywhere for x == y).
    """
    _check_maps(x, y)
    x, y = x.float(), y.float()
    c = x.shape[1]
    w = gaussian_window(window_size, sigma, x.device).expand(c, 1, window_size, window_size)
    pad = window_size // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, padding=pad, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = blur(x * x) - mu_xx
    var_y = blur(y * y) - mu_yy
    cov = blur(x * y) - mu_xy
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    return ((2 * mu_xy + c1) * (2 * cov + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA, data_range: float = 1.0) -> torch.Tensor:
    """Mean of :func:`ssim_map` over batch, channels and pixels: a float32 scalar (1 for x == y)."""
    return ssim_map(x, y, window_size, sigma, data_range).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor,
              smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per sample, batch mean.

    Args:
        pred, target: (b, c, H, W) maps in [0, 1].

    Returns:
        A float32 scalar in [0, 1].
    """
    _check_maps(pred, target)
    p = pred.float().flatten(1)
    t = target.float().flatten(1)
    inter = (p * t).sum(1)
    dice = (2 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return (1 - dice).mean()


def msidtrans_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor,
                                                                      dict[str, torch.Tensor]]:
    """The MSI-DTrans training loss with a differentiable SSIM term.

    Args:
        pred: D, the network output, (b, 1, H, W) in [0, 1] (any float dtype).
        target: DM, the ground-truth decision map, (b, 1, H, W) in [0, 1].

    Returns:
        (loss, parts): ``loss`` a float32 scalar with gradient; ``parts`` the detached values of
        ``l1``, ``dice``, ``ssim`` (the SSIM itself, not 1 - SSIM) and ``loss`` as detached
        float32 scalar tensors (no host synchronisation).
    """
    _check_maps(pred, target)
    p, t = pred.float(), target.float()
    l1 = (p - t).abs().mean()
    dice = dice_loss(p, t)
    s = ssim(t, p)
    loss = L1_WEIGHT * l1 + DICE_WEIGHT * dice + SSIM_WEIGHT * (1 - s)
    parts = {"loss": loss.detach(), "l1": l1.detach(), "dice": dice.detach(), "ssim": s.detach()}
    return loss, parts


class MSIDTransLoss(torch.nn.Module):
    """Module form of :func:`msidtrans_loss`; ``forward(D, DM)`` returns only the loss tensor."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return msidtrans_loss(pred, target)[0]
