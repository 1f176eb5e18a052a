"""The quantized transformer: a FluxTransformer2DModel whose layers run the Q/DQ ops of quant/ops.py.

One module serves both ends: eagerly it is the fake-quantized model of the quality report (formats.py emulation, any
device), and torch.export turns it into the Q/DQ ONNX. Built from a checkpoint's transformer and the saved amax only,
so it never depends on ModelOpt or on a calibration run in the same process.
"""
from __future__ import annotations

import torch
from torch import nn

from kontext_trt.core.errors import KontextError
from kontext_trt.quant import formats, ops, svdquant
from kontext_trt.quant.recipe import Recipe, svd_layers


class QuantLinear(nn.Module):
    """nn.Linear with stored FP8 or NVFP4 weights and a calibrated activation scale: y = QDQ(x) @ DQ(W)^T + b.

    With a smoothing s and rank r > 0 (NVFP4 only) it is an SVDQuant layer (quant/svdquant.py):
    y = (x * inv_s) @ L1 @ L2 + QDQ(x * inv_s) @ DQ(R)^T + b, the branch in dtype, R the NVFP4 residual."""

    def __init__(self, linear: nn.Linear, fmt: str, input_amax: torch.Tensor, dtype: torch.dtype,
                 smooth: torch.Tensor | None = None, rank: int = 0) -> None:
        super().__init__()
        self.fmt, self.svd = fmt, smooth is not None and rank > 0
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        w = linear.weight.detach().float()  # (N, K)
        if self.svd:
            if fmt != "nvfp4":
                raise KontextError(f"SVDQuant needs an nvfp4 layer, not {fmt!r}: quantize again")
            inv_s, l1, l2, w = svdquant.split(w, smooth, rank, dtype)
            self.register_buffer("smooth_inv", inv_s)  # (K,) multiplies x
            self.register_buffer("lora_down", l1)  # (K, r)
            self.register_buffer("lora_up", l2)  # (r, N)
        if fmt == "fp8":
            self.register_buffer("weight_scale", formats.scale_for(w.abs().max(), formats.E4M3_MAX, dtype))
            self.register_buffer("weight", formats.round_e4m3(w.T.contiguous() / self.weight_scale.float()))  # (K, N)
            self.register_buffer("input_scale", formats.scale_for(input_amax, formats.E4M3_MAX, dtype))
        elif fmt == "nvfp4":
            self.register_buffer("weight_scale", formats.scale_for(w.abs().max(), formats.NVFP4_MAX, dtype))
            codes, block_scale = formats.nvfp4_quantize(w, self.weight_scale)
            self.register_buffer("weight", formats.pack_e2m1(codes).view(torch.float4_e2m1fn_x2))  # (N, K/2)
            self.register_buffer("weight_block_scale", block_scale)  # (N, K/16) float8_e4m3fn
            self.register_buffer("input_scale", formats.scale_for(input_amax, formats.NVFP4_MAX, dtype))
        else:
            raise KontextError(f"unknown layer format {fmt!r} in the recipe: quantize again")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = None
        if self.svd:
            x = x * self.smooth_inv
            branch = torch.matmul(torch.matmul(x, self.lora_down), self.lora_up)
        if self.fmt == "fp8":
            y = torch.matmul(ops.fp8_qdq(x, self.input_scale), ops.fp8_dq(self.weight, self.weight_scale))
        else:
            w = ops.nvfp4_dq(self.weight, self.weight_block_scale, self.weight_scale)  # (N, K)
            y = torch.matmul(ops.nvfp4_qdq(x, self.input_scale), w.T)
        if branch is not None:
            y = y + branch
        return y if self.bias is None else y + self.bias


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, H, L, d) with FP8 Q/DQ on q/sqrt(d), k^T, v and the probabilities.

    Written as MatMul-Softmax-MatMul with the scale and transpose before each Q (DQ feeds MatMul directly): the
    pattern TensorRT fuses into FP8 attention.
    """
    q = ops.fp8_qdq(q * q.shape[-1] ** -0.5, attn.q_scale)
    kt = ops.fp8_qdq(k.transpose(-1, -2), attn.k_scale)
    p = torch.softmax(torch.matmul(q, kt), dim=-1)  # (B, H, L, L)
    return torch.matmul(ops.fp8_qdq(p, attn.p_scale), ops.fp8_qdq(v, attn.v_scale))


def fp8_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn: nn.Module,
              image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """RoPE on query and key (B, S, H, d), then fp8_attention; the output (B, S, H*d) in query's dtype."""
    from diffusers.models.embeddings import apply_rotary_emb

    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    out = fp8_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn)
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


def joint_qkv(attn: nn.Module, projections: tuple) -> tuple[torch.Tensor, ...]:
    """(query, key, value) (B, S, H, d) of a joint attention from its six projections: q/k normed, the text tokens'
    (added projections) first."""
    query, key, value, e_query, e_key, e_value = projections
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if attn.added_kv_proj_dim is not None:
        query = torch.cat([attn.norm_added_q(e_query.unflatten(-1, (-1, attn.head_dim))), query], dim=1)
        key = torch.cat([attn.norm_added_k(e_key.unflatten(-1, (-1, attn.head_dim))), key], dim=1)
        value = torch.cat([e_value.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
    return query, key, value


def joint_out(attn: nn.Module, out: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """A joint attention's output projections: image tokens through to_out, text tokens (first) through to_add_out."""
    if encoder_hidden_states is None:
        return out
    n_text = encoder_hidden_states.shape[1]
    text, image = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
    return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())


class Fp8AttnProcessor:
    """diffusers' FluxAttnProcessor (FLUX.1, 0.35 .. 0.42) with fp8_attention in place of
    scaled_dot_product_attention."""

    projections_module = "diffusers.models.transformers.transformer_flux"  # where its _get_qkv_projections lives
    transformer = "Kontext's"  # how the mask refusal names the model
    projects_lone_stream = False  # an image stream without text goes through to_out too

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        import importlib

        if attention_mask is not None:
            raise KontextError(f"FP8 attention takes no attention mask ({self.transformer} transformer passes none)")
        projections = importlib.import_module(self.projections_module)._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        out = fp8_heads(*joint_qkv(attn, projections), attn, image_rotary_emb)
        if encoder_hidden_states is None and self.projects_lone_stream:
            return attn.to_out[1](attn.to_out[0](out))
        return joint_out(attn, out, encoder_hidden_states)


class Fp8Flux2AttnProcessor(Fp8AttnProcessor):
    """diffusers' Flux2AttnProcessor (FLUX.2 [klein]'s double blocks, 0.42) with fp8_attention in place of
    dispatch_attention_fn: FLUX.1's but for its projections and, unlike FLUX.1's, a lone image stream projected too."""

    projections_module = "diffusers.models.transformers.transformer_flux2"
    transformer = "klein's"
    projects_lone_stream = True


class Fp8Flux2ParallelAttnProcessor:
    """diffusers' Flux2ParallelSelfAttnProcessor (FLUX.2 [klein]'s single blocks, 0.42: one fused QKV + MLP-in
    projection, one fused output projection) with fp8_attention in place of dispatch_attention_fn."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise KontextError("FP8 attention takes no attention mask (klein's transformer passes none)")
        qkv, mlp = attn.to_qkv_mlp_proj(hidden_states).split(
            [3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor], dim=-1)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        out = fp8_heads(attn.norm_q(query), attn.norm_k(key), value, attn, image_rotary_emb)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


# The FP8 processor of each attention module class the recipe lists (recipe.FP8_ATTENTION)
FP8_PROCESSORS = {"FluxAttention": Fp8AttnProcessor, "Flux2Attention": Fp8Flux2AttnProcessor,
                  "Flux2ParallelSelfAttention": Fp8Flux2ParallelAttnProcessor}


def quantize_transformer(model: nn.Module, recipe: Recipe, amax: dict[str, torch.Tensor],
                         dtype: torch.dtype) -> nn.Module:
    """Swap the recipe's linears for QuantLinear and give its attention modules FP8 attention, in place.

    `model` is already in dtype (loaded so); the quantized layers' scales and biases are stored in dtype too."""
    modules, svd = dict(model.named_modules()), set(svd_layers(recipe))
    for name, fmt in recipe.layers.items():
        if fmt is None:
            continue
        if f"{name}.input" not in amax or not isinstance(modules.get(name), nn.Linear) or \
                (name in svd and f"{name}.smooth" not in amax):
            raise KontextError(f"the saved calibration does not fit this transformer (layer {name}): quantize again")
        parent, _, child = name.rpartition(".")
        layer = QuantLinear(modules[name], fmt, amax[f"{name}.input"], dtype, amax.get(f"{name}.smooth"),
                            recipe.svd_rank if name in svd else 0)
        setattr(modules[parent] if parent else model, child, layer)
    for name in recipe.attention_layers:
        attn = modules[name]
        head_scale = attn.head_dim ** -0.5
        for q, factor in (("q", head_scale), ("k", 1.0), ("v", 1.0)):
            attn.register_buffer(f"{q}_scale", formats.scale_for(amax[f"{name}.{q}"] * factor, formats.E4M3_MAX, dtype))
        attn.register_buffer("p_scale", formats.scale_for(1.0, formats.E4M3_MAX, dtype))  # softmax output in [0, 1]
        attn.set_processor(FP8_PROCESSORS[type(attn).__name__]())
    return model
