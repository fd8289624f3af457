"""Dense models with timm-style names for the conversion and accounting tests to convert."""

import math

import torch
from torch import nn


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.proj(self.norm(x))
        return x + self.mlp(x)


class Net(nn.Module):
    """timm-style names: blocks.<i>.mlp.fc1, blocks.<i>.proj, head."""

    def __init__(self, depth=4, dim=12, hidden=20, residual_rank=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, 5)
        if residual_rank is not None:  # every stacked weight = one base + a private rank-`residual_rank` term
            with torch.no_grad():
                for pick in (lambda b: b.proj, lambda b: b.mlp.fc1, lambda b: b.mlp.fc2):
                    base = pick(self.blocks[0]).weight.clone()
                    for b in self.blocks:
                        w = pick(b).weight
                        private = torch.randn(w.shape[0], residual_rank) @ torch.randn(residual_rank, w.shape[1])
                        w.copy_(base + 0.3 * private / math.sqrt(w.shape[1]))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)
