"""Orchardist: an LLM serving fleet of Apple Silicon Macs, run as a Kubernetes operator."""

__version__ = "0.1.0"
