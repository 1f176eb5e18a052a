"""kontext_trt.quant"""
