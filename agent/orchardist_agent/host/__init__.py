"""Host probe: what this Mac is (chip, cores, memory and its GPU working set, bandwidth, OS, disk,
address), from macOS tools, Linux /proc, or a simulated Mac profile. One adapter per source; the
parsers are pure and tested on outputs captured on real Macs (tests/data/macos)."""

from .facts import HostFacts
from .probe import probe

__all__ = ["HostFacts", "probe"]
