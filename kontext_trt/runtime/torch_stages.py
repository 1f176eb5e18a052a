"""The PyTorch backend: each stage is a torch module with the named I/O of stages.STAGE_IO.

The same modules are what export/ traces to ONNX, so the torch and exported stages agree by construction.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from kontext_trt.core.stages import STAGE_IO, STAGE_NAMES

FP32_INPUTS = frozenset({"timestep", "guidance", "img_ids", "txt_ids"})


class ClipModule(nn.Module):
    """CLIP-L text encoder: input_ids -> (text_embeddings, pooled_embeddings)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=input_ids, output_hidden_states=False)
        return out.last_hidden_state, out.pooler_output


class T5Module(nn.Module):
    """T5-XXL encoder: input_ids -> text_embeddings (no attention mask, as both references)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(input_ids=input_ids, output_hidden_states=False).last_hidden_state,)


class VaeEncoderModule(nn.Module):
    """VAE encoder: images in [-1, 1] -> posterior mean (unscaled, unshifted)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.encode(images).latent_dist.mean,)


class VaeDecoderModule(nn.Module):
    """VAE decoder: unscaled latent -> images in [-1, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.decode(latent).sample,)


class TransformerModule(nn.Module):
    """The FLUX transformer with the BFL/diffusers engine I/O names; output covers all image tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, guidance: torch.Tensor) -> tuple[torch.Tensor]:
        out = self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                         pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                         txt_ids=txt_ids, guidance=guidance, return_dict=False)
        return (out[0],)


class TorchStage:
    """Adapter: named tensors in, named tensors out, over one of the modules above."""

    def __init__(self, name: str, module: nn.Module, device: torch.device | str, dtype: torch.dtype,
                 weights_of: str | None = None, io: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> None:
        self.name, self.module, self.device, self.dtype = name, module.eval(), torch.device(device), dtype
        self.weights_of = weights_of  # stages.SharesWeights: the stage whose modules this one runs
        self.input_names, self.output_names = io or STAGE_IO[name]  # io: another family's names (core.family)
        self.base: dict[str, torch.Tensor] = {}  # host copies of the weights set_weights replaced, as loaded

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        args = [self._cast(name, inputs[name]) for name in self.input_names]
        with torch.no_grad():
            outputs = self.module(*args)
        return dict(zip(self.output_names, outputs))

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's shape, named as in the wrapped diffusers/transformers model."""
        return {name: tuple(p.shape) for name, p in self._params().items()}

    def base_weight(self, name: str) -> torch.Tensor:
        """A parameter as loaded: the kept copy if set_weights replaced it, else the live one."""
        return self.base[name] if name in self.base else self._params()[name].detach()

    def set_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy these values into the parameters in place (addresses, hence CUDA graphs, stay valid); every other
        parameter replaced before gets its kept base copy back, bit for bit."""
        params, named = self._params(), set()
        with torch.no_grad():
            for name, value in weights:
                if name not in self.base:
                    self.base[name] = params[name].detach().to("cpu", copy=True)
                params[name].copy_(value)
                named.add(name)
            for name in [n for n in self.base if n not in named]:
                params[name].copy_(self.base.pop(name))

    def _params(self) -> dict[str, nn.Parameter]:
        """The wrapped model's parameters by their own names (without the adapter module's first component)."""
        return {name.split(".", 1)[1]: p for name, p in self.module.named_parameters()}

    def _cast(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        keep = not tensor.is_floating_point() or name in FP32_INPUTS
        return tensor.to(self.device, tensor.dtype if keep else self.dtype)


def stage_modules(ckpt, dtype: torch.dtype) -> dict[str, nn.Module]:
    """Load the five stage modules of a checkpoint (see runtime.checkpoint) in dtype, on the CPU."""
    from kontext_trt.core import checkpoint as ck
    vae = ck.load_vae(ckpt, dtype)
    return {
        "clip": ClipModule(ck.load_clip(ckpt, dtype)),
        "t5": T5Module(ck.load_t5(ckpt, dtype)),
        "vae_encoder": VaeEncoderModule(vae),
        "transformer": TransformerModule(ck.load_transformer(ckpt, dtype)),
        "vae_decoder": VaeDecoderModule(vae),
    }


def torch_stages(ckpt, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> dict:
    """All stages of a checkpoint as TorchStage adapters on device, plus (FLUX.1 Kontext) the transformer's three
    parts for step caching over the same modules (runtime/transformer_parts.py: no weight is copied)."""
    from kontext_trt.core.family import family_named
    from kontext_trt.runtime.klein_stages import klein_stage_modules
    from kontext_trt.runtime.transformer_parts import transformer_parts

    family = family_named(ckpt.family)
    if family.stage_names != STAGE_NAMES:  # another family's stages: its own I/O names, no step-cache parts (yet)
        loaders = {"flux2-klein": klein_stage_modules}
        modules = {name: module.to(device) for name, module in loaders[family.name](ckpt, dtype).items()}
        return {name: TorchStage(name, module, device, dtype, io=family.io(name)) for name, module in modules.items()}
    modules = {name: module.to(device) for name, module in stage_modules(ckpt, dtype).items()}
    parts = transformer_parts(modules["transformer"].model)
    stages = {name: TorchStage(name, module, device, dtype) for name, module in modules.items()}
    return {**stages, **{name: TorchStage(name, part, device, dtype, "transformer") for name, part in parts.items()}}
