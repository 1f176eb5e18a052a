"""benchmarks/transformer_step.py runs (tiny preset, CPU) and reports the FLOP model's figures."""
import json

from kontext_trt.benchmarks.flops import transformer_flops
from kontext_trt.benchmarks.transformer_step import main, preset_config


def test_tiny_step_on_cpu(capsys):
    assert main(["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--size", "80x64", "--warmup", "0",
                 "--iters", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step_ms"]["n"] == 2 and result["mfu"] is None and result["gpu"] is None
    assert result["flops_per_step"] == transformer_flops(preset_config("tiny"), 20, 20)
    assert result["tflops"] > 0
