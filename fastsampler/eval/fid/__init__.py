"""FID of any diffusers-compatible scheduler on a local pipeline, sharded and resumable.

Pipelines: unconditional (the embedded digits DDPM), class-conditional with classifier-free guidance (the embedded
``digits-cond`` model; class-balanced labels ``j mod K``) and text-to-image (prompts ``j mod P`` from a file);
``fastsampler.models.conditions`` holds what a run is conditioned on and draws the denoiser of each shard from
``fastsampler.models.denoisers.from_pipeline``.

The pieces, in the order a run uses them (one module each; this package re-exports their public names):

* ``sampling.resolve_scheduler`` — a class name (``"DDIMScheduler"``: diffusers; ``"fastsampler.UniPCScheduler"``, or
  any ``"package.module.Class"``) → an instance built with ``from_config(pipeline_config, **overrides)``.
* ``sampling.sample`` / ``sample_latents`` — a plain diffusers loop (``set_timesteps``; ``init_noise_sigma``;
  ``scale_model_input``; ``step``, with ``generator=`` only where ``step`` accepts it), so every diffusers scheduler
  works, around a network or a guided denoiser ``model(x, t)``. Counts the NFE (a guided step, both halves in one
  batch, is one).
* ``shards.generate_shards`` — samples in fixed-size shards with per-shard seeds (``shard_seed``), so the image set does
  not depend on the number of processes. Shard *i* goes to rank ``i % world_size``; each is written atomically
  (``shard_00003.safetensors``, uint8 NCHW) as soon as it is done, and existing shards are skipped, so an
  interrupted run resumes where it stopped. Each shard records the SHA-256 of its image bytes and everything
  its images depend on (``shard_metadata``: sampler, seeds, pipeline, and for conditional runs the guidance
  scale, the class labels or a digest of the prompts, the negative prompt); on resume a shard is only reused when
  both still match, otherwise it is regenerated with a ``RuntimeWarning`` naming the file and what differed.
  Latent models' samples are decoded with the pipeline's VAE before they are stored.
* ``extractor.Extractor`` / ``evaluator.FIDEvaluator`` — torchmetrics ``FrechetInceptionDistance`` with either the digits CNN extractor or
  InceptionV3 (only from a local weights file), reference statistics cached on disk (``reference.reference_stats``),
  fake statistics from the shards in index order, so the number is identical for any world size. A cache file
  that cannot be read or fails validation (checksum, key, shapes) is recomputed with a ``RuntimeWarning``.

* ``pipelines.load_pipeline`` — an embedded pipeline by name or a local folder; ``sweep.run_sweep`` — the runs of
  ``fastsampler fid``, end to end; ``files`` — atomic writes and checksums.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) ``distributed_context`` initialises a gloo
process group; every rank generates its shards, all meet at a barrier and rank 0 computes the FID. With
``device="cuda"`` each rank samples on ``cuda:<LOCAL_RANK>`` (``select_device``).

Image convention: samples in [−1, 1] are stored and scored as uint8 ``round((x + 1) · 127.5)`` (what a PNG would
hold); reference images get exactly the same conversion. The metric is used with ``normalize=False`` and uint8
input for both extractors.
"""

from fastsampler.eval.fid.evaluator import FIDEvaluator, fid_scorer
from fastsampler.eval.fid.extractor import INCEPTION_WEIGHTS_FILE, Extractor
from fastsampler.eval.fid.files import atomic_save_safetensors, atomic_write_text, file_sha256, images_sha256
from fastsampler.eval.fid.pipelines import embedded_pipeline_dir, load_pipeline, pipeline_id
from fastsampler.eval.fid.reference import (DIGITS_REFERENCES, REAL_STATES, STATS_VERSION, load_reference_images,
                                            reference_id, reference_stats)
from fastsampler.eval.fid.sampling import (accepts_generator, resolve_scheduler, resolve_scheduler_class, sample,
                                           sample_latents, to_uint8)
from fastsampler.eval.fid.shards import (CONDITION_KEYS, SHARD_FORMAT, SHARD_IDENTITY_KEYS, GenerationReport, RunSpec,
                                         _write_shard, generate_shards, iter_shards, read_shard, scheduler_fingerprint,
                                         shard_counts, shard_metadata, shard_mismatch, shard_nfe, shard_path,
                                         shard_seed)
from fastsampler.eval.fid.sweep import RunResult, evaluate_run, run_sweep
# names this module has always offered beside its own (the CLI and benchmarks import them from here)
from fastsampler.models.conditions import Conditioning, OptionError, SampleSource, conditioning_for
from fastsampler.runtime.distributed import DistContext, distributed_context, select_device
from fastsampler.shipped import EMBEDDED_PIPELINES, canonical

__all__ = ["FIDEvaluator", "fid_scorer", "INCEPTION_WEIGHTS_FILE", "Extractor", "atomic_save_safetensors",
           "atomic_write_text", "file_sha256", "images_sha256", "embedded_pipeline_dir", "load_pipeline",
           "pipeline_id", "DIGITS_REFERENCES", "REAL_STATES", "STATS_VERSION", "load_reference_images",
           "reference_id", "reference_stats", "accepts_generator", "resolve_scheduler", "resolve_scheduler_class",
           "sample", "sample_latents", "to_uint8", "CONDITION_KEYS", "SHARD_FORMAT", "SHARD_IDENTITY_KEYS",
           "GenerationReport", "RunSpec", "_write_shard", "generate_shards", "iter_shards", "read_shard",
           "scheduler_fingerprint", "shard_counts", "shard_metadata", "shard_mismatch", "shard_nfe", "shard_path",
           "shard_seed", "RunResult", "evaluate_run", "run_sweep", "Conditioning", "OptionError", "SampleSource",
           "conditioning_for", "DistContext", "distributed_context", "select_device", "EMBEDDED_PIPELINES",
           "canonical"]
