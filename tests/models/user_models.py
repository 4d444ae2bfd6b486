"""User model files for CLI tests: one good, one whose forward fails, one with an
unsupported op, one with a data-dependent shape."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _Base(nn.Module):
    vocab_size = 16
    block_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.out = nn.Linear(8, 16)


class Good(_Base):
    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(idx)))


class FailingForward(_Base):
    def forward(self, idx: Tensor) -> Tensor:
        return self.out(self.emb(idx).transpose(0, 1).reshape(3, -1))


class UsesFFT(_Base):
    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.fft.fft(self.emb(idx)).real)


class DataDependent(_Base):
    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx)
        return self.out(h * h[h > 0].sum())


def good() -> nn.Module:
    return Good()


def failing() -> nn.Module:
    return FailingForward()


def fft() -> nn.Module:
    return UsesFFT()


def data_dependent() -> nn.Module:
    return DataDependent()


def not_a_model() -> int:
    return 3
