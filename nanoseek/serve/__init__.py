"""OpenAI-compatible HTTP server (FastAPI) over the inference engine, and the static chat page."""

from nanoseek.serve.app import create_app

__all__ = ["create_app"]
