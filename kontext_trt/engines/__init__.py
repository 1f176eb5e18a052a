"""kontext_trt.engines"""
