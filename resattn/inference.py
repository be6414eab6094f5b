"""A self-contained classifier for serving: raw images in, class probabilities out."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from resattn.data import Normalization

MAX_IMAGE_PIXELS = 4096 * 4096


class NormalizedClassifier(nn.Module):
    """Wraps a trained network with its normalisation: input float (N, 3, H, W) in [0, 1]."""

    def __init__(self, network: nn.Module, norm: Normalization) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images - self.mean) / self.std).softmax(1)


def load_images(paths: list[Path], size: int = 32) -> torch.Tensor:
    """Image files -> float (N, 3, size, size) in [0, 1]; any mode is converted to RGB and any
    other size resized, and oversized or unreadable files are refused with their path."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # decompression bombs raise instead of eating memory
    batch = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BILINEAR)
                pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
            raise ValueError(f"{path}: not a readable image ({error})") from None
        batch.append(pixels.view(size, size, 3).permute(2, 0, 1).float() / 255)
    return torch.stack(batch)
