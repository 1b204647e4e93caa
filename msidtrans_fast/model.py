"""The MSI-DTrans network (docs/design.md, "The network")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from . import backends
from .modules import (
    Conv3x3Block,
    Downsample,
    FSEModule,
    MSSEModule,
    Permutation,
    RSEModule,
    Transformer,
    Upsample,
    conv_bn,
    conv_bn_mish,
    mish,
)

#: Number of attention calls per forward, in the original's order: t0 layer 0, t0 layer 1, tu1, tu2.
NUM_ATTENTION_CALLS = 4
IDENTITY_PERMUTATION = (0, 1, 2)


def _capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s computation is being traced or captured (no host sync is allowed)."""
    return torch.compiler.is_compiling() or (
        t.is_cuda and torch.cuda.is_current_stream_capturing())


def _half(n: int) -> int:
    return math.ceil(n / 2)


class MSIDTrans(nn.Module):
    """MSI-DTrans: two source images in, a per-pixel decision map out.

    Args:
        img_channels: channels of each source image (3 for RGB, as the original).
        dropout: dropout of the transformer layers (0 in the original).
        backend: "auto", "reference" or a registered fused backend (see
            :func:`msidtrans_fast.backends.available_backends`). Changing it never touches weights.
        detach_wavelet: reproduce the original's wavelet split that cuts the autograd graph
            (for studying the original's training only; off by default).

    ``state_dict()`` has the original's 459 entries with the same names, shapes and order, so the
    original's checkpoints load with ``strict=True`` and ours load into the original.
    """

    def __init__(self, img_channels: int = 3, dropout: float = 0.0, backend: str = backends.AUTO,
                 detach_wavelet: bool = False):
        super().__init__()
        self.img_channels = img_channels
        self.Encoder1 = MSSEModule(img_channels, 32, detach_wavelet)
        self.Encoder2_high = RSEModule(32, detach_wavelet)
        self.Encoder2_low = FSEModule(32, detach_wavelet)
        self.Encoder3_high = RSEModule(48, detach_wavelet)
        self.Encoder3_low = FSEModule(48, detach_wavelet)
        self.down1 = Downsample(64, 32, 1, 1, 0)
        self.down2 = Downsample(64, 48, 1, 1, 0)
        self.down3 = Downsample(96, 64, 3, 2, 1)
        self.t0 = Transformer(64, 64, depth=2, mlp_mult=8, kv_stride=1, dropout=dropout)
        self.tu1 = Transformer(48, 48, depth=1, mlp_mult=4, kv_stride=1, dropout=dropout)
        self.tu2 = Transformer(32, 32, depth=1, mlp_mult=4, kv_stride=2, dropout=dropout)
        self.up = Upsample(32, 32)
        self.up1 = Upsample(64, 48)
        self.up2 = Upsample(48, 32)
        self.up3 = Upsample(32, 32)
        self.skip_conn0 = Conv3x3Block(128, 32)
        self.skip_conn1 = Conv3x3Block(128, 32)
        self.skip_conn2 = Conv3x3Block(192, 48)
        self.Mixer = nn.Sequential(
            nn.Conv2d(128, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Mish(),
            nn.Conv2d(64, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Mish())
        self.Mixer1 = nn.Sequential(
            nn.Conv2d(128, 64, 7, stride=4, padding=3), nn.Conv2d(64, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16), nn.Mish())
        self.Mixer2 = nn.Sequential(
            nn.Conv2d(128, 64, 3, stride=2, padding=1), nn.Conv2d(64, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16), nn.Mish())
        self.ReconstructD = nn.Sequential(nn.Conv2d(32, 1, 3, padding=1), nn.Sigmoid())
        self._backend_request = backends.AUTO
        self.backend = backend

    # ----------------------------------------------------------------------------------- backend
    @property
    def backend(self) -> str:
        """The backend in use for this model's device (assign a name to switch)."""
        return backends.resolve_backend(self._backend_request, self.ReconstructD[0].weight.device)

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend_request = backends.check_name(name)

    @property
    def memory_format(self) -> torch.memory_format:
        """``torch.channels_last`` when the convolution weights are stored so (set with
        ``model.to(memory_format=...)``), else ``torch.contiguous_format``."""
        weight = self.Encoder1.conv[0].weight
        if not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        return torch.contiguous_format

    # ----------------------------------------------------------------------------------- checks
    def _check_inputs(self, A: torch.Tensor, B: torch.Tensor, check_finite: bool) -> None:
        for name, t in (("A", A), ("B", B)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
            if t.dim() != 4:
                raise ValueError(f"{name} must have shape (b, {self.img_channels}, H, W), "
                                 f"got {tuple(t.shape)}")
            if t.shape[1] != self.img_channels:
                raise ValueError(f"{name} must have {self.img_channels} channels, got shape "
                                 f"{tuple(t.shape)}")
            if t.shape[0] < 1 or t.shape[2] < 1 or t.shape[3] < 1:
                raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
        if A.shape != B.shape:
            raise ValueError(f"A and B must have the same shape, got {tuple(A.shape)} and "
                             f"{tuple(B.shape)}")
        if A.dtype != B.dtype:
            raise TypeError(f"A and B must have the same dtype, got {A.dtype} and {B.dtype}")
        if A.device != B.device:
            raise ValueError(f"A and B must be on the same device, got {A.device} and {B.device}")
        if check_finite and not _capturing(A):
            for name, t in (("A", A), ("B", B)):
                if t.device.type != "meta" and not torch.isfinite(t).all():
                    raise ValueError(f"{name} contains NaN or infinite values")

    def _attention_permutations(self, q_perms) -> list[tuple[int, ...]]:
        if q_perms is None:
            if self.training:
                return [tuple(torch.randperm(3).tolist()) for _ in range(NUM_ATTENTION_CALLS)]
            return [IDENTITY_PERMUTATION] * NUM_ATTENTION_CALLS
        perms = [tuple(int(i) for i in p) for p in q_perms]
        if len(perms) != NUM_ATTENTION_CALLS or any(sorted(p) != [0, 1, 2] for p in perms):
            raise ValueError("q_perms must be a list of 4 permutations of (0, 1, 2) (t0 layer 0, "
                             f"t0 layer 1, tu1, tu2), got {q_perms!r}")
        return perms

    # ---------------------------------------------------------------------------------- forward
    def forward(self, A: torch.Tensor, B: torch.Tensor,
                q_perms: Sequence[Permutation] | None = None, *,
                check_finite: bool = True) -> torch.Tensor:
        """Decision map of a pair.

        Args:
            A, B: (b, img_channels, H, W) floating tensors in [-1, 1], any H, W >= 1.
            q_perms: optional four permutations of (0, 1, 2), one per attention call (t0 layer 0,
                t0 layer 1, tu1, tu2): group g pairs the queries of scale ``perm[g]`` with the
                keys/values of scale g. Default: identity in eval mode, random (torch's RNG) per
                call in train mode.
            check_finite: raise ``ValueError`` on NaN/Inf inputs. The check reads the values back
                (a device sync), so it runs in eager calls only: never while ``torch.compile``
                traces or a CUDA graph captures. Callers that validated their inputs (``fuse``
                does, on the host) pass False.

        Returns:
            D, (b, 1, H, W) in (0, 1): where D is high, A is the sharp source.
        """
        self._check_inputs(A, B, check_finite)
        # The weights' layout decides the activations' (channels_last on the CPU, see
        # weights.preferred_memory_format), whatever the inputs' layout: same results either way.
        layout = self.memory_format
        A, B = A.contiguous(memory_format=layout), B.contiguous(memory_format=layout)
        perms = self._attention_permutations(q_perms)
        backend = backends.resolve_backend(self._backend_request, A.device)
        H, W = A.shape[-2:]
        H1, W1 = _half(H), _half(W)
        H2, W2 = _half(H1), _half(W1)
        H3, W3 = _half(H2), _half(W2)

        # Separate calls: in training BatchNorm normalises A and B with their own batch
        # statistics; in eval the full-resolution activations of one source at a time halve
        # the forward's peak of memory.
        xl1, xh1, _ = self.Encoder1(A, pre_attention=False)
        yl1, yh1, _ = self.Encoder1(B, pre_attention=False)
        x, y = torch.cat([xh1, yh1], dim=1), torch.cat([xl1, yl1], dim=1)
        mix0 = torch.cat([x, y], dim=1)
        skip0 = self.skip_conn0(mix0)

        xl2, xh2 = self.Encoder2_high(self.down1(x))
        yl2, yh2 = self.Encoder2_low(self.down1(y))
        x, y = torch.cat([xh2, yh2], dim=1), torch.cat([xl2, yl2], dim=1)
        mix1 = torch.cat([x, y], dim=1)
        skip1 = self.skip_conn1(mix1)

        xl3, xh3 = self.Encoder3_high(self.down2(x))
        yl3, yh3 = self.Encoder3_low(self.down2(y))
        x, y = torch.cat([xh3, yh3], dim=1), torch.cat([xl3, yl3], dim=1)
        skip2 = self.skip_conn2(torch.cat([x, y], dim=1))

        x, y = self.down3(x), self.down3(y)
        mixer = conv_bn_mish(torch.cat([x, y], dim=1), self.Mixer[0], self.Mixer[1])
        mixer = conv_bn_mish(mixer, self.Mixer[3], self.Mixer[4])
        mixer1 = mish(conv_bn(self.Mixer1[0](mix0), self.Mixer1[1], self.Mixer1[2]))
        mixer2 = mish(conv_bn(self.Mixer2[0](mix1), self.Mixer2[1], self.Mixer2[2]))
        D = torch.cat([mixer, mixer1, mixer2], dim=1)

        D = self.t0(D, perms[0:2], backend)
        D = self.tu1(self.up1(D, H3, W3) + skip2, perms[2:3], backend)
        D = self.tu2(self.up2(D, H2, W2) + skip1, perms[3:4], backend)
        D = self.up3(D, H1, W1) + skip0
        D = self.up(D, H, W)
        return self.ReconstructD(D)


#: The original code's class name, so that ``from msidtrans_fast import Network`` is a drop-in.
Network = MSIDTrans
