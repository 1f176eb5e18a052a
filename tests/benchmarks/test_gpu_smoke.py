"""The GPU smoke script on a host without a GPU: one line and exit 2 before any work (its GPU run is in README)."""
import pytest
import torch

from kontext_trt.benchmarks import gpu_smoke


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a host without a GPU")
def test_without_gpu_exits_2_with_one_line(capsys, tmp_path):
    assert gpu_smoke.main(["--work", str(tmp_path / "smoke")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --engines runs TensorRT engines on an NVIDIA GPU") and err.count("\n") == 1
    assert not (tmp_path / "smoke").exists()  # nothing built or written
