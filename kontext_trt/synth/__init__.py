"""Synthetic FLUX.1 Kontext [dev] and FLUX.2 [klein] checkpoints for tests and the demo: random weights in the real
layouts, offline tokenizers."""
from kontext_trt.synth.checkpoint import PRESETS, write_synthetic_checkpoint

__all__ = ["PRESETS", "write_synthetic_checkpoint"]
