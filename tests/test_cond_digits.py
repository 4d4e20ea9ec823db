"""The class-conditional digits model (classifier-free guidance) and ``DigitsConditionalPipeline``.

Asset: ``fastsampler/assets/digits_cond_ddpm`` (``benchmarks/train_digits_cond_ddpm.py``). Checks: it loads offline
(also through diffusers' generic loader); the pipeline runs diffusers' and fastsampler's schedulers; w = 1 is the
conditional model alone; the guided output is ε_∅ + w (ε_c − ε_∅); guided samples are recognisably the requested
digits (the trained digits classifier agrees with the requested label for ≥ 90 % of them).
"""

from collections import Counter

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UniPCMultistepScheduler

import fastsampler
from fastsampler.models import digits
from fastsampler.models.digits_pipeline import DigitsConditionalPipeline

LABELS = [0, 3, 7]


@pytest.fixture(scope="module")
def pipe():
    return digits.load_digits_cond_pipeline()


def _with(pipe, scheduler) -> DigitsConditionalPipeline:
    p = DigitsConditionalPipeline(unet=pipe.unet, scheduler=scheduler)
    p.set_progress_bar_config(disable=True)
    return p


def _noise(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_asset_loads_offline(pipe):
    assert isinstance(pipe, DigitsConditionalPipeline)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.unet.config.num_class_embeds == digits.NUM_CLASS_EMBEDS == 11
    assert pipe.null_class_label == digits.NULL_LABEL == 10
    generic = DiffusionPipeline.from_pretrained(str(digits.assets_dir() / digits.COND_PIPELINE_DIR),
                                                local_files_only=True)
    assert type(generic) is DigitsConditionalPipeline


def test_missing_asset_names_training_script(monkeypatch, tmp_path):
    monkeypatch.setattr(digits, "assets_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="train_digits_cond_ddpm.py"):
        digits.load_digits_cond_pipeline()


@pytest.mark.parametrize("make", [
    lambda cfg: DDIMScheduler.from_config(cfg),
    lambda cfg: UniPCMultistepScheduler.from_config(cfg),      # step() takes no generator
    lambda cfg: DDPMScheduler.from_config(cfg),                # stochastic step(generator=...)
    lambda cfg: fastsampler.UniPCScheduler.from_config(cfg),
], ids=["DDIM", "diffusers-UniPC", "DDPM", "fastsampler-UniPC"])
def test_runs_any_scheduler(pipe, make):
    p = _with(pipe, make(pipe.scheduler.config))
    run = lambda: p(LABELS, guidance_scale=2.0, num_inference_steps=4,  # noqa: E731
                    generator=torch.Generator().manual_seed(0)).images
    out = run()
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()
    assert out.min() >= -1.0 and out.max() <= 1.0 and out.std() > 0.1
    torch.testing.assert_close(run(), out, rtol=0, atol=0)  # the generator drives noise and stochastic steps


def test_output_types_and_latents(pipe):
    p = _with(pipe, DDIMScheduler.from_config(pipe.scheduler.config))
    lat = _noise(2)
    pt = p(5, latents=lat, num_inference_steps=3).images
    assert pt.shape == (2, 1, 16, 16)
    np_img, = p(5, latents=lat, num_inference_steps=3, output_type="np", return_dict=False)
    assert np_img.shape == (2, 16, 16, 1)
    torch.testing.assert_close(torch.from_numpy(np_img).permute(0, 3, 1, 2), pt / 2 + 0.5)
    with pytest.raises(ValueError, match="class labels"):
        p([3, 11], num_inference_steps=2)
    with pytest.raises(ValueError):
        p([1, 2, 3], latents=lat, num_inference_steps=2)


@torch.no_grad()
def test_guidance_one_is_the_conditional_model(pipe):
    x, t, labels = _noise(3), torch.tensor(600), torch.tensor(LABELS)
    eps_c = pipe.unet(x, t, class_labels=labels).sample
    torch.testing.assert_close(pipe.guided_model_output(x, t, labels, 1.0), eps_c, rtol=0, atol=0)

    # the whole loop at w = 1, against DDIM run by hand on the conditional network
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    out = _with(pipe, sched)(LABELS, guidance_scale=1.0, num_inference_steps=5, latents=x).images
    sched.set_timesteps(5)
    y = x.clone()
    for t in sched.timesteps:
        y = sched.step(pipe.unet(y, t, class_labels=labels).sample, t, y).prev_sample
    torch.testing.assert_close(out, y.clamp(-1, 1), rtol=0, atol=0)


@torch.no_grad()
def test_guided_output_is_cfg_formula(pipe):
    x, labels, w = _noise(3, seed=1), torch.tensor(LABELS), 3.0
    null = torch.full_like(labels, 10)
    for t in (torch.tensor(900), torch.tensor([100, 500, 900])):
        eps_c = pipe.unet(x, t, class_labels=labels).sample
        eps_u = pipe.unet(x, t, class_labels=null).sample
        torch.testing.assert_close(pipe.guided_model_output(x, t, labels, w), eps_u + w * (eps_c - eps_u),
                                   rtol=1e-4, atol=1e-5)
    assert (eps_c - eps_u).abs().mean() > 1e-3  # the label matters

    # the whole loop at w = 3, against DDIM run by hand with the hand-made guided ε
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    out = _with(pipe, sched)(LABELS, guidance_scale=w, num_inference_steps=4, latents=x).images
    sched.set_timesteps(4)
    y = x.clone()
    for t in sched.timesteps:
        eps_c, eps_u = pipe.unet(y, t, class_labels=labels).sample, pipe.unet(y, t, class_labels=null).sample
        y = sched.step(eps_u + w * (eps_c - eps_u), t, y).prev_sample
    torch.testing.assert_close(out, y.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_guided_samples_are_the_requested_digits(pipe):
    """100 samples (10 per class), w = 2, 25 DDIM steps: the digits classifier agrees with ≥ 90 %."""
    p = _with(pipe, DDIMScheduler.from_config(pipe.scheduler.config))
    acc, labels, pred = digits.conditional_class_accuracy(p, guidance_scale=2.0, num_inference_steps=25,
                                                          num_samples=100, seed=0)
    confusions = Counter((int(a), int(b)) for a, b in zip(labels, pred) if a != b)
    assert acc >= 0.9, f"class accuracy {acc:.2f}; (requested, classified): count {dict(confusions)}"
