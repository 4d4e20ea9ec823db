"""The README's first example runs as written, offline, on the embedded digits model: scheduler swap, tuning,
save, reload — and the reloaded scheduler samples like the tuned one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def first_example() -> str:
    section = README.read_text().split("## First minutes", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_first_example_runs_and_round_trips(tmp_path):
    check = """
import numpy as np
again = UniPCScheduler.from_pretrained("digits-unipc-5")
assert again.plans[5].fingerprint() == tuned.plans[5].fingerprint()
a = pipe(batch_size=4, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(3)).images
pipe.scheduler = tuned
b = pipe(batch_size=4, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(3)).images
assert np.array_equal(a, b) and np.isfinite(a).all()
print("README-OK")
"""
    done = subprocess.run([sys.executable, "-c", first_example() + check], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0 and "README-OK" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    assert (tmp_path / "digits-unipc-5" / "scheduler_config.json").is_file()
