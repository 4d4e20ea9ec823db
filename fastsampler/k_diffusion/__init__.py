"""fastsampler for k-diffusion, ComfyUI and A1111: sampler functions with k-diffusion's signature on our plan
engine (``sampling``) and noise-level sequences as tensors (``sigmas``). See the README section "Use it from
k-diffusion / ComfyUI"."""

from fastsampler.k_diffusion.denoiser import DiffusersDenoiser
from fastsampler.k_diffusion.sampling import (check_sigmas, sample_dc, sample_deis, sample_dpmpp_2m,
                                              sample_diffusers, sample_dpmpp_2m_sde, sample_dpmpp_2s, sample_dpmpp_3m,
                                              sample_dpmpp_3m_sde, sample_euler, sample_pretrained,
                                              sample_scheduler, sample_unipc, sample_unipc_bh2, scheduler_for)
from fastsampler.k_diffusion.sigmas import (get_sigmas_ays, get_sigmas_beta, get_sigmas_exponential,
                                            get_sigmas_karras, get_sigmas_kl_optimal, get_sigmas_polyexponential,
                                            get_sigmas_pretrained, get_sigmas_scheduler, load_scheduler)

__all__ = ["DiffusersDenoiser", "check_sigmas", "sample_dc", "sample_deis", "sample_diffusers", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_2s", "sample_dpmpp_3m", "sample_dpmpp_3m_sde",
           "sample_euler", "sample_pretrained", "sample_scheduler", "sample_unipc", "sample_unipc_bh2",
           "scheduler_for", "get_sigmas_ays", "get_sigmas_beta", "get_sigmas_exponential", "get_sigmas_karras",
           "get_sigmas_kl_optimal", "get_sigmas_polyexponential", "get_sigmas_pretrained", "get_sigmas_scheduler",
           "load_scheduler"]
