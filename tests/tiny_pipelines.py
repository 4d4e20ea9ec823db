"""Real 🤗 diffusers pipelines built offline from tiny in-code configs.

Every builder here constructs genuine diffusers / transformers objects (``DDPMPipeline``,
``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline``, ``StableDiffusionXLPipeline``,
``FluxPipeline``, ``StableDiffusion3Pipeline``) with randomly initialised, deterministic weights
(``torch.manual_seed``) and tokenizers whose vocabularies are generated in code.  Nothing is
downloaded and ``from_pretrained`` is never called on a hub id, so the pipelines work in CI without
network access.  They produce noise, not pictures: they exist to drive schedulers through the exact
code paths real pipelines use (CFG, ``eta``/``generator`` plumbing, img2img ``strength``,
SDXL ``denoising_end``, flow matching with dynamic shift ``mu``, ``save_pretrained`` round trips).

Sizes are chosen so that every builder takes well under a second and a 4-5 step call takes a few
tens of milliseconds on a CPU.

Tokenizers
----------
* CLIP: a byte-level BPE vocabulary (all 256 byte symbols, with and without the ``</w>``
  end-of-word suffix, plus ``<|startoftext|>`` / ``<|endoftext|>``) and a handful of merges is
  written as ``vocab.json`` + ``merges.txt`` into a temporary directory and loaded with
  ``CLIPTokenizer.from_pretrained(tmpdir)``.  Every prompt therefore tokenizes without ``unk``.
* T5: transformers 5 ``T5Tokenizer`` is a ``tokenizers``-backed Unigram model that can be built
  from a ``[(piece, score), ...]`` list, so no ``sentencepiece`` model file is needed.

All pipelines (including SDXL and both flow-matching ones) build offline; there was nothing that
had to be left out.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

__all__ = [
    "SD_SCHEDULER_CONFIG",
    "SDXL_SCHEDULER_CONFIG",
    "FLUX_SCHEDULER_CONFIG",
    "SD3_SCHEDULER_CONFIG",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
    "tiny_ddpm_pipeline",
    "tiny_sd_components",
    "tiny_sd_pipeline",
    "tiny_sd_img2img_pipeline",
    "tiny_sdxl_components",
    "tiny_sdxl_pipeline",
    "tiny_flux_components",
    "tiny_flux_pipeline",
    "tiny_sd3_components",
    "tiny_sd3_pipeline",
]

# --------------------------------------------------------------------------------------------
# Scheduler configs copied from the real checkpoints' scheduler_config.json (the keys that
# matter), so that ``Cls.from_config(pipe.scheduler.config)`` sees a realistic config.
# --------------------------------------------------------------------------------------------

#: runwayml/stable-diffusion-v1-5 ``scheduler/scheduler_config.json`` (PNDM; ``clip_sample`` is a
#: DDIM key the real file carries along, kept as a hidden key through ``from_config``).
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
    clip_sample=False,
)

#: stabilityai/stable-diffusion-xl-base-1.0 ``scheduler/scheduler_config.json`` (Euler).
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    interpolation_type="linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    use_karras_sigmas=False,
)

#: black-forest-labs/FLUX.1-dev ``scheduler/scheduler_config.json``.
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

#: stabilityai/stable-diffusion-3-medium-diffusers ``scheduler/scheduler_config.json``.
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)

# Text-encoder sizes (shared by all tokenizers / encoders below).
_CLIP_VOCAB_SIZE = 1000  # >= len(tiny CLIP vocab) (=518)
_T5_VOCAB_SIZE = 300  # >= len(tiny T5 vocab)
_MAX_LEN = 77  # CLIP model_max_length; the pipelines pad prompts to it


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# a few merges so that the tokenizer really exercises BPE (tokens for "a", "cat", "the", ...)
_CLIP_MERGES = [
    "c a",
    "ca t</w>",
    "t h",
    "th e</w>",
    "o n</w>",
    "p h",
    "ph o",
    "pho t",
    "phot o</w>",
]


def _clip_vocab() -> dict[str, int]:
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    for merge in _CLIP_MERGES:
        a, b = merge.split(" ")
        tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def tiny_clip_tokenizer(directory: str | None = None):
    """A real ``CLIPTokenizer`` loaded from a tiny ``vocab.json`` + ``merges.txt``.

    The two files are written into ``directory`` (a fresh temporary directory by default) and
    loaded with ``CLIPTokenizer.from_pretrained``.  Vocabulary size 518 (< ``_CLIP_VOCAB_SIZE``).
    """
    from transformers import CLIPTokenizer

    own_tmp = directory is None
    if own_tmp:
        tmp = tempfile.TemporaryDirectory(prefix="fastsampler-tiny-clip-")
        directory = tmp.name
    try:
        with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(_clip_vocab(), f, ensure_ascii=False)
        with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(_CLIP_MERGES) + "\n")
        tok = CLIPTokenizer.from_pretrained(directory, model_max_length=_MAX_LEN)
    finally:
        if own_tmp:
            tmp.cleanup()
    return tok


def tiny_t5_tokenizer():
    """A real ``T5Tokenizer`` (tokenizers-backed Unigram) from an in-code piece list.

    Pieces: ``<pad>``, ``</s>``, ``<unk>``, the word-start marker, ASCII letters/digits with and
    without the marker, and a few whole words.  No sentencepiece model file involved.
    """
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    pieces += [(c, -5.0) for c in chars]
    pieces += [("▁" + c, -4.0) for c in chars]
    pieces += [("▁" + w, -1.0) for w in ("a", "the", "cat", "photo", "of", "on", "dog", "an", "astronaut")]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    assert len(tok) <= _T5_VOCAB_SIZE
    return tok


# --------------------------------------------------------------------------------------------
# Text encoders / VAE helpers
# --------------------------------------------------------------------------------------------


def _clip_text_config(hidden_size: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    tok_vocab = _clip_vocab()
    return CLIPTextConfig(
        bos_token_id=tok_vocab["<|startoftext|>"],
        eos_token_id=tok_vocab["<|endoftext|>"],
        pad_token_id=tok_vocab["<|endoftext|>"],
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=_CLIP_VOCAB_SIZE,
        max_position_embeddings=_MAX_LEN,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )


def _clip_text_model(seed: int, with_projection: bool = False, **cfg):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    _seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_text_config(**cfg)).eval()


def _t5_encoder(seed: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    _seed(seed)
    cfg = T5Config(
        vocab_size=_T5_VOCAB_SIZE,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def _sd_vae(seed: int):
    """Tiny SD-style VAE: 2 blocks -> vae_scale_factor 2, 4 latent channels."""
    from diffusers import AutoencoderKL

    _seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        sample_size=16,
    ).eval()


def _flow_vae(seed: int, latent_channels: int):
    """Tiny SD3/Flux-style VAE: 1 block -> vae_scale_factor 1, no (post_)quant_conv."""
    from diffusers import AutoencoderKL

    _seed(seed)
    return AutoencoderKL(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


# --------------------------------------------------------------------------------------------
# DDPM (unconditional)
# --------------------------------------------------------------------------------------------


def _assemble(cls, components: dict, **extra):
    """Build a pipeline from its components, progress bars off (tests call them many times)."""
    pipe = cls(**components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ddpm_pipeline(scheduler=None, seed: int = 0):
    """``DDPMPipeline`` with an 8x8, 3-channel ``UNet2DModel`` (block_out_channels (8, 16)).

    Default scheduler: ``DDPMScheduler`` with the google/ddpm-cifar10-32 config (linear betas
    1e-4..0.02, 1000 train steps, epsilon prediction).
    """
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    _seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()
    if scheduler is None:
        scheduler = DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            clip_sample=True,
            variance_type="fixed_small",
            prediction_type="epsilon",
        )
    return _assemble(DDPMPipeline, {"unet": unet, "scheduler": scheduler})


# --------------------------------------------------------------------------------------------
# Stable Diffusion 1.x (txt2img / img2img)
# --------------------------------------------------------------------------------------------


def _default_sd_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(SD_SCHEDULER_CONFIG)


def tiny_sd_components(scheduler=None, seed: int = 0) -> dict:
    """Components dict for ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline``.

    UNet2DConditionModel (block_out_channels (8, 16), cross_attention_dim 32, sample_size 8),
    AutoencoderKL with vae_scale_factor 2 (so height=width=16 px -> 8x8 latents), 2-layer
    ``CLIPTextModel`` (hidden 32) and the tiny ``CLIPTokenizer``.  Default scheduler: ``PNDMScheduler``
    with the SD-1.5 config (scaled_linear 0.00085..0.012, steps_offset=1, "leading",
    set_alpha_to_one=False, skip_prk_steps=True).
    """
    from diffusers import UNet2DConditionModel

    _seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    return {
        "unet": unet,
        "scheduler": scheduler if scheduler is not None else _default_sd_scheduler(),
        "vae": _sd_vae(seed + 1),
        "text_encoder": _clip_text_model(seed + 2),
        "tokenizer": tiny_clip_tokenizer(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_sd_pipeline(scheduler=None, cls=None, seed: int = 0):
    """A tiny ``StableDiffusionPipeline`` (or any SD-1.x pipeline class ``cls`` taking the same components)."""
    from diffusers import StableDiffusionPipeline

    cls = StableDiffusionPipeline if cls is None else cls
    return _assemble(cls, tiny_sd_components(scheduler=scheduler, seed=seed), requires_safety_checker=False)


def tiny_sd_img2img_pipeline(scheduler=None, seed: int = 0):
    """A tiny ``StableDiffusionImg2ImgPipeline`` (same components as :func:`tiny_sd_pipeline`)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    return tiny_sd_pipeline(scheduler=scheduler, cls=StableDiffusionImg2ImgPipeline, seed=seed)


# --------------------------------------------------------------------------------------------
# Stable Diffusion XL
# --------------------------------------------------------------------------------------------


def _default_sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)


def tiny_sdxl_components(scheduler=None, seed: int = 0) -> dict:
    """Components dict for ``StableDiffusionXLPipeline`` (and its img2img / inpaint siblings).

    Two text encoders (``CLIPTextModel`` hidden 32 and ``CLIPTextModelWithProjection`` hidden 32 /
    projection 32) -> cross_attention_dim 64; ``addition_embed_type="text_time"`` with
    ``addition_time_embed_dim=8`` -> ``projection_class_embeddings_input_dim = 6*8 + 32 = 80``.
    VAE scale factor 2, so 16 px -> 8x8 latents.
    """
    from diffusers import UNet2DConditionModel

    _seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=4,
    ).eval()
    return {
        "unet": unet,
        "scheduler": scheduler if scheduler is not None else _default_sdxl_scheduler(),
        "vae": _sd_vae(seed + 1),
        "text_encoder": _clip_text_model(seed + 2),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": _clip_text_model(seed + 3, with_projection=True),
        "tokenizer_2": tiny_clip_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sdxl_pipeline(scheduler=None, cls=None, seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline`` (no watermarker; default scheduler Euler, SDXL config)."""
    from diffusers import StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if cls is None else cls
    return _assemble(cls, tiny_sdxl_components(scheduler=scheduler, seed=seed), add_watermarker=False)


# --------------------------------------------------------------------------------------------
# Flux (flow matching, dynamic shift through ``mu``)
# --------------------------------------------------------------------------------------------


def _default_flow_scheduler(config: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)


def tiny_flux_components(scheduler=None, seed: int = 0) -> dict:
    """Components dict for ``FluxPipeline``.

    ``FluxTransformer2DModel`` (1 double + 1 single block, 2 heads x 16, in_channels 4 = 1 latent
    channel packed 2x2), ``CLIPTextModel`` (hidden 32, pooled 32), ``T5EncoderModel`` (d_model 32),
    VAE with one block (vae_scale_factor 1) and 1 latent channel: 16 px -> 16x16 latents -> 64 packed
    tokens.  Default scheduler: ``FlowMatchEulerDiscreteScheduler`` with the FLUX.1-dev config
    (use_dynamic_shifting=True, base_shift 0.5, max_shift 1.15, base/max_image_seq_len 256/4096).
    """
    from diffusers import FluxTransformer2DModel

    _seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    return {
        "transformer": transformer,
        "scheduler": scheduler if scheduler is not None else _default_flow_scheduler(FLUX_SCHEDULER_CONFIG),
        "vae": _flow_vae(seed + 1, latent_channels=1),
        "text_encoder": _clip_text_model(seed + 2),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": _t5_encoder(seed + 3, d_model=32),
        "tokenizer_2": tiny_t5_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_flux_pipeline(scheduler=None, seed: int = 0):
    """A tiny ``FluxPipeline`` (call it with height=width=16 and max_sequence_length<=48)."""
    from diffusers import FluxPipeline

    return _assemble(FluxPipeline, tiny_flux_components(scheduler=scheduler, seed=seed))


# --------------------------------------------------------------------------------------------
# Stable Diffusion 3 (flow matching, static shift 3.0)
# --------------------------------------------------------------------------------------------


def tiny_sd3_components(scheduler=None, seed: int = 0) -> dict:
    """Components dict for ``StableDiffusion3Pipeline``.

    ``SD3Transformer2DModel`` (1 layer, 4 heads x 8, patch 1), two ``CLIPTextModelWithProjection``
    (hidden 16 each -> 32 concatenated, projection 32 each -> pooled 64), ``T5EncoderModel``
    (d_model 32 = joint_attention_dim), one-block VAE (scale 1, 4 latent channels).  Default
    scheduler: ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (SD3-medium config).
    """
    from diffusers import SD3Transformer2DModel

    _seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    ).eval()
    return {
        "transformer": transformer,
        "scheduler": scheduler if scheduler is not None else _default_flow_scheduler(SD3_SCHEDULER_CONFIG),
        "vae": _flow_vae(seed + 1, latent_channels=4),
        "text_encoder": _clip_text_model(seed + 2, with_projection=True, hidden_size=16),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": _clip_text_model(seed + 3, with_projection=True, hidden_size=16),
        "tokenizer_2": tiny_clip_tokenizer(),
        "text_encoder_3": _t5_encoder(seed + 4, d_model=32),
        "tokenizer_3": tiny_t5_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd3_pipeline(scheduler=None, seed: int = 0):
    """A tiny ``StableDiffusion3Pipeline`` (call it with height=width=16, max_sequence_length<=48)."""
    from diffusers import StableDiffusion3Pipeline

    return _assemble(StableDiffusion3Pipeline, tiny_sd3_components(scheduler=scheduler, seed=seed))
