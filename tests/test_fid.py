"""The embedded digits benchmark and the sharded, resumable FID pipeline (tiny sample counts; CPU; offline)."""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch

from fastsampler.eval import fid as fidmod
from fastsampler.models.digits import (digits_dataset, load_digits_feature_extractor, load_digits_pipeline,
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


def _worker(rank: int, world: int, port: int, out_dir: str, cache: str, specs: list[RunSpec] = SPECS,
            pipeline: str | None = None) -> None:
    faulthandler.dump_traceback_later(240, exit=True)  # a collective that never completes fails, not hangs
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ctx = fidmod.distributed_context()
    try:
        rows = run_sweep(specs, N, out_dir, pipeline, cache_dir=cache, progress=False, ctx=ctx)
        if ctx.is_main:
            Path(out_dir, "rows.json").write_text(json.dumps([r.__dict__ for r in rows]))
    finally:
        torch.distributed.destroy_process_group()


def _assert_two_processes_equal_one(tmp_path: Path, ref_cache: Path, specs: list[RunSpec],
                                    pipeline: str | None = None) -> list[dict[str, str]]:
    """Run ``specs`` with 2 gloo processes and with 1; the FIDs and every shard's bytes and metadata must agree.
    Returns the metadata of every shard of the one-process run, run by run, in shard order."""
    two, one = tmp_path / "two", tmp_path / "one"
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(two), str(ref_cache), specs, pipeline), nprocs=2,
                                join=True)
    rows_two = json.loads((two / "rows.json").read_text())
    rows_one = run_sweep(specs, N, one, pipeline, cache_dir=ref_cache, progress=False, ctx=DistContext())
    assert [r["fid"] for r in rows_two] == [r.fid for r in rows_one]
    metas = []
    for row in rows_one:
        run_dir = Path(row.run_dir)
        for i in range(3):
            a, meta_a = fidmod.read_shard(shard_path(run_dir, i))
            b, meta_b = fidmod.read_shard(shard_path(two / run_dir.name, i))
            assert torch.equal(a, b) and meta_a == meta_b, (row.scheduler, i)
            metas.append(meta_a)
    assert [r["shards_generated"] for r in rows_two] == [3] * len(specs)
    return metas


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, ref_cache):
    _assert_two_processes_equal_one(tmp_path, ref_cache, SPECS)


def test_interrupted_run_resumes_only_missing_shards(tmp_path, ref_cache):
    spec = SPECS[:1]
    first = run_sweep(spec, N, tmp_path, cache_dir=ref_cache, progress=False, ctx=DistContext())[0]
    run_dir = Path(first.run_dir)
    mtimes = {i: shard_path(run_dir, i).stat().st_mtime_ns for i in range(3)}
    shard_path(run_dir, 1).unlink()                     # "interrupted" before shard 1 was written
    shard_path(run_dir, 2).write_bytes(b"truncated")     # or while shard 2 was being written
    with pytest.warns(RuntimeWarning, match=r"shard_00002\.safetensors cannot be reused.*unreadable"):
        second = run_sweep(spec, N, tmp_path, cache_dir=ref_cache, progress=False, ctx=DistContext())[0]
    assert (second.shards_generated, second.shards_reused) == (2, 1)
    assert shard_path(run_dir, 0).stat().st_mtime_ns == mtimes[0]
    assert shard_path(run_dir, 1).is_file() and shard_path(run_dir, 2).stat().st_mtime_ns != mtimes[2]
    assert second.fid == first.fid
    third = run_sweep(spec, N, tmp_path, cache_dir=ref_cache, progress=False, ctx=DistContext())[0]
    assert (third.shards_generated, third.shards_reused) == (0, 3)


def test_cli_writes_json_and_plot(tmp_path, ref_cache):
    from click.testing import CliRunner

    from fastsampler.cli.fid import fid

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


def _flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_resume_regenerates_shards_whose_checksum_or_metadata_do_not_match(tmp_path, ref_cache):
    """A shard with the right image count is still regenerated when its bytes or its provenance are wrong."""
    from safetensors.torch import save_file

    spec, n = SPECS[:1], 4 * SHARD
    first = run_sweep(spec, n, tmp_path, cache_dir=ref_cache, progress=False, ctx=DistContext())[0]
    run_dir = Path(first.run_dir)
    paths = [shard_path(run_dir, i) for i in range(4)]
    shards = [(images.clone(), meta) for images, meta in map(fidmod.read_shard, paths)]  # not the mmapped files
    _flip_byte(paths[0], -1)  # bit rot in the image bytes (they are at the end of the file)
    save_file({"images": shards[2][0]}, str(paths[1]), metadata=shards[1][1])  # another tensor, same length
    config = json.loads(shards[2][1]["scheduler_config"])
    foreign = {**shards[2][1], "steps": "4", "scheduler_config": json.dumps({**config, "timestep_spacing": "leading"},
                                                                            sort_keys=True)}
    fidmod._write_shard(paths[2], shards[2][0], foreign)  # a consistent shard of another configuration
    save_file({"images": shards[3][0]}, str(paths[3]), metadata={"shard": "3", "nfe": "3"})  # old format
    with pytest.warns(RuntimeWarning) as caught:
        second = run_sweep(spec, n, tmp_path, cache_dir=ref_cache, progress=False, ctx=DistContext())[0]
    messages = [str(w.message) for w in caught if "cannot be reused" in str(w.message)]
    expected = {0: "checksum mismatch", 1: "checksum mismatch", 3: "no checksum",
                2: "metadata differs: scheduler_config: timestep_spacing stored 'leading', expected 'trailing'; "
                   "steps: stored '4', expected '3'"}
    assert len(messages) == 4, messages
    for i, reason in expected.items():
        assert any(str(paths[i]) in m and reason in m for m in messages), (i, messages)
    assert (second.shards_generated, second.shards_reused) == (4, 0)
    assert second.fid == first.fid
    for path, (images, _) in zip(paths, shards):
        assert torch.equal(fidmod.read_shard(path)[0], images)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        third = run_sweep(spec, n, tmp_path, cache_dir=ref_cache, progress=False, ctx=DistContext())[0]
    assert (third.shards_generated, third.shards_reused) == (0, 4) and third.fid == first.fid


def test_shards_record_checksum_and_everything_the_images_depend_on(tmp_path):
    pipe = load_digits_pipeline()
    spec = RunSpec("DDIMScheduler", 2, {"timestep_spacing": "trailing"}, seed=5, shard_size=4)
    fidmod.generate_shards(pipe.unet, dict(pipe.scheduler.config), spec, 6, tmp_path, progress=False,
                           pipeline="pipe-id")
    images, meta = fidmod.read_shard(shard_path(tmp_path, 1))
    assert meta["sha256"] == fidmod.images_sha256(images)
    assert (meta["shard"], meta["count"], meta["shape"], meta["dtype"]) == ("1", "2", "[2, 1, 16, 16]", "torch.uint8")
    assert (meta["seed"], meta["shard_seed"], meta["shard_size"]) == ("5", str(fidmod.shard_seed(5, 1)), "4")
    assert (meta["scheduler"], meta["scheduler_class"], meta["steps"], meta["pipeline"]) == (
        "DDIMScheduler", "DDIMScheduler", "2", "pipe-id")
    config = json.loads(meta["scheduler_config"])
    assert config["timestep_spacing"] == "trailing" and config["num_train_timesteps"] == 1000
    with pytest.raises(RuntimeError, match="shard_00000.safetensors: the image bytes do not match"):
        _flip_byte(shard_path(tmp_path, 0), -1)
        list(fidmod.iter_shards(tmp_path, 6, 4))


def _fake_torchrun(monkeypatch, rank: int, local_rank: int, world: int = 2) -> list[int]:
    """torchrun's environment and an initialised process group, without one; returns the set_device calls."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def test_each_torchrun_rank_gets_its_local_gpu(monkeypatch):
    calls = _fake_torchrun(monkeypatch, rank=3, local_rank=1)
    ctx = fidmod.distributed_context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (3, 2, 1)
    assert fidmod.select_device("cuda", ctx) == "cuda:1" and calls == [1]
    assert fidmod.select_device("cuda:2", ctx) == "cuda:2" and calls == [1, 2]  # an explicit index is kept
    assert fidmod.select_device("cpu", ctx) == "cpu" and calls == [1, 2]       # CPU: nothing changes
    with pytest.raises(RuntimeError, match="LOCAL_RANK 5.*only 4 CUDA device"):
        fidmod.select_device("cuda", DistContext(5, 8, 5))
    monkeypatch.delenv("LOCAL_RANK")
    assert fidmod.distributed_context().local_rank == 3  # no LOCAL_RANK: one machine, local rank = rank
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert fidmod.select_device("cuda", fidmod.distributed_context()) == "cuda:0"


def test_run_sweep_samples_on_the_local_rank_gpu(monkeypatch, tmp_path):
    calls = _fake_torchrun(monkeypatch, rank=1, local_rank=1)
    moved_to: list[str] = []

    class Stop(Exception):
        pass

    class FakePipeline:
        def to(self, device):
            moved_to.append(device)
            raise Stop

    monkeypatch.setattr(fidmod.sweep, "load_pipeline", lambda path: FakePipeline())
    with pytest.raises(Stop):
        run_sweep(SPECS[:1], N, tmp_path, device="cuda", progress=False, ctx=fidmod.distributed_context())
    assert moved_to == ["cuda:1"] and calls == [1]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped"])
def test_corrupt_reference_stats_cache_is_recomputed(tmp_path, damage):
    from safetensors.torch import load_file

    extractor = Extractor.create("digits")
    clean = fidmod.reference_stats(extractor, "digits-test", tmp_path / "clean")
    fidmod.reference_stats(extractor, "digits-test", tmp_path / "damaged")
    (path,) = (tmp_path / "damaged").glob("refstats_digits_*.safetensors")
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 definitely not safetensors" * 3)
    elif damage == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    else:
        _flip_byte(path, -3)
    with pytest.warns(RuntimeWarning, match=f"{path.name} is unusable, recomputing it"):
        again = fidmod.reference_stats(extractor, "digits-test", tmp_path / "damaged")
    assert again.keys() == clean.keys()
    for name in clean:
        assert torch.equal(again[name], clean[name]), name
    rewritten = load_file(str(path))
    assert all(torch.equal(rewritten[name], clean[name]) for name in clean)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fidmod.reference_stats(extractor, "digits-test", tmp_path / "damaged")


# --------------------------------------------------------------------------------------------------
# Guided (class-conditional) and text-to-image runs
# --------------------------------------------------------------------------------------------------

GUIDED = [RunSpec("DDIMScheduler", 2, {"timestep_spacing": "trailing"}, seed=0, shard_size=SHARD, guidance_scale=w)
          for w in (1.5, 4.0)]


@pytest.fixture(scope="module")
def cond_source():
    from fastsampler.models.conditions import SampleSource, conditioning_for

    pipe = fidmod.load_pipeline("digits-cond")
    pipe.set_progress_bar_config(disable=True)
    return SampleSource(pipe, conditioning_for(pipe))


def _shard_noise(spec: RunSpec, index: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise of shard ``index`` as ``generate_shards`` draws it."""
    gen = torch.Generator().manual_seed(fidmod.shard_seed(spec.seed, index))
    return torch.randn((spec.shard_size, *shape), generator=gen)[:count]


def _labels(run_dir: Path) -> list[int]:
    """The class labels the shards of a run recorded, in sample order."""
    return [label for path in sorted(run_dir.glob("shard_*.safetensors"))
            for label in json.loads(fidmod.read_shard(path)[1]["class_labels"])]


def test_guided_labels_are_class_balanced_whatever_the_shard_size(tmp_path, cond_source):
    config = dict(cond_source.pipe.scheduler.config)
    for shard_size in (8, 5, 30):
        spec = RunSpec("DDIMScheduler", 1, {"timestep_spacing": "trailing"}, shard_size=shard_size, guidance_scale=2)
        fidmod.generate_shards(cond_source, config, spec, 25, tmp_path / str(shard_size), progress=False)
        assert _labels(tmp_path / str(shard_size)) == [j % 10 for j in range(25)], shard_size
    meta = fidmod.read_shard(shard_path(tmp_path / "8", 1))[1]
    assert (meta["conditioning"], meta["guidance_scale"], meta["class_labels"]) == (
        "class-balanced", "2.0", "[8, 9, 0, 1, 2, 3, 4, 5]")


@pytest.mark.parametrize("guidance", [None, 1.0, 3.0])
def test_guided_shards_equal_the_conditional_pipeline(tmp_path, cond_source, guidance):
    """Guidance 1 (and no guidance scale) is the conditional model alone; any w is DigitsConditionalPipeline's."""
    from diffusers import DDIMScheduler

    pipe = cond_source.pipe
    spec = RunSpec("DDIMScheduler", 3, {"timestep_spacing": "trailing"}, seed=4, shard_size=6, guidance_scale=guidance)
    fidmod.generate_shards(cond_source, dict(pipe.scheduler.config), spec, 10, tmp_path, progress=False)
    images, meta = fidmod.read_shard(shard_path(tmp_path, 1))
    stock = type(pipe)(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config,
                                                                           timestep_spacing="trailing"))
    stock.set_progress_bar_config(disable=True)
    expected = stock(torch.arange(6, 10) % 10, guidance_scale=1.0 if guidance is None else guidance,
                     num_inference_steps=3, latents=_shard_noise(spec, 1, 4, (1, 16, 16))).images
    assert torch.equal(images, fidmod.to_uint8(expected))
    assert meta["guidance_scale"] == repr(1.0 if guidance is None else guidance)


def test_changing_the_guidance_scale_regenerates_shards(tmp_path, cond_source):
    config = dict(cond_source.pipe.scheduler.config)
    low, high = GUIDED
    assert low.key("pipe") != high.key("pipe") and "_w1.5_" in low.key("pipe")
    fidmod.generate_shards(cond_source, config, low, 10, tmp_path, progress=False)
    before = fidmod.read_shard(shard_path(tmp_path, 0))[0].clone()
    with pytest.warns(RuntimeWarning, match="metadata differs: guidance_scale: stored '1.5', expected '4.0'"):
        report = fidmod.generate_shards(cond_source, config, high, 10, tmp_path, progress=False)
    assert report.generated == [0, 1] and not torch.equal(before, fidmod.read_shard(shard_path(tmp_path, 0))[0])
    expected = fidmod.shard_metadata(high, resolve_scheduler(high.scheduler, config, high.scheduler_kwargs), 0, 8,
                                     (1, 16, 16))  # what an unconditional run would record
    assert "conditioning: stored 'class-balanced', this run records none" in fidmod.shard_mismatch(
        shard_path(tmp_path, 0), expected)


def test_guidance_options_must_fit_the_pipeline(tmp_path, ref_cache):
    from click.testing import CliRunner

    from fastsampler.cli.fid import fid

    common = ["-n", "4", "--steps", "1", "--out", str(tmp_path), "--cache-dir", str(ref_cache), "--no-progress"]
    cases = {("--guidance-scale", "2"): "--guidance-scale 2.0: the pipeline is unconditional",
             ("--pipeline", "digits-cond", "--prompts", __file__): "--prompts: DigitsConditionalPipeline is not",
             ("--pipeline", "digits-cond", "--negative-prompt", "x"): "--negative-prompt: DigitsConditionalPipeline",
             ("--pipeline", "no/such/dir"): "--pipeline no/such/dir: neither one of digits, digits-v, digits-cond",
             ("--pipeline", "digits-cond", "--guidance-scale", "x"): "--guidance-scale: could not convert"}
    for args, message in cases.items():
        result = CliRunner().invoke(fid, [*args, *common])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
    assert not list(tmp_path.glob("*/shard_*"))  # nothing was sampled


@pytest.mark.slow
def test_guided_two_processes_equal_one_process(tmp_path, ref_cache):
    metas = _assert_two_processes_equal_one(tmp_path, ref_cache, GUIDED, "digits-cond")
    labels = [label for meta in metas[:3] for label in json.loads(meta["class_labels"])]
    assert labels == [j % 10 for j in range(N)]
    assert [meta["guidance_scale"] for meta in metas] == ["1.5"] * 3 + ["4.0"] * 3


def test_cli_guided_sweep_reports_the_seed_spread(tmp_path, ref_cache):
    from click.testing import CliRunner

    from fastsampler.cli.fid import fid

    result = CliRunner().invoke(fid, ["--pipeline", "digits-cond", "--guidance-scale", "1.5,4", "--seed", "0,1",
                                      "--steps", "2", "-n", "16", "--shard-size", "8", "--out", str(tmp_path),
                                      "--cache-dir", str(ref_cache), "--no-progress"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "fid_results.json").read_text())
    assert [(r["guidance_scale"], r["seed"]) for r in payload["results"]] == [(1.5, 0), (1.5, 1), (4.0, 0), (4.0, 1)]
    assert payload["meta"]["pipeline"] == "digits-cond" and payload["meta"]["seeds"] == [0, 1]
    for cell, pair in zip(payload["spread"], (payload["results"][:2], payload["results"][2:])):
        fids = [r["fid"] for r in pair]
        assert cell["fids"] == fids and cell["seeds"] == [0, 1]
        assert cell["mean"] == pytest.approx(sum(fids) / 2)
        assert cell["std"] == pytest.approx(abs(fids[0] - fids[1]) / 2 ** 0.5)
        assert (cell["min"], cell["max"]) == (min(fids), max(fids))
    assert "seed-to-seed spread" in result.output and "DDIMScheduler (w=4)" in result.output


def _prompts_file(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    prompts = ("a red digit", "a blue cat", "noise")
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join([prompts[0], "", *prompts[1:]]) + "\n")  # a blank line is skipped
    return path, prompts


def test_text_to_image_shards_follow_the_prompts_and_match_the_stock_pipeline(tmp_path):
    from diffusers import DDIMScheduler
    from tiny_pipelines import tiny_sd_pipeline

    from fastsampler.models.conditions import SampleSource, conditioning_for, read_prompts

    pipe = tiny_sd_pipeline()
    path, prompts = _prompts_file(tmp_path)
    source = SampleSource(pipe, conditioning_for(pipe, read_prompts(path), "blurry"))
    spec = RunSpec("DDIMScheduler", 3, {"timestep_spacing": "trailing"}, seed=1, shard_size=2, guidance_scale=2.5)
    fidmod.generate_shards(source, dict(pipe.scheduler.config), spec, 5, tmp_path / "run", progress=False)
    images, meta = fidmod.read_shard(shard_path(tmp_path / "run", 1))
    assert images.shape == (2, 3, 16, 16)  # decoded by the VAE (8x8 latents, scale factor 2)
    assert meta["conditioning"] == "prompts" and meta["guidance_scale"] == "2.5"
    assert meta["negative_prompt"] == "blurry" and meta["prompts_sha256"] == source.conditioning.prompts_sha256
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    expected = pipe([prompts[2], prompts[0]], negative_prompt=["blurry"] * 2, guidance_scale=2.5,  # samples 2, 3
                    num_inference_steps=3, latents=_shard_noise(spec, 1, 2, (4, 8, 8)), output_type="pt").images
    assert torch.equal(images, fidmod.to_uint8(expected * 2 - 1))
    other = SampleSource(pipe, conditioning_for(pipe, prompts[:2], "blurry"))
    with pytest.warns(RuntimeWarning, match="prompts_sha256: stored"):
        fidmod.generate_shards(other, dict(pipe.scheduler.config), spec, 5, tmp_path / "run", progress=False)


def test_cli_text_to_image_run_from_a_local_folder(tmp_path, ref_cache):
    """The whole `fastsampler fid` path on a saved tiny SD pipeline with a prompts file (scored with the digits CNN,
    which takes any image size and channel count: the number is meaningless, the path is what is tested)."""
    from click.testing import CliRunner
    from tiny_pipelines import tiny_sd_pipeline

    from fastsampler.cli.fid import fid

    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    path, prompts = _prompts_file(tmp_path)
    common = ["--pipeline", str(tmp_path / "sd"), "--steps", "2", "-n", "5", "--shard-size", "2", "--out",
              str(tmp_path / "out"), "--cache-dir", str(ref_cache), "--no-progress"]
    missing = CliRunner().invoke(fid, common)
    assert missing.exit_code != 0 and "--prompts FILE is required" in missing.output
    result = CliRunner().invoke(fid, [*common, "--prompts", str(path), "--negative-prompt", "blurry",
                                      "--guidance-scale", "3", "--features", "digits"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "out" / "fid_results.json").read_text())
    assert payload["meta"]["prompts"]["count"] == 3 and payload["meta"]["negative_prompt"] == "blurry"
    (row,) = payload["results"]
    assert row["guidance_scale"] == 3.0 and row["shards_generated"] == 3
    run = json.loads((Path(row["run_dir"]) / "run.json").read_text())
    assert (run["conditioning"], run["num_prompts"], run["negative_prompt"]) == ("prompts", 3, "blurry")


def test_shard_identity_follows_files_named_by_options(tmp_path):
    """A refitted ratio file at the same path changes the samples but not the config: the recorded scheduler
    fingerprint holds the plan of the run's step count, so old shards are not reused."""
    from fastsampler import UniPCScheduler
    from fastsampler.tuning.cpr import write_ratio_file

    path = tmp_path / "ratios.json"
    fingerprints = []
    for ratio in (1.1, 0.9):
        write_ratio_file(path, [{"num_steps": 5, "guidance_scale": None, "ratios": [1.0, 1.0, ratio, ratio, 1.0]}],
                         UniPCScheduler().config)
        scheduler = UniPCScheduler(dc_ratios_file=str(path))
        fingerprints.append(fidmod.scheduler_fingerprint(scheduler, 5))
        assert fidmod.scheduler_fingerprint(scheduler, 5) == fingerprints[-1]  # deterministic
    assert fingerprints[0] != fingerprints[1]
    assert json.loads(fingerprints[0])["dc_ratios_file"] == str(path)


def test_a_scheduler_folder_takes_only_options_it_already_has(tmp_path):
    from fastsampler import UniPCScheduler

    UniPCScheduler(timestep_spacing="trailing", solver_order=3).save_pretrained(tmp_path)
    loaded = fidmod.resolve_scheduler(str(tmp_path), {}, {"timestep_spacing": "trailing"})
    assert type(loaded) is UniPCScheduler and loaded.config.solver_order == 3
    with pytest.raises(ValueError, match="timestep_spacing='leading' differ from the scheduler folder"):
        fidmod.resolve_scheduler(str(tmp_path), {}, {"timestep_spacing": "leading"})


@pytest.mark.parametrize("scheduler", ["/abs/tuned/digits_cond_g1.5", "/abs/tuned/s3/", "fastsampler.UniPCScheduler:"
                                       "solver_order=3,dc_ratios_file=/abs/dc/ratios.json", "DDIMScheduler"])
def test_a_run_directory_stays_inside_the_output_folder(tmp_path, scheduler):
    key = fidmod.RunSpec(scheduler=scheduler, steps=4, scheduler_kwargs={}).key("pipe")
    run_dir = (tmp_path / key).resolve()
    assert run_dir.parent == tmp_path.resolve() and "/" not in key and key.endswith(key.rpartition("_")[2])
    label = key.split("_s4_")[0]
    assert label in {"digits_cond_g1.5", "s3", "DDIMScheduler"} or label.startswith("UniPCScheduler_solver_order=3")
