"""The bounds on a sweep plan's size, with their defaults: plain data, so the command line shows them in ``--help``
without loading the runner.

``max_points``: the most points a plan may have. Every point is checked before the first one runs, then trained;
a plan above it is refused before any point is built, from the number of levels of its factors (1,000 seeds x
1,000 learning rates are 10⁶ points: about 13 minutes of checking alone).

``max_plan_nodes``: the most YAML nodes (scalars, lists, mappings) a plan may hold with its aliases written out.
Anchors nested a few deep stand for billions of values (nine levels of ten aliases: 10⁹); such a document is
refused while it is read, before anything is built from it.
"""

from __future__ import annotations

MAX_POINTS = 10_000
MAX_PLAN_NODES = 100_000
