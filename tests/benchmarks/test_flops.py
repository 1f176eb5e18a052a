"""The analytic FLOP model against torch's FlopCounterMode on the tiny, slim and full-size transformers.

Both count the same matrix products (2 FLOP per multiply-add), so they agree exactly, not just within a
tolerance. One difference is real and shown below: on CPU torch's default SDPA kernel
(_scaled_dot_product_flash_attention_for_cpu) has no FLOP formula, so the counter misses attention unless
the math backend (plain bmm) runs; on meta tensors SDPA takes the math path by itself.
"""
import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kontext_trt.benchmarks.flops import transformer_flops
from kontext_trt.benchmarks.transformer_step import preset_config, step_inputs
from kontext_trt.core import checkpoint as ck


def counted(model, config, batch, target, context, device="cpu"):
    inputs = step_inputs(config, batch, target, context, torch.device(device))
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        model(**inputs, return_dict=False)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    ckpt = ck.open_checkpoint(tiny_ckpt)
    return ck.load_transformer(ckpt, torch.float32), ckpt.transformer_config


@pytest.mark.parametrize("batch,target,context", [(1, 16, 16), (2, 24, 40), (1, 20, 0)])
def test_tiny_checkpoint_matches_torch_counter(tiny, batch, target, context):
    model, config = tiny
    expected = transformer_flops(config, target, context, 512, batch)["total"]
    assert expected == counted(model, config, batch, target, context)


def test_cpu_flash_attention_is_not_counted_by_torch(tiny):
    model, config = tiny
    inputs = step_inputs(config, 1, 16, 16, torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**inputs, return_dict=False)
    flops = transformer_flops(config, 16, 16)
    assert counter.get_total_flops() == flops["total"] - flops["attention"]


@pytest.mark.parametrize("preset", ["slim", "full"])
def test_real_widths_on_meta_match_torch_counter(preset):
    """1024x1024 target + 1024x1024 context (L = 8704) on the meta device: shapes only, no compute."""
    config = preset_config(preset)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    assert transformer_flops(config, 4096, 4096)["total"] == counted(model, config, 1, 4096, 4096, "meta")


def test_full_size_matches_the_reference_estimate():
    """KONTEXT_REFERENCE.md: ~1.12e14 linear + ~5.3e13 attention = ~1.65e14 FLOP per step at L = 8704."""
    flops = transformer_flops(preset_config("full"), 4096, 4096)
    assert flops["attention"] == pytest.approx(5.3e13, rel=0.01)
    assert flops["total"] - flops["attention"] == pytest.approx(1.12e14, rel=0.01)
    assert flops["total"] == pytest.approx(1.65e14, rel=0.01)


@pytest.mark.parametrize("name", ["KLEIN_4B", "KLEIN_9B"])
def test_klein_real_widths_on_meta_match_torch_counter(name):
    """FLUX.2 [klein] 4B and 9B (published widths) on the meta device: the model has 3.9e9 and 9.1e9 parameters, and
    the FLOP model equals torch's count (target 64 + two references' 48 tokens, 32 text tokens)."""
    from diffusers import Flux2Transformer2DModel

    from kontext_trt.benchmarks import flops

    config = getattr(flops, name)
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        inputs = dict(hidden_states=torch.zeros(1, 112, 128), timestep=torch.ones(1), img_ids=torch.zeros(112, 4),
                      encoder_hidden_states=torch.zeros(1, 32, config["joint_attention_dim"]),
                      txt_ids=torch.zeros(32, 4))
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
            model(**inputs, return_dict=False)
    assert round(sum(p.numel() for p in model.parameters()) / 1e8) == {"KLEIN_4B": 39, "KLEIN_9B": 91}[name]
    assert flops.step_flops(config, 64, 48, 32)["total"] == counter.get_total_flops()
    assert flops.step_flops(config, 64, 48, 32) == flops.flux2_flops(config, 64, 48, 32)


@pytest.mark.parametrize("name", ["KLEIN_4B", "KLEIN_9B"])
def test_klein_block_flops_match_torch_counter_on_meta(name):
    """One Flux2TransformerBlock and one Flux2SingleTransformerBlock at the published widths, on the meta device with
    their inputs as the model hands them over (target 64 + references 48 tokens, 32 text tokens): torch's count equals
    flux2_block_flops (what gpu_blocks' MFU divides), and step_block_flops picks it by the config's class."""
    from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock, Flux2TransformerBlock

    from kontext_trt.benchmarks import flops

    config = getattr(flops, name)
    d, heads, head_dim = config["num_attention_heads"] * 128, config["num_attention_heads"], 128
    with torch.device("meta"):
        blocks = {"double": Flux2TransformerBlock(d, heads, head_dim, config["mlp_ratio"]),
                  "single": Flux2SingleTransformerBlock(d, heads, head_dim, config["mlp_ratio"])}
        states = dict(hidden_states=torch.zeros(1, 112, d), encoder_hidden_states=torch.zeros(1, 32, d),
                      image_rotary_emb=(torch.zeros(144, head_dim), torch.zeros(144, head_dim)))
        extra = {"double": dict(temb_mod_img=torch.zeros(1, 6 * d), temb_mod_txt=torch.zeros(1, 6 * d)),
                 "single": dict(temb_mod=torch.zeros(1, 3 * d), split_hidden_states=True)}
        counted_flops = {}
        for kind, block in blocks.items():
            counter = FlopCounterMode(display=False)
            with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
                block(**states, **extra[kind])
            counted_flops[kind] = counter.get_total_flops()
    assert flops.flux2_block_flops(config, 64, 48, 32) == counted_flops
    assert flops.step_block_flops(config, 64, 48, 32) == counted_flops
