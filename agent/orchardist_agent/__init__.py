"""The Orchardist node agent: runs natively on each Mac (Metal cannot run in containers)."""

from orchardist import __version__

__all__ = ["__version__"]
