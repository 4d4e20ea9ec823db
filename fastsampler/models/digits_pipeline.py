"""``DigitsConditionalPipeline``: class-conditional sampling with classifier-free guidance, for any scheduler.

The network is a class-conditional ``UNet2DModel`` (diffusers' ``num_class_embeds``) whose *last* class index is
the null ("unconditional") label — for the embedded digits model (``fastsampler/assets/digits_cond_ddpm``, trained
by ``benchmarks/train_digits_cond_ddpm.py``) labels 0..9 are the digits and 10 is the null label.

Guidance: with scale ``w`` the denoiser output is ``ε_∅ + w (ε_c − ε_∅)`` (``w = 1``: the conditional model alone,
one network call; ``w = 0``: the unconditional model), both halves evaluated in one batch ``[cond; null]``.

The loop follows the diffusers scheduler contract only, so diffusers' schedulers and fastsampler's work alike:
``set_timesteps(n, device=...)``, ``x = latents · init_noise_sigma``, ``scale_model_input``, and
``step(out, t, x, return_dict=False)``, with ``generator=`` passed only when ``step`` accepts it.

Loading: ``DigitsConditionalPipeline.from_pretrained(folder)`` always works. ``model_index.json`` names this module
under ``"_module"``; importing the module also makes the class visible to diffusers' generic loader, so
``DiffusionPipeline.from_pretrained(folder)`` resolves it after ``import fastsampler.models.digits_pipeline``
(diffusers looks a pipeline's ``_class_name`` up in its own namespace only).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

DEFAULT_GUIDANCE_SCALE = 2.0
DEFAULT_NUM_INFERENCE_STEPS = 50

Labels = int | Sequence[int] | np.ndarray | torch.Tensor


class DigitsConditionalPipeline(DiffusionPipeline):
    """Class-conditional image generation with classifier-free guidance (``unet`` + any diffusers-contract scheduler).

    ``unet``: a ``UNet2DModel`` with ``num_class_embeds = K + 1`` (K classes, then the null label ``K``), predicting
    whatever the scheduler's ``prediction_type`` says (ε for the digits model). ``scheduler``: any scheduler.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler) -> None:
        super().__init__()
        if getattr(unet.config, "num_class_embeds", None) is None:
            raise ValueError("DigitsConditionalPipeline needs a class-conditional UNet (config.num_class_embeds)")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(_module=__name__)

    @property
    def null_class_label(self) -> int:
        """The unconditional label: the last class index (``unet.config.num_class_embeds − 1``)."""
        return int(self.unet.config.num_class_embeds) - 1

    def class_label_tensor(self, class_labels: Labels, batch_size: int | None = None) -> torch.Tensor:
        """``class_labels`` as an int64 tensor (B,) on the pipeline's device, range-checked.

        A single int becomes a batch of ``batch_size`` (default 1) copies; otherwise the labels fix the batch size
        and ``batch_size``, if given, must agree. The null label is allowed (unconditional samples).
        """
        labels = torch.as_tensor(class_labels, dtype=torch.int64)
        if labels.dim() == 0:
            labels = labels.repeat(batch_size or 1)
        elif labels.dim() != 1:
            raise ValueError(f"class_labels must be an int or a 1-D sequence, got shape {tuple(labels.shape)}")
        if batch_size is not None and labels.shape[0] != batch_size:
            raise ValueError(f"{labels.shape[0]} class labels for a batch of {batch_size}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_class_label):
            raise ValueError(f"class labels must lie in 0..{self.null_class_label} ({self.null_class_label} = "
                             f"unconditional), got {labels.tolist()}")
        return labels.to(self.unet.device)

    def guided_model_output(self, x: torch.Tensor, t: int | float | torch.Tensor, class_labels: Labels,
                            guidance_scale: float = DEFAULT_GUIDANCE_SCALE) -> torch.Tensor:
        """The guided network output at (``x``, ``t``): ``out_∅ + w (out_c − out_∅)``; ``w = 1`` → ``out_c``.

        ``x`` is the (already ``scale_model_input``-ed) model input (B, C, H, W); ``t`` a scalar or a (B,) tensor of
        timesteps; ``class_labels`` an int (broadcast) or B labels. For ``w ≠ 1`` the network runs once on the
        batch ``[x; x]`` with labels ``[c; ∅]``. Runs under the caller's grad mode.
        """
        labels = self.class_label_tensor(class_labels, x.shape[0])
        x = x.to(device=self.unet.device, dtype=self.unet.dtype)
        t = torch.as_tensor(t, device=x.device)
        if guidance_scale == 1.0:
            return self.unet(x, t, class_labels=labels).sample
        if t.dim() == 1 and t.shape[0] == x.shape[0]:
            t = torch.cat([t, t])
        null = torch.full_like(labels, self.null_class_label)
        out = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
        out_c, out_u = out.chunk(2)
        return out_u + guidance_scale * (out_c - out_u)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Labels,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per class label.

        Args:
            class_labels: an int, a sequence or a (B,) tensor of labels (0..K−1, or K = ``null_class_label`` for an
                unconditional sample). With ``latents`` an int label is repeated over the latents' batch.
            guidance_scale: classifier-free guidance scale ``w`` (1: conditional model only, one network call per
                step; otherwise two, batched).
            num_inference_steps: passed to ``scheduler.set_timesteps``.
            generator: for the initial noise and, when ``scheduler.step`` accepts one, for stochastic steps.
            latents: unit-variance initial noise (B, C, H, W); it is multiplied by ``scheduler.init_noise_sigma``.
            output_type: ``"pt"`` — a (B, C, H, W) float tensor in [−1, 1] (the project's sample convention, see
                ``fastsampler.eval.fid.sample`` / ``to_uint8``); ``"np"`` — a (B, H, W, C) float32 array in [0, 1]
                (diffusers' image convention, as ``DDPMPipeline``); ``"pil"`` — a list of PIL images.
            return_dict: return an ``ImagePipelineOutput`` (else the tuple ``(images,)``).
        """
        if output_type not in ("pt", "np", "pil"):
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")
        unet, scheduler = self.unet, self.scheduler
        device = unet.device
        labels = self.class_label_tensor(class_labels, None if latents is None else latents.shape[0])
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (labels.shape[0], unet.config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        scheduler.set_timesteps(num_inference_steps, device=device)
        x = latents.to(device=device, dtype=unet.dtype) * scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for t in self.progress_bar(scheduler.timesteps):
            out = self.guided_model_output(scheduler.scale_model_input(x, t), t, labels, guidance_scale)
            x = scheduler.step(out, t, x, return_dict=False, **step_kwargs)[0]
        images = x.clamp(-1.0, 1.0)
        if output_type != "pt":
            images = (images / 2 + 0.5).cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


# diffusers' generic ``DiffusionPipeline.from_pretrained`` resolves ``model_index.json``'s ``_class_name`` with
# ``getattr(diffusers, name)``; ``import fastsampler`` already answers that name lazily (``fastsampler.lazy``), and
# importing this module directly sets it for good (the module name is recorded under ``_module``).
if DigitsConditionalPipeline.__name__ not in vars(diffusers):
    setattr(diffusers, DigitsConditionalPipeline.__name__, DigitsConditionalPipeline)
