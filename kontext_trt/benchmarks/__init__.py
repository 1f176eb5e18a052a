"""Latency, memory and roofline benchmarks: `kontext-trt bench run|compare` and transformer_step.py."""
