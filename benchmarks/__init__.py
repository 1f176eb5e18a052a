"""kontext_trt.benchmarks"""
