"""LoRA fixtures: a random LoRA saved by diffusers on the tiny checkpoint, and the same LoRA in kohya keys."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# diffusers module names the test LoRAs adapt, each with its kohya (BFL-named) key; q/k/v go into one fused qkv.
DOUBLE = {"attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj", "ff.net.0.proj": "img_mlp_0",
          "ff.net.2": "img_mlp_2", "ff_context.net.0.proj": "txt_mlp_0", "ff_context.net.2": "txt_mlp_2"}
QKV = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
       "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE = {"proj_out": "linear2"}
RANK, ALPHA = 4, 8.0


def request():
    """The edit every LoRA test runs: 64x64, 2 steps (fixture lora_request)."""
    from kontext_trt.runtime import image as im
    from kontext_trt.runtime.flow import EditRequest

    return EditRequest(prompts=["make it a watercolor"], image=im.sample_image(64, 64, seed=2), width=64, height=64, steps=2, seed=5,
                       auto_resize=False)


def random_lora(shapes: dict[str, tuple[int, ...]], seed: int, std: float = 0.15) -> dict[str, torch.Tensor]:
    """PEFT-named factors (module.lora_A.weight (r, in), module.lora_B.weight (out, r)) for the DOUBLE, QKV and
    SINGLE modules of every block."""
    gen = torch.Generator().manual_seed(seed)
    modules = [m for m in shapes if m.endswith(".weight") and (
        any(f".{name}.weight" in m for name in DOUBLE) and m.startswith("transformer_blocks.")
        or any(f".{name}.weight" in m for qkv in QKV.values() for name in qkv) and m.startswith("transformer_blocks.")
        or m.startswith("single_transformer_blocks.") and m.endswith(".proj_out.weight"))]
    sd = {}
    for name in sorted(modules):
        out, inp = shapes[name]
        module = name.removesuffix(".weight")
        sd[f"{module}.lora_A.weight"] = torch.randn(RANK, inp, generator=gen) * std
        sd[f"{module}.lora_B.weight"] = torch.randn(out, RANK, generator=gen) * std
    return sd


def to_kohya(sd: dict[str, torch.Tensor], blocks: int, singles: int) -> dict[str, torch.Tensor]:
    """The same LoRA in kohya's BFL-named keys: lora_down/lora_up/alpha, q/k/v as one block-diagonal qkv."""
    out = {}
    for i in range(blocks):
        for module, key in DOUBLE.items():
            put_kohya(out, f"lora_unet_double_blocks_{i}_{key}", [sd_pair(sd, f"transformer_blocks.{i}.{module}")])
        for key, modules in QKV.items():
            put_kohya(out, f"lora_unet_double_blocks_{i}_{key}",
                      [sd_pair(sd, f"transformer_blocks.{i}.{m}") for m in modules])
    for i in range(singles):
        for module, key in SINGLE.items():
            put_kohya(out, f"lora_unet_single_blocks_{i}_{key}", [sd_pair(sd, f"single_transformer_blocks.{i}.{module}")])
    return out


def sd_pair(sd: dict, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    return sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"]


def put_kohya(out: dict, key: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Stack down factors, block-diagonal up factors; alpha keeps PEFT's alpha / r per part."""
    out[f"{key}.lora_down.weight"] = torch.cat([a for a, _ in pairs])
    out[f"{key}.lora_up.weight"] = torch.block_diag(*[b for _, b in pairs])
    out[f"{key}.alpha"] = torch.tensor(ALPHA / RANK * RANK * len(pairs))


@pytest.fixture(scope="session")
def tiny_loras(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """{"a": diffusers LoRA A (in a folder, as save_lora_weights writes it), "b": another diffusers LoRA file,
    "kohya_a": LoRA A in kohya keys}."""
    from diffusers import FluxKontextPipeline
    from safetensors.torch import save_file

    from kontext_trt.runtime import checkpoint as ck

    ckpt = ck.open_checkpoint(tiny_ckpt)
    config = ckpt.transformer_config
    shapes = {name: tuple(p.shape) for name, p in ck.load_transformer(ckpt, torch.float32).named_parameters()}
    root = tmp_path_factory.mktemp("loras")
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        sd = random_lora(shapes, seed)
        modules = sorted({key.split(".lora_")[0] for key in sd})
        FluxKontextPipeline.save_lora_weights(
            root / name, transformer_lora_layers=sd,
            transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA, "target_modules": modules})
        paths[name] = root / name
        if name == "a":
            save_file(to_kohya(sd, config["num_layers"], config["num_single_layers"]), root / "a_kohya.safetensors")
    paths["b"] = paths["b"] / "pytorch_lora_weights.safetensors"
    paths["kohya_a"] = root / "a_kohya.safetensors"
    return paths


@pytest.fixture(scope="session")
def lora_reference(tiny_ckpt, tiny_loras):
    """uint8 images of diffusers' FluxKontextPipeline with load_lora_weights(LoRA a) + fuse_lora(lora_scale=0.8)."""
    import numpy as np
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(tiny_ckpt, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tiny_loras["a"]))
    pipe.fuse_lora(lora_scale=0.8)
    req = request()
    out = pipe(prompt=req.prompts, image=req.image, height=req.height, width=req.width, max_area=req.width * req.height,
               num_inference_steps=req.steps, guidance_scale=req.guidance, output_type="np", _auto_resize=False,
               generator=torch.Generator("cpu").manual_seed(req.seed)).images
    return (out * 255).round().astype(np.uint8)


@pytest.fixture
def lora_request():
    """The edit every LoRA test runs (see request)."""
    return request()
