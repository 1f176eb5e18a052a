"""kontext_trt.runtime"""
