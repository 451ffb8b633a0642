"""jobworker: run Linux commands as jobs under resource limits, served over gRPC with mutual TLS."""

__version__ = "0.1.0"
