from torch import nn


def toy_mlp(in_features: int = 8, hidden: int = 32, dropout: float = 0.1) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
