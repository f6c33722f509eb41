"""Inference: paged latent KV cache, sampling, and the continuous-batching engine."""

from nanoseek.infer.engine import Completion, Engine, Request, SamplingParams, StreamEvent

__all__ = ["Completion", "Engine", "Request", "SamplingParams", "StreamEvent"]
