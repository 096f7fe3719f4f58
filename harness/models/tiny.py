"""Tiny SD1.5-like and SD3-like pipelines built offline with fixed seeds.

Built once, saved with save_pretrained, and always loaded back with from_pretrained: the real loading path.
The VAE has four levels so its scale factor is 8 like the real models (64x64 image -> 8x8 latent).
"""
from __future__ import annotations

import torch

from harness.models.tokenizers import clip_tokenizer, t5_tokenizer

SEED = 0
_VAE_BLOCKS = (32, 32, 64, 64)
_VAE_DOWN = ("DownEncoderBlock2D",) * 4
_VAE_UP = ("UpDecoderBlock2D",) * 4


def _seeded(build, offset: int):
    torch.manual_seed(SEED + offset)
    return build()


def build_tiny_sd():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = _seeded(lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32), 1)
    vae = _seeded(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=_VAE_BLOCKS, down_block_types=_VAE_DOWN,
        up_block_types=_VAE_UP, layers_per_block=1, latent_channels=4, sample_size=64), 2)
    text_encoder = _seeded(lambda: CLIPTextModel(CLIPTextConfig(
        bos_token_id=516, eos_token_id=517, pad_token_id=517, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=5, vocab_size=1000, max_position_embeddings=77)), 3)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(77), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_sd3():
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    transformer = _seeded(lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=64), 1)
    vae = _seeded(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=_VAE_BLOCKS, down_block_types=_VAE_DOWN,
        up_block_types=_VAE_UP, layers_per_block=1, latent_channels=16, sample_size=64,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609), 2)
    clip_config = CLIPTextConfig(bos_token_id=516, eos_token_id=517, pad_token_id=517, hidden_size=32,
                                 intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, vocab_size=1000,
                                 hidden_act="gelu", projection_dim=32, max_position_embeddings=77)
    text_encoder = _seeded(lambda: CLIPTextModelWithProjection(clip_config), 3)
    text_encoder_2 = _seeded(lambda: CLIPTextModelWithProjection(clip_config), 4)
    text_encoder_3 = _seeded(lambda: T5EncoderModel(T5Config(
        vocab_size=128, d_model=64, d_ff=64, d_kv=16, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)), 5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
        tokenizer=clip_tokenizer(77), text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(77),
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer(256))


BUILDERS = {"tiny-sd": build_tiny_sd, "tiny-sd3": build_tiny_sd3}
