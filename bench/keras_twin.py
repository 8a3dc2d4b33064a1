"""keras-cnn written in plain PyTorch: the twin bench/keras.py measures the Keras bridge against.

A builder (``--model bench/keras_twin.py:build_model``): the same layers, shapes and
initialisers' families as :func:`cifarlab.kerasnet.keras_cnn`, with Keras's BatchNormalization
settings (momentum 0.99, epsilon 1e-3).
"""

from __future__ import annotations

from torch import nn


def build_model(input_shape: tuple[int, int, int], num_classes: int, filters: int = 32,
                units: int = 128, dropout: float = 0.25) -> nn.Module:
    def block(cin: int, n: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, n, 3, padding=1, bias=False), nn.BatchNorm2d(n, 1e-3, 0.01),
                nn.ReLU(), nn.Conv2d(n, n, 3, padding=1, bias=False),
                nn.BatchNorm2d(n, 1e-3, 0.01), nn.ReLU(), nn.MaxPool2d(2)]

    f = filters
    layers: list[nn.Module] = [*block(3, f), *block(f, 2 * f), *block(2 * f, 4 * f),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(4 * f, units), nn.ReLU(), nn.Linear(units, num_classes)]
    return nn.Sequential(*layers)
