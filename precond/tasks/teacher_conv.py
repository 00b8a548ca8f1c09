"""``TeacherConv``: image classification whose labels come from a fixed random teacher conv net (no download).

Inputs are smoothed Gaussian noise images; a randomly initialised teacher (seeded by ``data_seed``) labels them
by the arg-max of its per-class standardised logits, so every class is about equally frequent. The student is
a small conv net whose 4-D kernels exercise ``structures.NMode`` (one factor per mode: out, in, kh, kw).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import attrs
import torch
from torch import nn
from torch.nn import functional as F

from precond.tasks.base import Batch, Examples
from precond.validators import number


class ConvNet(nn.Module):
    """Three 3×3 conv layers (the last two stride 2), global average pooling and a linear classifier."""

    def __init__(self, width: int, classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def smooth_noise(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` RGB images of ``size × size``: Gaussian noise blurred twice by a 3×3 box, rescaled to unit variance."""
    images = torch.randn(count, 3, size, size, generator=generator)
    for _ in range(2):
        images = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    return images / images.std()


@functools.lru_cache(maxsize=4)
def _examples(task: "TeacherConv") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(task.data_seed)
    images = smooth_noise(task.train_size + task.val_size, task.image_size, generator)
    torch.manual_seed(task.data_seed)
    teacher = ConvNet(task.teacher_width, task.classes)
    with torch.no_grad():
        logits = torch.cat([teacher(chunk) for chunk in images.split(1024)])
    labels = ((logits - logits.mean(0)) / logits.std(0)).argmax(1)
    return images, labels


@functools.lru_cache(maxsize=4)
def _load(task: "TeacherConv", device: str) -> Examples:
    images, labels = _examples(task)
    images, labels = images.to(device), labels.to(device)
    n = task.train_size
    return Examples(images[:n], labels[:n], images[n:], labels[n:], task.batch_size)


@attrs.frozen
class TeacherConv:
    """Student :class:`ConvNet` of ``width`` channels fit to a teacher of ``teacher_width``; cross-entropy loss.

    ``train_size`` / ``val_size`` examples of ``image_size``² pixels, ``classes`` labels, ``batch_size`` per step.
    """

    name: ClassVar[str] = "teacher_conv"

    width: int = attrs.field(default=16, validator=number(low=1, integer=True, meaning="the student's channels"))
    teacher_width: int = attrs.field(default=32, validator=number(
        low=1, integer=True, meaning="the teacher's channels"))
    classes: int = attrs.field(default=10, validator=number(low=2, integer=True, meaning="labels"))
    image_size: int = attrs.field(default=16, validator=number(low=1, integer=True, meaning="pixels per side"))
    train_size: int = attrs.field(default=8192, validator=number(low=1, integer=True, meaning="training examples"))
    val_size: int = attrs.field(default=1024, validator=number(low=1, integer=True, meaning="validation examples"))
    batch_size: int = attrs.field(default=64, validator=number(low=1, integer=True, meaning="examples per step"))
    data_seed: int = attrs.field(default=0, validator=number(
        integer=True, meaning="seed of the images and the teacher"))

    def settings(self) -> dict[str, Any]:
        return {"task": self.name, **attrs.asdict(self)}

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return ConvNet(self.width, self.classes)

    def load(self, device: torch.device) -> Examples:
        return _load(self, str(device))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images).float(), labels)
