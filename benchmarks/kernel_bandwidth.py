"""Bandwidth of the per-step update: fused Triton kernel vs the torch path vs a whole scheduler step().

For each solver — DPM-Solver++ 2M, SDE-DPM-Solver++ 2M (a noise row), UniPC-3 (reads and writes its register)
— each latent size and dtype, one representative plan row (mid-run, full history) is timed as:

* ``fused``: ``apply_row_triton`` with the device-resident coefficient row (what our scheduler launches);
* ``torch``: ``apply_row_torch``, the unfused path;
* ``ours step``: our scheduler's whole ``step()`` (kernel='triton'; with its default check_finite, which adds a
  reduction over D, and without);
* ``diffusers step``: the matching diffusers scheduler's ``step()`` at the same index
  (DPMSolverMultistepScheduler / UniPCMultistepScheduler).

Effective GB/s = the bytes the row must move (read X and O in their dtype, S / Z / the older history slots it
uses in fp32; write X_next, the stored prediction and the registers it updates) ÷ time; the same byte count is used for all
four, so the columns compare times. A 10-step sampling loop with a trivial model (out = 0.1·x, set_timesteps
included) is timed for ours (Triton), ours (torch) and diffusers.

On CUDA, times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). Results go to
``benchmarks/results/kernel_bandwidth_<gpu>.{json,md}`` with the GPU name, date, versions and the nominal and measured
(device copy) peak bandwidth. Without a GPU the script refuses; ``--dry-run`` instead runs every code path once
at a tiny size on CPU (the Triton kernel under TRITON_INTERPRET=1, which the script sets itself) and writes the
report to a temporary folder (or ``--out``), so it can be checked in CI.

    python benchmarks/kernel_bandwidth.py                 # on a GPU
    python benchmarks/kernel_bandwidth.py --dry-run       # anywhere, ~10 s
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch  # does not import triton, so TRITON_INTERPRET can still be set below

import harness

SIZES = [(1, 4, 64, 64), (4, 4, 128, 128), (16, 16, 128, 128)]
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
DRY_SIZES = [(1, 2, 3, 5)]
STEPS = 10
RESULTS = Path(__file__).resolve().parent / "results"


def solvers() -> dict:
    """name → (our scheduler factory taking kernel=/check_finite=, diffusers scheduler factory)."""
    import diffusers

    from fastsampler import DPMSolverPlusPlusScheduler, UniPCScheduler

    return {
        "dpm++2M": (lambda **k: DPMSolverPlusPlusScheduler(**k), lambda: diffusers.DPMSolverMultistepScheduler()),
        "sde-dpm++2M": (lambda **k: DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++", **k),
                        lambda: diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")),
        "unipc3": (lambda **k: UniPCScheduler(solver_order=3, **k),
                   lambda: diffusers.UniPCMultistepScheduler(solver_order=3)),
    }


def bytes_moved(row, numel: int, x_bytes: int, o_bytes: int, prediction_written: bool = False) -> int:
    """The traffic a row cannot avoid: every source it uses read once, every output written once.

    Reads X and O (element sizes ``x_bytes``, ``o_bytes``; P from its slot instead of O if a hook already wrote
    it), and in fp32: Z if the row uses noise, each register and each other history slot the fused row reads.
    Writes X_next (x_bytes), the stored prediction (fp32, unless a hook wrote P and the row does not mix its
    store) and each register the row writes (fp32)."""
    reads = x_bytes + (4 if prediction_written else o_bytes) + 4 * row.uses_noise
    reads += 4 * (bin(row.kernel_registers).count("1") + bin(row.kernel_slots).count("1"))
    writes = x_bytes + (0 if prediction_written and not row.mixes_store else 4)
    writes += 4 * bin(row.writes_registers).count("1")
    return numel * (reads + writes)


def timer(fn, device: str, reps: int) -> float:
    """Median seconds per call (one untimed warm-up call first)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def model(x: torch.Tensor) -> torch.Tensor:
    return 0.1 * x


def accepts(scheduler, name: str) -> bool:
    return name in inspect.signature(scheduler.step).parameters


def loop(scheduler, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    scheduler.set_timesteps(STEPS, device=x.device)
    kw = {"generator": gen} if accepts(scheduler, "generator") else {}
    for t in scheduler.timesteps:
        x = scheduler.step(model(x), t, x, return_dict=False, **kw)[0]
    return x


def step_at(scheduler, i: int, x: torch.Tensor, noise: torch.Tensor | None):
    """A function running ``scheduler.step`` at index i again and again (state rewound to step i each time),
    after a real warm-up run of steps 0..i−1 so its history is full."""
    scheduler.set_timesteps(STEPS, device=x.device)
    kw = {"variance_noise": noise} if noise is not None and accepts(scheduler, "variance_noise") else {}
    for t in scheduler.timesteps[:i]:
        x = scheduler.step(model(x), t, x, return_dict=False, **kw)[0]
    t, out = scheduler.timesteps[i], model(x)
    ours = hasattr(scheduler, "_taken")

    def fn():
        scheduler._step_index = i  # private state on purpose: rewind one step
        if ours:
            scheduler._taken = i
        return scheduler.step(out, t, x, return_dict=False, **kw)[0]

    return fn


def nominal_peak_gbps() -> float | None:
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock, bus = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)  # kHz, bits
    return 2 * clock * 1e3 * bus / 8 / 1e9 if clock and bus else None  # double data rate


def measured_copy_gbps() -> float:
    n = 1 << 27  # 512 MiB of fp32
    src, dst = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    return 2 * n * 4 / timer(lambda: dst.copy_(src), "cuda", 200) / 1e9


def run(device: str, sizes, dtypes, reps: int) -> list[dict]:
    from fastsampler.kernels.reference import apply_row_torch
    from fastsampler.kernels.triton_update import _plan_row_kernel, apply_row_triton

    results = []
    for name, (ours, theirs) in solvers().items():
        for shape in sizes:
            for dname, dtype in dtypes.items():
                g = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(shape, device=device, generator=g).to(dtype)
                sched = ours(kernel="triton")
                sched.set_timesteps(STEPS, device=device)
                i = STEPS // 2
                level = sched.plan.levels - 1
                row = sched.plan.rows[level][i]
                out = model(x)
                hist = torch.randn((sched.plan.slots, *shape), device=device, generator=g)
                regs = torch.randn((row.registers, *shape), device=device, generator=g)
                state = tuple(regs.unbind(0))
                noise = torch.randn(shape, device=device, generator=g) if row.uses_noise else None
                coef = torch.tensor(row.packed, dtype=torch.float32, device=device)
                moved = bytes_moved(row, x.numel(), x.element_size(), out.element_size())

                t_fused = timer(lambda: apply_row_triton(row, x, out, hist, regs if row.registers else None, noise,
                                                         coef=coef), device, reps)
                config = str(getattr(_plan_row_kernel, "best_config", "")) if device == "cuda" else "interpreter"
                t_torch = timer(lambda: apply_row_torch(row, x, out, hist, state, noise), device, reps)
                t_ours = timer(step_at(ours(kernel="triton"), i, x, noise), device, reps)
                t_ours_nc = timer(step_at(ours(kernel="triton", check_finite=False), i, x, noise), device, reps)
                t_theirs = timer(step_at(theirs(), i, x, noise), device, reps)

                loops = {}
                for path, make in (("fused", lambda: ours(kernel="triton")), ("torch", lambda: ours(kernel="torch")),
                                   ("diffusers", theirs)):
                    s = make()
                    gen = torch.Generator(device=device).manual_seed(1)
                    loops[path] = timer(lambda: loop(s, x, gen), device, max(reps, 1))

                r = dict(solver=name, shape="x".join(map(str, shape)), dtype=dname, numel=x.numel(), bytes=moved,
                         row=dict(write_slot=row.write_slot, next_terms=row.next_terms,
                                  register_terms=row.register_terms, store_terms=row.store_terms),
                         triton_config=config,
                         fused_us=t_fused * 1e6, torch_us=t_torch * 1e6, ours_step_us=t_ours * 1e6,
                         ours_step_nocheck_us=t_ours_nc * 1e6, diffusers_step_us=t_theirs * 1e6,
                         loop10_fused_ms=loops["fused"] * 1e3, loop10_torch_ms=loops["torch"] * 1e3,
                         loop10_diffusers_ms=loops["diffusers"] * 1e3)
                for key in ("fused", "torch", "ours_step", "ours_step_nocheck", "diffusers_step"):
                    r[f"{key}_GBps"] = moved / (r[f"{key}_us"] * 1e-6) / 1e9
                r["fused_vs_torch"] = t_torch / t_fused
                results.append(r)
                print(f"{name:12s} {r['shape']:>12s} {dname}  fused {r['fused_GBps']:7.1f} GB/s  torch "
                      f"{r['torch_GBps']:7.1f}  step ours {r['ours_step_us']:8.1f} us  diffusers "
                      f"{r['diffusers_step_us']:8.1f} us  loop10 {r['loop10_fused_ms']:.2f} / "
                      f"{r['loop10_torch_ms']:.2f} / {r['loop10_diffusers_ms']:.2f} ms", flush=True)
    return results


def metadata(device_name: str, peak_nominal: float | None, peak_copy: float | None) -> dict:
    import diffusers
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(device=device_name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
                diffusers=diffusers.__version__, python=platform.python_version(), commit=commit,
                peak_nominal_GBps=peak_nominal, peak_copy_GBps=peak_copy, steps=STEPS,
                interpreter=os.environ.get("TRITON_INTERPRET") == "1")


def markdown(results: list[dict], meta: dict) -> str:
    peaks = []
    if meta["peak_nominal_GBps"]:
        peaks.append(f"nominal peak {meta['peak_nominal_GBps']:.0f} GB/s")
    if meta["peak_copy_GBps"]:
        peaks.append(f"device copy {meta['peak_copy_GBps']:.0f} GB/s")
    lines = [f"# Per-step update bandwidth on {meta['device']}", "",
             f"{meta['date']} · torch {meta['torch']} (CUDA {meta['cuda']}) · triton {meta['triton']} · diffusers "
             f"{meta['diffusers']} · commit {meta['commit']}" + ("".join(" · " + p for p in peaks)), "",
             "Effective GB/s = bytes the row must move ÷ median time (same bytes for every column). "
             "'ours step' is the whole scheduler step() with check_finite on / off; the 10-step loop uses "
             "out = 0.1·x and includes set_timesteps.", "",
             "| solver | latent | dtype | MB moved | fused GB/s | torch GB/s | fused/torch | ours step µs (on/off) "
             "| diffusers step µs | 10-step loop ms: fused / torch / diffusers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['solver']} | {r['shape']} | {r['dtype']} | {r['bytes'] / 1e6:.2f} | {r['fused_GBps']:.0f} "
                     f"| {r['torch_GBps']:.0f} | {r['fused_vs_torch']:.2f}× | {r['ours_step_us']:.0f} / "
                     f"{r['ours_step_nocheck_us']:.0f} | {r['diffusers_step_us']:.0f} | {r['loop10_fused_ms']:.2f} / "
                     f"{r['loop10_torch_ms']:.2f} / {r['loop10_diffusers_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def write(results: list[dict], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower()
    js, md = out_dir / f"kernel_bandwidth_{slug}.json", out_dir / f"kernel_bandwidth_{slug}.md"
    js.write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    md.write_text(markdown(results, meta))
    return js, md


@harness.command(out=None, threads=None)
@click.option("--dry-run", is_flag=True,
              help="run every code path once at a tiny size (on CPU: Triton interpreter) and write the report to a "
                   "temporary folder or --out")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"folder for the report (default {RESULTS})")
@click.option("--reps", type=click.IntRange(min=1), default=None,
              help="timing budget: do_bench ms per measurement on CUDA (default 200), calls on CPU")
def main(args) -> None:
    cuda = torch.cuda.is_available()
    if not args.dry_run and not cuda:
        raise click.UsageError("benchmarks/kernel_bandwidth.py needs a CUDA GPU (run with --dry-run to check the script "
                               "on CPU)")
    if not cuda:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise click.UsageError("triton was imported before TRITON_INTERPRET could be set")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton (and fastsampler's kernel) are imported
    device = "cuda" if cuda else "cpu"
    if args.dry_run:
        results = run(device, DRY_SIZES, DTYPES, reps=args.reps or 1)
        meta = metadata(f"{torch.cuda.get_device_name() if cuda else 'cpu'} dry run", None, None)
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="kernel-bandwidth-dry-run-"))
    else:
        name = torch.cuda.get_device_name()
        meta = metadata(name, nominal_peak_gbps(), measured_copy_gbps())
        results = run(device, SIZES, DTYPES, reps=args.reps or 200)
        out_dir = args.out or RESULTS
    js, md = write(results, meta, out_dir)
    print()
    print(md.read_text())
    print(f"wrote {js} and {md}")
    if args.dry_run:
        print("dry run ok")


if __name__ == "__main__":
    main()
