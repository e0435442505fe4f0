"""Compression: what is pruned, how much is left, and (later) export."""

from .report import CompressionReport, LayerCompression, compression_report

__all__ = ["CompressionReport", "LayerCompression", "compression_report"]
