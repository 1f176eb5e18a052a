"""The FLUX transformer in three parts for step caching: head (embedders + first double block), body (the other
blocks), tail (final norm + projection), each an nn.Module over the SAME submodules of one FluxTransformer2DModel
(no weight is copied). Composed they run exactly the ops of diffusers' FluxTransformer2DModel.forward, in its order,
so on the torch backend tail(body(head(x))) is bit-identical to the single module.

The head also outputs what the step-cache policies (runtime/step_cache.py) read: the first block's residual
(First-Block Cache) and the first block's timestep-modulated input norm1(hidden, temb) (TeaCache). The body outputs
the hidden states before norm_out, not their residual, so that a computed step is the single graph's arithmetic;
the policy derives the residual it caches (final - block output) on the device.
"""
from __future__ import annotations

import torch
from torch import nn


def joint_rope(pos_embed: nn.Module, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables of the joint sequence [text | image], as diffusers computes them."""
    return pos_embed(torch.cat((txt_ids, img_ids), dim=0))


class TransformerHead(nn.Module):
    """Embedders and the first double block: the step's inputs -> block outputs, temb and the policies' indicators."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.x_embedder, self.context_embedder = model.x_embedder, model.context_embedder
        self.time_text_embed, self.pos_embed = model.time_text_embed, model.pos_embed
        self.block = model.transformer_blocks[0]

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, guidance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.x_embedder(hidden_states)  # (B, L, D)
        timestep = timestep.to(hidden.dtype) * 1000
        guidance = guidance.to(hidden.dtype) * 1000
        temb = self.time_text_embed(timestep, guidance, pooled_projections)  # (B, D)
        encoder = self.context_embedder(encoder_hidden_states)  # (B, text_length, D)
        rope = joint_rope(self.pos_embed, img_ids, txt_ids)
        modulated = self.block.norm1(hidden, emb=temb)[0]  # TeaCache's indicator, (B, L, D)
        encoder_out, hidden_out = self.block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb,
                                             image_rotary_emb=rope)
        return hidden_out, encoder_out, temb, hidden_out - hidden, modulated


class TransformerBody(nn.Module):
    """The remaining double blocks and every single block: block-0 outputs -> hidden states before norm_out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.pos_embed = model.pos_embed
        self.double_blocks = nn.ModuleList(list(model.transformer_blocks)[1:])
        self.single_blocks = model.single_transformer_blocks

    def forward(self, block_hidden_states: torch.Tensor, block_encoder_hidden_states: torch.Tensor,
                temb: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> tuple[torch.Tensor]:
        rope = joint_rope(self.pos_embed, img_ids, txt_ids)
        hidden, encoder = block_hidden_states, block_encoder_hidden_states
        for block in [*self.double_blocks, *self.single_blocks]:
            encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb,
                                    image_rotary_emb=rope)
        return (hidden,)


class TransformerTail(nn.Module):
    """Final adaptive norm and projection: hidden states before norm_out -> the velocity of every image token."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.norm_out, self.proj_out = model.norm_out, model.proj_out

    def forward(self, final_hidden_states: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.proj_out(self.norm_out(final_hidden_states, temb)),)


def transformer_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The three parts over one FluxTransformer2DModel, by stage name."""
    return {"transformer_head": TransformerHead(model), "transformer_body": TransformerBody(model),
            "transformer_tail": TransformerTail(model)}


def diffusers_names(part: str, module: nn.Module) -> dict[str, str]:
    """{a part's parameter name: the FluxTransformer2DModel parameter it is}: the head's block is transformer_blocks.0,
    the body's double_blocks.i is transformer_blocks.(i + 1) and its single_blocks the single_transformer_blocks;
    every other name is the model's own (the weight maps of the exported parts are keyed by these)."""
    rules = {"transformer_head": lambda n: "transformer_blocks.0." + n[len("block."):] if n.startswith("block.") else n,
             "transformer_body": _body_name, "transformer_tail": lambda n: n}
    return {name: rules[part](name) for name, _ in module.named_parameters()}


def _body_name(name: str) -> str:
    """A body parameter's model name."""
    if name.startswith("double_blocks."):
        index, rest = name[len("double_blocks."):].split(".", 1)
        return f"transformer_blocks.{int(index) + 1}.{rest}"
    if name.startswith("single_blocks."):
        return "single_transformer_blocks." + name[len("single_blocks."):]
    return name
