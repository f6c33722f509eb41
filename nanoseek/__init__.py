"""nanoseek: DeepSeek's architecture and recipe, compact and tested."""

__version__ = "0.1.0"
