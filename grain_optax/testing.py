"""Measurement tools for grain_optax users: not part of GRAIN itself.

:func:`collective_bytes` reads the collectives of a compiled XLA program from
its post-optimisation HLO text, and the bytes each device sends, to check on
the machine at hand what a step (GRAIN's or any other) moves between devices.
It is imported on its own::

  from grain_optax.testing import collective_bytes
"""

from grain_optax._src.collectives import collective_bytes
from grain_optax._src.collectives import COLLECTIVE_KINDS
from grain_optax._src.collectives import CollectiveCost

__all__ = (
    'collective_bytes',
    'COLLECTIVE_KINDS',
    'CollectiveCost',
)
