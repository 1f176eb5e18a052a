"""Tiny FLUX.2 [klein] checkpoints for the parity tests, built with diffusers' and transformers' own classes (not our
synth preset, and with other widths): random weights, a byte-level BPE tokenizer trained offline with a Qwen3-style
chat template, saved in diffusers layout by save_pretrained."""
from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# The tail of Qwen3's own template in non-thinking mode (add_generation_prompt, enable_thinking=False).
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")
WORDS = ("a red house by the sea with a cat on the roof, make it night, add snow, turn the door blue, "
         "a portrait of a woman in a hat, replace the sky with stars, watercolor painting of a dog").split(", ")


def qwen_tokenizer():
    """A Qwen2TokenizerFast trained on a few phrases, byte level, with the specials and chat template of Qwen3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(WORDS * 4, trainer)
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None, chat_template=CHAT_TEMPLATE)


def write_tiny_klein(root: Path, distilled: bool, seed: int = 0) -> Path:
    """A random klein checkpoint (distilled: no CFG; base: true CFG) in diffusers layout under root."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    hidden = 24
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=40, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=12, max_position_embeddings=1024,
        tie_word_embeddings=True)).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * 8, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * hidden, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False).eval()
    vae = AutoencoderKLFlux2(block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=8,
                             norm_num_groups=8).eval()
    with torch.no_grad():  # batch-norm statistics as a trained VAE has them (not the identity of a fresh one)
        vae.bn.running_mean.copy_(torch.randn(vae.bn.num_features) * 0.3)
        vae.bn.running_var.copy_(torch.rand(vae.bn.num_features) * 2 + 0.5)
        for p in transformer.parameters():  # random init at a scale that moves the image in a few steps
            p.mul_(3.0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096, time_shift_type="exponential")
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=distilled)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def transformer_case(batch: int, refs: list[tuple[int, int]], text: int, seed: int) -> dict:
    """Inputs of a tiny klein transformer (32 channels, 72-wide text): a target of 4x4 cells, then references of
    (rows, cols) cells at t = 10, 20, ..., with the ids the loop builds."""
    from kontext_trt.runtime import klein

    ids = torch.cat([klein.grid_ids(0, 4, 4), *(klein.grid_ids(10 * (i + 1), *r) for i, r in enumerate(refs))])
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, len(ids), 32, generator=g),
            "encoder_hidden_states": torch.randn(batch, text, 72, generator=g),
            "timestep": torch.rand(batch, generator=g), "img_ids": ids,
            "txt_ids": klein.Flux2Klein().text_ids(None, text)}
