"""The order of an epoch: shuffled across all shards, optionally class-balanced (plain numpy, no Keras)."""

from __future__ import annotations

import numpy as np

from python_task.errors import ConfigError

BALANCE_MODES = ("none", "oversample", "undersample")


def epoch_order(labels: np.ndarray, *, shuffle: bool, balance: str, rng: np.random.Generator) -> np.ndarray:
    """Positions into the index for one epoch: shuffled across all shards, class-balanced if asked."""
    if balance not in BALANCE_MODES:
        raise ConfigError("balance", f"unknown mode {balance!r}; choose from {', '.join(BALANCE_MODES)}")
    n = len(labels)
    if balance == "none" or n == 0:
        order = np.arange(n)
    else:
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        target = max(map(len, groups)) if balance == "oversample" else min(map(len, groups))
        order = np.concatenate([g if len(g) == target else rng.choice(g, target, replace=len(g) < target)
                                for g in groups])
    if shuffle:
        order = rng.permutation(order)
    return order
