"""Input sources: every source yields batches of Adverts behind one small interface."""

from sensors.base import Source

__all__ = ["Source"]
