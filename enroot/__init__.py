"""kontext_trt.enroot"""
