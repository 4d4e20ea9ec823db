"""Bandwidth of the per-step update: fused Triton kernel vs the torch path vs a diffusers step().

For each solver row (DPM-Solver++ 2M, UniPC-3 with its corrector folded in), latent size and dtype:
effective GB/s = bytes that must move (read X, O, S?, Z?, the K−1 older history slots; write X_next, D, S_new?)
÷ time. Also a whole 10-step sampling loop with a trivial model (out = 0.1·x), ours (Triton, torch) vs
diffusers. Needs a CUDA GPU; ``--dry-run`` runs every code path once at tiny size on CPU (the Triton path under
TRITON_INTERPRET=1) so the script can be checked without one.

    python benchmarks/kernels.py                # on a GPU: prints a table, writes benchmarks/results/kernels_<gpu>.{json,md}
    TRITON_INTERPRET=1 python benchmarks/kernels.py --dry-run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path

import torch

SIZES = [(1, 4, 64, 64), (4, 4, 128, 128), (16, 16, 128, 128)]
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def solvers():
    import diffusers

    from fastsampler import DPMSolverPlusPlusScheduler, UniPCScheduler

    return {
        "dpm++2M": (lambda **k: DPMSolverPlusPlusScheduler(**k), lambda: diffusers.DPMSolverMultistepScheduler()),
        "unipc3": (lambda **k: UniPCScheduler(solver_order=3, **k),
                   lambda: diffusers.UniPCMultistepScheduler(solver_order=3)),
    }


def bytes_moved(row, numel: int, io_bytes: int) -> int:
    """Minimum traffic of one row: each input read once, each output written once (history fp32)."""
    k_read = sum(1 for j, _ in row.x_terms + (row.s_terms or ()) if j >= 3) or 0
    reads = 2 * io_bytes + 4 * max(k_read - 1, 0)  # X, O and the older slots read (this step's D is not read)
    reads += 4 * any(j == 1 for j, _ in row.x_terms + (row.s_terms or ()))
    reads += 4 * row.uses_noise
    writes = io_bytes + 4 + 4 * (row.s_terms is not None and row.s_terms != ((0, 1.0),))
    return numel * (reads + writes)


def timer(fn, device: str, reps: int) -> float:
    """Median seconds per call."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    import time

    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def loop(scheduler, x: torch.Tensor, steps: int = 10) -> torch.Tensor:
    scheduler.set_timesteps(steps, device=x.device)
    for t in scheduler.timesteps:
        x = scheduler.step(0.1 * x, t, x, return_dict=False)[0]
    return x


def run(device: str, sizes, dtypes, reps: int) -> list[dict]:
    from fastsampler.kernels.reference import apply_row_torch
    from fastsampler.kernels.triton_update import apply_row_triton

    results = []
    for name, (ours, theirs) in solvers().items():
        for shape in sizes:
            for dname, dtype in dtypes.items():
                sched = ours(kernel="triton")
                sched.set_timesteps(10, device=device)
                w = sched.plan.levels - 1
                i = sched.num_inference_steps // 2
                row = sched._rows[w][i]
                x = torch.randn(shape, device=device).to(dtype)
                out = torch.randn(shape, device=device).to(dtype)
                hist = torch.randn((sched.plan.slots, *shape), device=device)
                saved = torch.randn(shape, device=device)
                coef = torch.as_tensor(row.packed, dtype=torch.float32, device=device)
                moved = bytes_moved(row, x.numel(), x.element_size())
                t_fused = timer(lambda: apply_row_triton(row, x, out, hist, saved, None, coef=coef), device, reps)
                t_torch = timer(lambda: apply_row_torch(row, x, out, hist, saved, None), device, reps)
                t_loop_fused = timer(lambda: loop(ours(kernel="triton"), x), device, max(reps // 5, 1))
                t_loop_torch = timer(lambda: loop(ours(kernel="torch"), x), device, max(reps // 5, 1))
                t_loop_diff = timer(lambda: loop(theirs(), x), device, max(reps // 5, 1))
                results.append(dict(
                    solver=name, shape="x".join(map(str, shape)), dtype=dname, bytes=moved,
                    fused_us=t_fused * 1e6, torch_us=t_torch * 1e6,
                    fused_GBps=moved / t_fused / 1e9, torch_GBps=moved / t_torch / 1e9,
                    speedup_vs_torch=t_torch / t_fused,
                    loop10_fused_ms=t_loop_fused * 1e3, loop10_torch_ms=t_loop_torch * 1e3,
                    loop10_diffusers_ms=t_loop_diff * 1e3))
                print(json.dumps(results[-1]), flush=True)
    return results


def write(results: list[dict], device_name: str, peak: float | None) -> None:
    import triton

    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    meta = dict(device=device_name, date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, peak_GBps=peak)
    (out_dir / f"kernels_{slug}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    lines = [f"# Fused update bandwidth on {device_name}", "",
             f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']}"
             + (f" · nominal peak {peak:.0f} GB/s" if peak else ""), "",
             "| solver | latent | dtype | fused GB/s | torch GB/s | fused/torch | 10-step loop ms: fused / torch / diffusers |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['solver']} | {r['shape']} | {r['dtype']} | {r['fused_GBps']:.0f} | {r['torch_GBps']:.0f} | "
                     f"{r['speedup_vs_torch']:.2f}× | {r['loop10_fused_ms']:.2f} / {r['loop10_torch_ms']:.2f} / "
                     f"{r['loop10_diffusers_ms']:.2f} |")
    (out_dir / f"kernels_{slug}.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run each path once at tiny size on CPU")
    parser.add_argument("--peak-gbps", type=float, default=None, help="the device's nominal bandwidth, for the table")
    args = parser.parse_args()
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            print("TRITON_INTERPRET is not 1: the Triton path is skipped", file=sys.stderr)
            solvers()  # import check only
        else:
            run("cuda" if torch.cuda.is_available() else "cpu", [(1, 2, 4, 4)], {"fp32": torch.float32}, reps=1)
        print("dry run ok")
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (use --dry-run to check it on CPU)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    results = run("cuda", SIZES, DTYPES, reps=50)
    write(results, name, args.peak_gbps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
