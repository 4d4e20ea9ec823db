"""Warnings point at the user's line, are not shown where nothing is wrong, and are shown where a user would
otherwise silently get a fallback."""

from __future__ import annotations

import warnings

import pytest

import fastsampler
from fastsampler import S3Scheduler, UniPCScheduler
from fastsampler.adapters.scheduler import UntunedStepsWarning


def test_the_shipped_files_load_into_the_embedded_pipeline_without_warnings(monkeypatch):
    """The embedded pipeline's config (trailing spacing) is the one the shipped DC ratios and S³ plans were fitted
    for; a UniPC scheduler that reads an S³ folder takes its plans without diffusers' "will be ignored"."""
    from diffusers import DDPMPipeline
    from diffusers.configuration_utils import logger

    logged = []
    monkeypatch.setattr(logger, "warning", lambda message, *args: logged.append(message % args if args else message))
    pipe = DDPMPipeline.from_pretrained(fastsampler.assets("digits"))
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = UniPCScheduler.from_config(pipe.scheduler.config, dc_ratios_file=fastsampler.assets("digits-dc-ratios"))
        s.set_timesteps(5)
        searched = UniPCScheduler.from_pretrained(fastsampler.assets("digits-s3"))
        searched.set_timesteps(5)
    assert logged == []
    reference = S3Scheduler.from_pretrained(fastsampler.assets("digits-s3"))
    reference.set_timesteps(5)
    assert searched.plan.fingerprint() == reference.plan.fingerprint()


def test_a_mismatch_warning_names_the_callers_line():
    s = UniPCScheduler.from_config(UniPCScheduler.from_pretrained(fastsampler.assets("digits-s3")).config,
                                   dc_ratios_file=fastsampler.assets("digits-dc-ratios"), timestep_spacing="leading")
    with pytest.warns(UserWarning, match="fitted for another configuration") as caught:
        s.set_timesteps(5)
    assert caught[0].filename == __file__


@pytest.mark.parametrize("cls", [S3Scheduler, UniPCScheduler])
def test_a_step_count_without_a_tuned_plan_warns_at_the_caller(cls):
    s = cls.from_pretrained(fastsampler.assets("digits-s3"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.set_timesteps(5)  # tuned: no warning
    with pytest.warns(UntunedStepsWarning, match=r"no tuned plan for 7 steps \(tuned: 4, 5, 6, 8, 10\)") as caught:
        s.set_timesteps(7)
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.set_timesteps(timesteps=[999, 500, 100])  # asked for its own grid: nothing to fall back from
        UniPCScheduler.from_config(s.config).set_timesteps(7)  # no plans at all: nothing tuned, nothing missing


def test_inside_a_pipeline_the_warning_names_the_pipeline_call():
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(fastsampler.assets("digits"))
    pipe.scheduler = UniPCScheduler.from_pretrained(fastsampler.assets("digits-s3"))
    with pytest.warns(UntunedStepsWarning) as caught:
        pipe(batch_size=1, num_inference_steps=3, output_type="np")
    assert caught[0].filename == __file__
