"""A small digit classifier whose penultimate features stand in for Inception on the embedded dataset.

FID needs the TF-Inception weights, which a laptop run cannot download; 8x8 digits are also far from what
Inception was trained on. A classifier trained on the digits train split gives features that separate the
classes, and the Fréchet distance on them (reported as ``fd_digits``, never as FID) ranks models the same
way: real held-out digits score low, noise scores high.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.LazyLinear(FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 30, seed: int = 0) -> DigitClassifier:
    """Fit on float images in [-1, 1]; small random shifts keep the features from memorising pixels."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(images.shape[1], int(labels.max()) + 1)
    model(images[:1])  # materialise the lazy layer
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    # minutes on a CPU for the digits: a bar, so that cache is not silent all that time
    for _ in tqdm(range(epochs), desc=f"training the feature classifier ({len(images)} images)", unit="epoch",
                  dynamic_ncols=True):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            idx = order[start:start + 64]
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            x = torch.roll(images[idx], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
