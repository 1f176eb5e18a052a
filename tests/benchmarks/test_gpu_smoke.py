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


def test_streaming_modes_without_streamable_weights_are_skipped_with_the_reason(capsys, tmp_path):
    """Every other mode still runs and passes: exit 0, not 1 by design."""
    runs = []

    def run(label, options, graphs):
        runs.append(label)
        return 0.0, "report"
    failed, skipped = gpu_smoke.run_modes(run, 0, tmp_path / "engines-ws", 1e-3)
    assert failed == [] and runs == ["resident", "resident + graphs", "low-vram", "low-vram + graphs"]
    assert len(skipped) == 2 and all("has no streamable weights" in line for line in skipped)
    assert capsys.readouterr().out.count("skipped: the transformer engine in") == 2


def test_streaming_modes_run_at_half_the_streamable_weights(tmp_path):
    seen = {}

    def run(label, options, graphs):
        seen[label] = (options, graphs)
        return (1.0 if label == "low-vram" else 0.0), "report"
    failed, skipped = gpu_smoke.run_modes(run, 5_000, tmp_path, 1e-3)
    assert failed == ["low-vram"] and skipped == []
    assert seen["weight streaming 1/2 + graphs"] == ({"weight_budget": 5_000}, True)


def test_the_streaming_checkpoint_has_weights_worth_streaming(tmp_path):
    """The streaming modes' transformer: 1024 wide with 16 MiB fp32 matrices (the tiny one's largest is 32 KiB)."""
    from kontext_trt.core import checkpoint as ck
    from kontext_trt.synth import write_synthetic_checkpoint

    ckpt = write_synthetic_checkpoint(tmp_path / "wide", transformer=gpu_smoke.WIDE)
    model = ck.load_transformer(ck.open_checkpoint(ckpt), torch.float32)
    assert model.config.num_attention_heads * model.config.attention_head_dim == 1024
    assert max(p.numel() * p.element_size() for p in model.parameters()) >= 16 * 2**20
    out = model(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 8, 32),
                pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(8, 3), guidance=torch.tensor([2.5]), return_dict=False)[0]
    assert out.shape == (1, 16, 64) and torch.isfinite(out).all()
