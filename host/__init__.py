"""plughost's host side: plugin registry and discovery, services, HTTP API, CLI."""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("plughost")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
