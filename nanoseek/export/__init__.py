"""Exports to other runtimes. Hugging Face safetensors is nanoseek's native format already."""

from nanoseek.export.gguf import check_representable, export_gguf

__all__ = ["check_representable", "export_gguf"]
