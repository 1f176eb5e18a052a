"""SVDQuant's algebra (ModelOpt's svdquant: awq_lite smoothing, truncated SVD, NVFP4 residual) on our emulation."""
import pytest
import torch

from kontext_trt.quant import svdquant as sq
from kontext_trt.quant.qmodel import QuantLinear


def outlier_layer(seed: int = 0, n: int = 96, k: int = 128, rows: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with heavy-tailed input channels (x20 .. x80) and inputs with 3 outlier channels (x30)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, :4] *= torch.tensor([20.0, 35.0, 50.0, 80.0])
    x = torch.randn(rows, k, generator=g)
    x[:, 10:13] *= 30
    return w, x


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def test_smoothing_is_awq_lites_formula():
    act, ws = torch.tensor([1.0, 4.0, 0.25, 9.0]), torch.tensor([0.5, 0.5, 1.0, 0.1])
    for alpha in (0.0, 0.3, 1.0):
        s = sq.smoothing(act, ws, alpha)
        raw = act ** alpha / ws ** (1 - alpha)
        assert torch.allclose(s, raw / (raw.max() * raw.min()).sqrt(), rtol=1e-6)
        assert torch.isclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-6)
    w = torch.tensor([[1.0] * 15 + [2.0], [4.0] * 16])  # block max 2 and 4: |w| / block max
    assert torch.allclose(sq.weight_scale(w), torch.tensor([0.75] * 15 + [1.0]))


@pytest.mark.parametrize("rank", [0, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parts_reconstruct_the_weight_exactly_before_quantization(rank, dtype):
    w, x = outlier_layer()
    s = sq.smoothing(x.abs().mean(0), sq.weight_scale(w), 0.5)
    inv_s, l1, l2, residual = sq.split(w, s, rank, dtype)
    assert (inv_s.dtype, l1.shape, l2.shape, l1.dtype) == (dtype, (128, rank), (rank, 96), dtype)
    smoothed = w.double() / inv_s.double()  # W diag(s) with the s the graph applies
    parts = (l1.double() @ l2.double()).T + residual.double()
    assert torch.allclose(parts, smoothed, rtol=0, atol=1e-6 * smoothed.abs().max())
    assert torch.allclose(parts * inv_s.double(), w.double(), rtol=0, atol=1e-6 * w.abs().max())  # and W itself
    # (x / s) (W s)^T = x W^T: the branch and the residual together are the layer
    assert rel_error((x.double() * inv_s.double()) @ parts.T, x.double() @ w.double().T) < 1e-6
    if rank:  # the branch holds the top singular directions: the residual is smaller than the smoothed weight
        assert residual.norm() < 0.5 * smoothed.norm()


def test_svdquant_layer_error_beats_plain_nvfp4_on_outliers():
    w, x = outlier_layer()
    ref = x @ w.T
    linear = torch.nn.Linear(128, 96, bias=False)
    linear.weight.data = w.clone()
    plain = QuantLinear(linear, "nvfp4", x.abs().max(), torch.float32)
    errors = {0: rel_error(plain(x), ref)}
    alpha = sq.search_alpha(w, x[:256], x.abs().mean(0))
    s = sq.smoothing(x.abs().mean(0), sq.weight_scale(w), alpha)
    for rank in (16, 32):
        layer = QuantLinear(linear, "nvfp4", (x.abs().amax(0) / s).max(), torch.float32, s, rank)
        errors[rank] = rel_error(layer(x), ref)
    assert alpha in sq.ALPHAS
    assert errors[32] < errors[16] < errors[0] / 10, errors  # measured: 0.0088, 0.0123, 0.84
    fp8 = QuantLinear(linear, "fp8", x.abs().max(), torch.float32)
    assert errors[32] < rel_error(fp8(x), ref), errors  # and below per-tensor FP8 (0.037) here


def test_activation_stats_mean_amax_and_reservoir():
    stats = sq.ActivationStats()
    layer = torch.nn.Sequential(torch.nn.Linear(16, 8))
    hooks = stats.attach(layer, ["0"])
    xs = [torch.randn(2, 100, 16) * (i + 1) for i in range(30)]
    for x in xs:
        layer(x)
    for hook in hooks:
        hook.remove()
    every = torch.cat([x.reshape(-1, 16) for x in xs])
    assert stats.total_rows["0"] == 6000 and stats.seen["0"] == 30 * 16
    assert torch.allclose((stats.abs_sum["0"] / 6000).float(), every.abs().mean(0), rtol=1e-5)
    assert torch.equal(stats.amax["0"], every.abs().amax(0))
    assert stats.rows["0"].shape == (sq.SAMPLE_ROWS, 16)
    calls = [int((every == row).all(1).nonzero()[0]) // 200 for row in stats.rows["0"]]  # rows that were seen
    assert 0.35 < sum(c >= 15 for c in calls) / sq.SAMPLE_ROWS < 0.65  # uniform over calls: about half are late


@pytest.mark.parametrize("rank", [0, 8, 32])
def test_flop_model_counts_the_branch_like_torch(tiny_ckpt, rank):
    """The SVDQuant tiny transformer under torch's FlopCounterMode (Q/DQ ops are opaque, so it counts the GEMMs:
    the dense layers, attention's two products and the branches) is exactly the FLOP model with svd_rank."""
    from torch.utils.flop_counter import FlopCounterMode

    from kontext_trt.benchmarks.flops import transformer_flops
    from kontext_trt.benchmarks.transformer_step import step_inputs
    from kontext_trt.core import checkpoint as ck
    from kontext_trt.quant import recipe as rc
    from kontext_trt.quant.qmodel import quantize_transformer
    ckpt = ck.open_checkpoint(tiny_ckpt)
    model = ck.load_transformer(ckpt, torch.float32)
    recipe = rc.make_recipe(model, "nvfp4", "fp8", rank)
    modules = dict(model.named_modules())
    amax = {f"{n}.input": torch.tensor(4.0) for n, f in recipe.layers.items() if f}
    amax |= {f"{n}.{q}": torch.tensor(4.0) for n in recipe.attention_layers for q in "qkv"}
    amax |= {f"{n}.smooth": torch.ones(modules[n].in_features) for n in rc.svd_layers(recipe)}
    quantized = quantize_transformer(model, recipe, amax, torch.float32)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        quantized(**step_inputs(ckpt.transformer_config, 1, 16, 16, torch.device("cpu")), return_dict=False)
    flops = transformer_flops(ckpt.transformer_config, 16, 16, 512, 1, svd_rank=rank)
    assert counter.get_total_flops() == flops["total"]
    assert (flops["svdquant"] > 0) == (rank > 0)


def test_low_rank_factors_match_modelopts_svd():
    """ModelOpt's svdquant takes lora_b = U_r S_r (N, r) and lora_a = V_r^T (r, K) of the smoothed weight (its svd(),
    float64, which runs on the CPU) and quantizes W s - lora_b lora_a: our L2^T and L1^T, the same residual."""
    from modelopt.torch.quantization.model_calib import svd

    w, x = outlier_layer(seed=3)
    s = sq.smoothing(x.abs().mean(0), sq.weight_scale(w), 0.4)
    inv_s, l1, l2, residual = sq.split(w, s, 16, torch.float32)
    smoothed = (w.double() / inv_s.double()).float()
    lora_b, lora_a = svd(smoothed, 16)
    assert torch.allclose(l2.T.abs(), lora_b.abs(), atol=1e-5 * lora_b.abs().max())  # columns up to sign
    assert torch.allclose(l1.T.abs(), lora_a.abs(), atol=1e-5)
    assert torch.allclose(residual, smoothed - lora_b @ lora_a, atol=1e-5 * smoothed.abs().max())


def test_outlier_checkpoint_and_layer_errors(tiny_ckpt, tmp_path):
    """inject_outliers scales a few input columns of exactly the NVFP4 block linears (x1 .. x100); on such weights
    SVDQuant's per-layer error is below plain NVFP4's."""
    from safetensors.torch import load_file

    from kontext_trt.quant import outliers

    ckpt = outliers.inject_outliers(tiny_ckpt, tmp_path / "outliers", channels=2)
    before, after = ({k: v for f in sorted((c / "transformer").glob("*.safetensors")) for k, v in load_file(f).items()}
                     for c in (tiny_ckpt, ckpt))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if outliers.BLOCK_LINEAR.fullmatch(k)} and len(changed) == 34
    for k in changed:
        ratio = (after[k].float() / before[k].float()).nan_to_num(1.0)  # (N, K) column factors
        moved = (ratio - 1).abs().amax(0) > 1e-2
        assert moved.sum() <= 2 and ratio.max() <= 100.5
    rows = outliers.layer_errors(ckpt, [0, 32], rows=64, limit=3)
    assert [r["layer"] for r in rows] == ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                          "transformer_blocks.0.attn.to_v"]
    assert all(r["nvfp4_r32"] < r["nvfp4_r0"] for r in rows), rows
