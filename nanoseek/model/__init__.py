"""DeepSeek V2/V3 architecture: config, layers, MLA, DeepSeekMoE, MTP, Transformer."""

from nanoseek.model.config import PRESETS, ModelConfig, preset
from nanoseek.model.transformer import Transformer, count_parameters

__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer", "count_parameters"]
