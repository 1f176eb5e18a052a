"""kontext_trt.export"""
