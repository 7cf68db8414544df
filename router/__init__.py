"""tellodb-cluster HTTP front: auth, validation, routing, fan-out and metrics."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("tellodb-cluster")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"
