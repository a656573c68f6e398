"""Visita gateway core: decode, identify, estimate, visits, points, uplink, storage."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("visita")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
