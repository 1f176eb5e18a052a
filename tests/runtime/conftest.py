"""Runtime fixtures. LoRA: a random LoRA saved by diffusers on the tiny checkpoint, and the same LoRA in kohya keys.
TensorRT: the tiny engine set built on this host, and stand-ins for the engine, its contexts and streams."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kontext_trt.engines.fake_trt import FakeContext, FakeRtxContext, FakeStream
from kontext_trt.engines.fake_trt import network_engine as rtx_engine

# diffusers module names the test LoRAs adapt, each with its kohya (BFL-named) key; q/k/v go into one fused qkv.
DOUBLE = {"attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj", "ff.net.0.proj": "img_mlp_0",
          "ff.net.2": "img_mlp_2", "ff_context.net.0.proj": "txt_mlp_0", "ff_context.net.2": "txt_mlp_2"}
QKV = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
       "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE = {"proj_out": "linear2"}
RANK, ALPHA = 4, 8.0


def request():
    """The edit every LoRA test runs: 64x64, 2 steps (fixture lora_request)."""
    from kontext_trt.core import image as im
    from kontext_trt.runtime.flow import EditRequest

    return EditRequest(prompts=["make it a watercolor"], image=im.sample_image(64, 64, seed=2), width=64, height=64, steps=2, seed=5,
                       guidance=2.5, auto_resize=False)


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
def tiny_loras(once, tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """{"a": diffusers LoRA A (in a folder, as save_lora_weights writes it), "b": another diffusers LoRA file,
    "kohya_a": LoRA A in kohya keys}."""
    return once("tiny_loras", lambda: write_loras(tiny_ckpt, tmp_path_factory.mktemp("loras")))


def write_loras(tiny_ckpt: Path, root: Path) -> dict[str, Path]:
    """The LoRAs of tiny_loras, written in root."""
    from diffusers import FluxKontextPipeline
    from safetensors.torch import save_file

    from kontext_trt.core import checkpoint as ck
    ckpt = ck.open_checkpoint(tiny_ckpt)
    config = ckpt.transformer_config
    shapes = {name: tuple(p.shape) for name, p in ck.load_transformer(ckpt, torch.float32).named_parameters()}
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
def lora_reference(once, tiny_ckpt, tiny_loras):
    """uint8 images of diffusers' FluxKontextPipeline with load_lora_weights(LoRA a) + fuse_lora(lora_scale=0.8)."""
    return once("lora_reference", lambda: diffusers_lora_edit(tiny_ckpt, tiny_loras))


def diffusers_lora_edit(tiny_ckpt: Path, tiny_loras: dict[str, Path]):
    """The images of lora_reference."""
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


# --- TensorRT stage fakes (kontext_trt/engines/fake_trt.py) ----------------------------------------------------
# A CPU host builds TensorRT-RTX plans but cannot deserialize them (the runtime needs a CUDA driver), so the engine
# in the TensorRT stage tests is a stand-in exposing ICudaEngine's I/O surface from what this host does know of the
# built engine: its TensorRT-RTX network (tensor names, dtypes, dynamic axes) and the profile the manifest records.

TRT_SIZES = ((64, 64), (96, 64))  # 16 and 24 tokens: the transformer takes 16..48 image tokens


@pytest.fixture(scope="session")
def trt_engines(once, tiny_onnx, tmp_path_factory) -> Path:
    """ENGINES root with the five tiny stages built for the RTX 4090 on this CPU host, for TRT_SIZES and batch 1-2."""
    pytest.importorskip("tensorrt_rtx")
    from kontext_trt.engines import build
    from kontext_trt.engines.profiles import Shapes
    from kontext_trt.engines.skus import SKUS

    def make() -> Path:
        root = tmp_path_factory.mktemp("engines")
        build.build_set(build.BuildRequest(onnx_dir=tiny_onnx, out=root, sku=SKUS["rtx4090"],
                                           target=build.Target("tensorrt-rtx", (89,)),
                                           shapes=Shapes(TRT_SIZES, (1, 2))))
        return root
    return once("trt_engines", make)


@pytest.fixture(scope="session")
def trt_manifest(trt_engines) -> dict:
    from kontext_trt.engines import cache, trt_api

    return cache.read_engine_manifest(trt_engines / "rtx4090-sm89" / trt_api.load_api("tensorrt-rtx").folder / "fp32")


@pytest.fixture
def make_rtx_engine():
    """Makes FakeEngines of a stage's ONNX: make_rtx_engine(onnx_path, {"profile": ...}, scratch, streamable)."""
    return rtx_engine


@pytest.fixture
def fake_engines(tiny_onnx, trt_manifest, monkeypatch):
    """Plans 'load' as FakeEngines (transformer: 4 KiB scratch, decoder: 1 KiB); contexts are FakeContexts; stage
    calls run on FakeStreams. .contexts: the create_context options of each context made, .made: the contexts."""
    from kontext_trt.engines import trt_api

    made = {"transformer": rtx_engine(tiny_onnx / "transformer/model.onnx", trt_manifest.stages["transformer"]),
            "vae_decoder": rtx_engine(tiny_onnx / "vae_decoder/model.onnx", trt_manifest.stages["vae_decoder"],
                                      1024)}
    calls, contexts = [], []

    def create_context(api, engine, runtime_cache=None, **options):
        calls.append(options)
        fake = FakeRtxContext if api.is_rtx else FakeContext  # datacenter TensorRT has no is_stream_capturable
        contexts.append(fake(engine, options.get("native_graphs", False)))
        return trt_api.ExecContext(contexts[-1])

    monkeypatch.setattr(trt_api, "load_engine", lambda api, path: made[path.stem])
    monkeypatch.setattr(trt_api, "create_context", create_context)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    return SimpleNamespace(engines=made, contexts=calls, made=contexts)


@pytest.fixture
def trt_stages(trt_engines, trt_manifest):
    """Makes the transformer and decoder TrtStages of the built set on a pool: trt_stages(pool, transformer={...})."""
    from kontext_trt.engines import trt_api
    from kontext_trt.engines import trt_stages as ts
    folder = trt_engines / "rtx4090-sm89" / trt_api.load_api("tensorrt-rtx").folder / "fp32"

    def make(pool, **kw):
        pool.stream = pool.stream or FakeStream()
        return {name: ts.TrtStage(name, folder / f"{name}.plan", pool, rebuild=trt_manifest.command,
                                  **kw.get(name, {})) for name in ("transformer", "vae_decoder")}
    return make


@pytest.fixture
def transformer_inputs():
    """Makes the transformer's inputs: transformer_inputs(tokens=40, batch=2)."""
    def make(tokens: int = 40, batch: int = 2) -> dict:
        return {"hidden_states": torch.randn(batch, tokens, 64, dtype=torch.float64),
                "encoder_hidden_states": torch.randn(batch, 512, 32), "pooled_projections": torch.randn(batch, 32),
                "timestep": torch.full((batch,), 0.5), "img_ids": torch.zeros(tokens, 3),
                "txt_ids": torch.zeros(512, 3), "guidance": torch.full((batch,), 2.5)}
    return make
