"""Plans that travel with a scheduler: set_plan checks, plans per step count, scheduler and pipeline folders."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsampler import DPMSolverPlusPlusScheduler, Plan, UniPCScheduler
from fastsampler.adapters.plan_store import PLANS_FILE
from fastsampler.adapters.scheduler import UntunedStepsWarning
from parity_util import index_model, run_loop

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
DATA = Path(__file__).parent / "data"


@pytest.fixture
def sample() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def loop_current(s, x: torch.Tensor) -> torch.Tensor:
    for i, t in enumerate(s.timesteps):
        x = s.step(index_model(x, i), t, x).prev_sample
    return x


def save_other_plan(folder: Path, sample: torch.Tensor) -> tuple[UniPCScheduler, torch.Tensor]:
    """A default UniPC holding the 6-step plan of another configuration, saved and loaded back; and what that
    configuration samples."""
    other = UniPCScheduler(**SD, solver_type="bh1", solver_order=3, use_karras_sigmas=True)
    expected = run_loop(other, 6, sample)
    s = UniPCScheduler(**SD)
    s.set_plan(other.plan)
    s.save_pretrained(folder)
    assert (folder / PLANS_FILE).is_file()
    return UniPCScheduler.from_pretrained(folder), expected


def test_set_plan_save_load_reproduces_the_other_scheduler(tmp_path, sample):
    """The issue's example: a plan from another configuration, saved with a scheduler and loaded back."""
    loaded, expected = save_other_plan(tmp_path, sample)
    loaded.set_timesteps(6)
    torch.testing.assert_close(loop_current(loaded, sample), expected, rtol=0, atol=0)
    # other step counts still come from the config (saying so), and a removed plan falls back to it too
    with pytest.warns(UntunedStepsWarning, match="no tuned plan for 7 steps"):
        untuned = run_loop(loaded, 7, sample)
    torch.testing.assert_close(untuned, run_loop(UniPCScheduler(**SD), 7, sample), rtol=0, atol=0)
    loaded.remove_plan(6)
    torch.testing.assert_close(run_loop(loaded, 6, sample), run_loop(UniPCScheduler(**SD), 6, sample), rtol=0, atol=0)
    assert set(UniPCScheduler.from_pretrained(tmp_path).plans) == {6}


def test_plans_survive_a_pipeline_folder(tmp_path):
    pytest.importorskip("transformers")
    from diffusers import DiffusionPipeline

    import tiny_pipelines as tp

    other = UniPCScheduler(solver_order=3, use_karras_sigmas=True)
    other.set_timesteps(5)
    pipe = tp.tiny_ddpm_pipeline(UniPCScheduler())
    pipe.scheduler.set_plan(other.plan)
    pipe.save_pretrained(tmp_path)
    back = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(back.scheduler).__name__ == "UniPCScheduler" and set(back.scheduler.plans) == {5}
    a = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = back(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(a, b)
    back.scheduler.set_timesteps(5)
    np.testing.assert_array_equal(back.scheduler.timesteps.numpy(), other.timesteps.numpy())


@pytest.mark.parametrize("other,match", [
    (dict(), "another noise schedule"),  # DDPM's linear betas into an SD scheduler
    (dict(**SD, prediction_type="v_prediction"), "prediction_type"),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), "flow"),
    (dict(**SD, rescale_betas_zero_snr=True), "another noise schedule"),
])
def test_set_plan_refuses_a_plan_for_another_model(other, match):
    source = UniPCScheduler(**other)
    source.set_timesteps(5)
    with pytest.raises(ValueError, match=match):
        UniPCScheduler(**SD).set_plan(source.plan)


def test_set_plan_refuses_plans_without_prediction_type_and_non_plans():
    source = UniPCScheduler(**SD)
    source.set_timesteps(5)
    payload = source.plan.to_dict()
    del payload["meta"]["prediction_type"]
    with pytest.raises(ValueError, match="prediction_type"):
        UniPCScheduler(**SD).set_plan(Plan.from_dict(payload))
    with pytest.raises(TypeError, match="Plan"):
        UniPCScheduler(**SD).set_plan(payload)


def test_set_plan_refuses_unusable_coefficients():
    source = UniPCScheduler(**SD)
    source.set_timesteps(5)
    payload = source.plan.to_dict()
    payload["coef"][1][2][1][0] = 1e9
    with pytest.raises(ValueError, match="coefficients up to"):
        UniPCScheduler(**SD).set_plan(Plan.from_dict(payload))
    payload["coef"][1][2][1][0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        Plan.from_dict(payload)


def test_a_loaded_plan_passes_the_bounds_check_of_built_ones(tmp_path):
    """A plans file edited to hold a 1e30 coefficient is refused on load with set_plan's message (it sampled to
    2.8e30 before), naming the file and the plan; the untouched file loads."""
    s = UniPCScheduler(**SD)
    s.set_timesteps(5)
    s.set_plan(s.plan)
    s.save_pretrained(tmp_path)
    UniPCScheduler.from_pretrained(tmp_path)
    payload = json.loads((tmp_path / PLANS_FILE).read_text())
    payload["plans"][0]["coef"][1][2][1][0] = 1e30
    (tmp_path / PLANS_FILE).write_text(json.dumps(payload))
    with pytest.raises(ValueError) as built:
        UniPCScheduler(**SD).set_plan(Plan.from_dict(payload["plans"][0]))
    with pytest.raises(ValueError) as loaded:
        UniPCScheduler.from_pretrained(tmp_path)
    assert "coefficients up to 1e+30" in str(built.value)
    assert str(loaded.value) == f"{tmp_path / PLANS_FILE} (plan for 5 steps): {built.value}"


def test_version_1_plan_files_still_load(sample):
    """A plan saved by fastsampler 0.1 (format 1, one register) runs exactly as today's plan for that config."""
    plan = Plan.from_json((DATA / "plan_v1_unipc3_sd_7steps.json").read_text())
    assert plan.registers == ("saved",) and plan.num_steps == 7
    s = UniPCScheduler(**SD, solver_order=3)
    with pytest.warns(UserWarning, match="version-1"):
        s.set_plan(plan)
    expected = run_loop(UniPCScheduler(**SD, solver_order=3), 7, sample)
    torch.testing.assert_close(loop_current(s, sample), expected, rtol=1e-6, atol=1e-6)


def test_dynamic_shift_plans_are_tied_to_mu():
    flux = dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True)
    source = DPMSolverPlusPlusScheduler(**flux)
    source.set_timesteps(6, mu=0.8)
    s = DPMSolverPlusPlusScheduler(**flux)
    s.set_plan(source.plan)
    s.set_timesteps(6, mu=0.8)
    np.testing.assert_array_equal(s.timesteps.numpy(), source.timesteps.numpy())
    with pytest.raises(ValueError, match="mu=0.8"):
        s.set_timesteps(6, mu=1.1)


def test_plans_file_is_plain_versioned_json(tmp_path):
    s = UniPCScheduler(**SD)
    s.set_timesteps(4)
    s.set_plan(s.plan)
    s.save_pretrained(tmp_path)
    payload = json.loads((tmp_path / PLANS_FILE).read_text())
    assert payload["format"] == "fastsampler-plans/1" and payload["plans"][0]["format"] == "fastsampler-plan/2"
    meta = payload["plans"][0]["meta"]
    assert meta["builder"] == "UniPC" and meta["options"]["order"] == 2 and meta["schedule"]["kind"] == "discrete"
    s.remove_plan(4)
    s.save_pretrained(tmp_path)  # a stale plans file is removed
    assert not (tmp_path / PLANS_FILE).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UniPCScheduler.from_pretrained(tmp_path)


def test_a_scheduler_with_installed_plans_copies_and_its_copy_runs_them(tmp_path, sample):
    """copy.deepcopy (diffusers' from_config paths, FID's plan fingerprint) must work on a tuned scheduler."""
    import copy

    from fastsampler.eval.fid import scheduler_fingerprint

    loaded, expected = save_other_plan(tmp_path, sample)
    twin = copy.deepcopy(loaded)
    assert twin.plans[6] is loaded.plans[6]  # immutable: shared, not copied
    torch.testing.assert_close(run_loop(twin, 6, sample), expected, rtol=0, atol=0)
    assert scheduler_fingerprint(loaded, 6) != scheduler_fingerprint(UniPCScheduler(**SD), 6)
