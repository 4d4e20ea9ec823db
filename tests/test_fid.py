"""The embedded digits benchmark and the sharded, resumable FID pipeline (tiny sample counts; CPU; offline)."""

from __future__ import annotations

import faulthandler
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from fastsampler.eval import fid as fidmod
from fastsampler.eval.digits import (digits_dataset, load_digits_feature_extractor, load_digits_pipeline,
                                     pipeline_dir)
from fastsampler.eval.fid import (DistContext, Extractor, FIDEvaluator, RunSpec, load_reference_images,
                                  resolve_scheduler, run_sweep, sample, shard_path)

torch.set_num_threads(1)
N, SHARD = 24, 8  # three shards
SPECS = [RunSpec("DDIMScheduler", 3, {"timestep_spacing": "trailing"}, seed=0, shard_size=SHARD),
         RunSpec("DDPMScheduler", 3, {"timestep_spacing": "trailing"}, seed=0, shard_size=SHARD)]  # uses generator


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ref_stats")


def test_digits_dataset_split_and_range():
    train, test, everything = digits_dataset("train"), digits_dataset("test"), digits_dataset("all")
    assert train.shape[1:] == (1, 16, 16) and train.dtype == torch.float32
    assert train.shape[0] + test.shape[0] == everything.shape[0] == 1797
    assert -1.0 <= float(everything.min()) and float(everything.max()) <= 1.0
    assert torch.equal(digits_dataset("test"), test)  # fixed split


def test_pipeline_loads_offline_and_generates():
    pipe = load_digits_pipeline()
    assert pipe.unet.config.sample_size == 16 and pipe.unet.config.in_channels == 1
    assert pipe.scheduler.config.num_train_timesteps == 1000
    sched = resolve_scheduler("fastsampler.DPMSolverPlusPlusScheduler", pipe.scheduler.config,
                              {"timestep_spacing": "trailing"})
    x, nfe = sample(pipe.unet, sched, 4, torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert nfe == 4 and x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images  # the stock pipeline call
    assert images.shape == (2, 16, 16, 1)


@pytest.mark.skipif(not (pipeline_dir("v") / "model_index.json").is_file(), reason="v-prediction asset not trained")
def test_v_prediction_variant_loads():
    pipe = load_digits_pipeline("v")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    sched = resolve_scheduler("fastsampler.UniPCScheduler", pipe.scheduler.config, {"timestep_spacing": "trailing"})
    x, _ = sample(pipe.unet, sched, 3, torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(x).all()


def test_scheduler_resolution():
    assert resolve_scheduler("DDIMScheduler", {}).__class__.__name__ == "DDIMScheduler"
    assert resolve_scheduler("fastsampler.UniPCScheduler", {}).__class__.__name__ == "UniPCScheduler"
    with pytest.raises(ValueError, match="no attribute"):
        resolve_scheduler("NoSuchScheduler", {})


def test_feature_extractor_follows_torchmetrics_conventions():
    from torchmetrics.image.fid import FrechetInceptionDistance

    ext = load_digits_feature_extractor()
    assert ext.num_features == 64
    u8 = load_reference_images("digits-test")[:40]
    f_float = ext(u8.float() / 255.0)  # what FID passes with normalize=True: the float images, unchanged
    assert f_float.shape == (40, 64)
    torch.testing.assert_close(ext(u8), f_float)
    torch.testing.assert_close(ext(u8.expand(-1, 3, -1, -1).float() / 255.0), f_float)  # RGB → grey
    metric = FrechetInceptionDistance(feature=ext, normalize=True)
    metric.update(u8.float() / 255.0, real=True)
    metric.update(u8.float() / 255.0, real=False)
    assert abs(float(metric.compute())) < 1e-4


def test_fid_reference_against_itself_is_zero_and_noise_is_large(ref_cache):
    evaluator = FIDEvaluator(Extractor.create("digits"), "digits-train", ref_cache)
    reference = load_reference_images("digits-train")
    assert evaluator.reference_count == reference.shape[0]
    assert abs(evaluator([reference[:700], reference[700:]])) < 1e-6
    noise = torch.randint(0, 256, (500, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert evaluator([noise]) > 20 * evaluator([load_reference_images("digits-test")])
    cached = list(ref_cache.glob("refstats_digits_*.safetensors"))
    assert len(cached) == 1
    again = FIDEvaluator(Extractor.create("digits"), "digits-train", ref_cache)  # loads from the cache
    torch.testing.assert_close(again.metric.real_features_cov_sum, evaluator.metric.real_features_cov_sum)


def test_inception_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        Extractor.create("inception")
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        Extractor.create("inception", tmp_path / "missing.pth")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, cache: str) -> None:
    faulthandler.dump_traceback_later(240, exit=True)  # a collective that never completes fails, not hangs
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ctx = fidmod.distributed_context()
    try:
        rows = run_sweep(SPECS, N, out_dir, cache_dir=cache, progress=False, ctx=ctx)
        if ctx.is_main:
            Path(out_dir, "rows.json").write_text(json.dumps([r.__dict__ for r in rows]))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path, ref_cache):
    two, one = tmp_path / "two", tmp_path / "one"
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(two), str(ref_cache)), nprocs=2, join=True)
    rows_two = json.loads((two / "rows.json").read_text())
    rows_one = run_sweep(SPECS, N, one, cache_dir=ref_cache, progress=False, ctx=DistContext())
    assert [r["fid"] for r in rows_two] == [r.fid for r in rows_one]
    for row in rows_one:
        run_dir = Path(row.run_dir)
        for i in range(3):
            a = fidmod.read_shard(shard_path(run_dir, i))[0]
            b = fidmod.read_shard(shard_path(two / run_dir.name, i))[0]
            assert torch.equal(a, b), (row.scheduler, i)
    assert [r["shards_generated"] for r in rows_two] == [3, 3]


def test_interrupted_run_resumes_only_missing_shards(tmp_path, ref_cache):
    spec = SPECS[:1]
    first = run_sweep(spec, N, tmp_path, cache_dir=ref_cache, progress=False, ctx=DistContext())[0]
    run_dir = Path(first.run_dir)
    mtimes = {i: shard_path(run_dir, i).stat().st_mtime_ns for i in range(3)}
    shard_path(run_dir, 1).unlink()                     # "interrupted" before shard 1 was written
    shard_path(run_dir, 2).write_bytes(b"truncated")     # or while shard 2 was being written
    second = run_sweep(spec, N, tmp_path, cache_dir=ref_cache, progress=False, ctx=DistContext())[0]
    assert (second.shards_generated, second.shards_reused) == (2, 1)
    assert shard_path(run_dir, 0).stat().st_mtime_ns == mtimes[0]
    assert shard_path(run_dir, 1).is_file() and shard_path(run_dir, 2).stat().st_mtime_ns != mtimes[2]
    assert second.fid == first.fid
    third = run_sweep(spec, N, tmp_path, cache_dir=ref_cache, progress=False, ctx=DistContext())[0]
    assert (third.shards_generated, third.shards_reused) == (0, 3)


def test_cli_writes_json_and_plot(tmp_path, ref_cache):
    from click.testing import CliRunner

    from fastsampler.eval.fid_cli import fid

    result = CliRunner().invoke(fid, ["--scheduler", "DDIMScheduler", "--scheduler",
                                      "DPMSolverMultistepScheduler:solver_order=2", "--steps", "2,3", "-n", "16",
                                      "--shard-size", "8", "--out", str(tmp_path), "--cache-dir", str(ref_cache),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "fid_results.json").read_text())
    assert [(r["scheduler"], r["nfe"]) for r in payload["results"]] == [
        ("DDIMScheduler", 2), ("DDIMScheduler", 3), ("DPMSolverMultistepScheduler", 2),
        ("DPMSolverMultistepScheduler", 3)]
    assert payload["results"][2]["scheduler_kwargs"] == {"timestep_spacing": "trailing", "solver_order": 2}
    assert (tmp_path / "fid_results.png").stat().st_size > 0
    bad = CliRunner().invoke(fid, ["--features", "inception", "-n", "4", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "--inception-weights" in bad.output
