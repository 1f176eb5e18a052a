"""The T5 text length is the checkpoint's (tokenizer_2's model_max_length): a 32-token checkpoint runs the loop at 32
tokens and matches diffusers' FluxKontextPipeline called with max_sequence_length=32."""
import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from test_parity import LATENT_TOL

from kontext_trt.assemble import build_pipeline
from kontext_trt.core import checkpoint as ck
from kontext_trt.core import image as im
from kontext_trt.core.specs import LoadSpec
from kontext_trt.runtime.flow import EditRequest, KontextConfig, edit


class Spy:
    """A stage that records the shape of every input it is called with, then runs the stage it wraps."""

    def __init__(self, stage) -> None:
        self.stage, self.seen = stage, []

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.append({name: tuple(t.shape) for name, t in inputs.items()})
        return self.stage(**inputs)


@pytest.fixture(scope="module")
def ours(tiny_ckpt_t32):
    return build_pipeline(LoadSpec(tiny_ckpt_t32, backend="torch", dtype="fp32"))


def request(prompts: list[str], steps: int) -> EditRequest:
    return EditRequest(prompts=prompts, image=im.sample_image(112, 64, seed=3), width=96, height=64, steps=steps,
                       guidance=2.5, seed=11, auto_resize=False)


def test_config_reads_the_checkpoints_text_length(tiny_ckpt_t32, tiny_ckpt, tiny_bfl_ckpt):
    config = KontextConfig.from_checkpoint(ck.open_checkpoint(tiny_ckpt_t32))
    assert config.text_length == 32 and config.to_dict()["text_length"] == 32
    assert KontextConfig.from_dict(config.to_dict()) == config
    assert KontextConfig.from_checkpoint(ck.open_checkpoint(tiny_ckpt)).text_length == 512
    assert KontextConfig.from_checkpoint(ck.open_checkpoint(tiny_bfl_ckpt)).text_length == 512


def test_a_manifest_written_before_text_length_loads_as_512(tiny_ckpt_t32):
    old = KontextConfig.from_checkpoint(ck.open_checkpoint(tiny_ckpt_t32)).to_dict()
    del old["text_length"]
    assert KontextConfig.from_dict(old).text_length == 512
    assert KontextConfig.from_dict(old) == KontextConfig(**{**KontextConfig().to_dict(), "shift": KontextConfig().shift})


def test_one_step_edit_feeds_the_transformer_32_text_tokens(ours, tiny_ckpt_t32):
    t5, transformer = Spy(ours.stages["t5"]), Spy(ours.stages["transformer"])
    k = ours.with_stages(t5=t5, transformer=transformer)
    result = edit(k, request(["turn the house red", "make it night"], steps=1))
    dt = ck.open_checkpoint(tiny_ckpt_t32).transformer_config["joint_attention_dim"]
    assert t5.seen == [{"input_ids": (2, 32)}]
    (step,) = transformer.seen
    assert step["encoder_hidden_states"] == (2, 32, dt) and step["txt_ids"] == (32, 3)
    assert step["hidden_states"] == (2, 24 + 28, 64)  # 96x64 target + 112x64 context tokens
    assert result.latents.shape == (2, 24, 64) and result.metadata["text_length"] == 32


@pytest.mark.parametrize("prompts,steps", [(["turn the house red"], 1), (["add a cat", "make it night"], 2)])
def test_edit_matches_diffusers_at_max_sequence_length_32(ours, tiny_ckpt_t32, prompts, steps):
    pipe = FluxKontextPipeline.from_pretrained(tiny_ckpt_t32, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    req = request(prompts, steps)

    def reference(output_type: str, length: int = 32):
        return pipe(prompt=req.prompts, image=req.image, height=req.height, width=req.width,
                    max_area=req.width * req.height, num_inference_steps=req.steps, guidance_scale=req.guidance,
                    generator=torch.Generator("cpu").manual_seed(req.seed), output_type=output_type,
                    _auto_resize=req.auto_resize, max_sequence_length=length).images

    result = edit(ours, req)
    ref_latents = reference("latent")
    assert result.latents.shape == ref_latents.shape
    assert (result.latents - ref_latents).abs().max().item() < LATENT_TOL
    ref_uint8 = (reference("np") * 255).round().astype(np.uint8)
    ours_uint8 = np.stack([np.asarray(img) for img in result.images])
    assert ours_uint8.shape == ref_uint8.shape
    assert np.abs(ours_uint8.astype(int) - ref_uint8.astype(int)).max() <= 1
    if steps == 1:  # the length matters: diffusers' default 512 padded tokens give other latents
        assert (result.latents - reference("latent", 512)).abs().max().item() > 100 * LATENT_TOL
