"""The batch path on a real Slurm: ``scripts/slurm_smoke.sh`` starts a single-node Slurm (Debian's slurm-wlm and
munge, installed with apt-get when missing), submits the job scripts gridscale writes for the plans' SLURM
environments around the point's real task (:mod:`slurm` cites each line of OpenMOLE and gridscale it follows), and
prints one PASS or FAIL line per check. Skipped where it cannot run: not root, no mount namespaces, no packages
and no network, or daemons that do not start here. About a minute on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "slurm_smoke.sh"

EXPECTED = [
    "gpu directives accepted",
    "gpu job state",
    "gpu CUDA_VISIBLE_DEVICES reaches the point",
    "gpu --cleanenv keeps the host's variables out",
    "gpu exit code comes back",
    "gpu metrics.json back and parsed",
    "gpu-bounded the tiny training trains under the plan's bound",
    "gpu-memory directives accepted",
    "gpu-memory job state",
    "gpu-memory over its memory bound is a failed row, not an OUT_OF_MEMORY job",
    "control, the same point without its memory bound, ends OUT_OF_MEMORY",
    "cpu directives accepted",
    "cpu job state",
    "cpu CPU path (ContainerTask)",
    "cpu exit code comes back",
    "cpu metrics.json back and parsed",
    "/etc/slurm and /etc/munge unchanged",
]


@pytest.mark.timeout(900)
def test_the_plans_batch_jobs_on_a_real_slurm():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("scripts/slurm_smoke.sh needs root (munged, slurmd, cgroups, mount namespaces)")
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=840)
    out = proc.stdout + proc.stderr
    if proc.returncode == 77:
        pytest.skip(next((line for line in out.splitlines() if line.startswith("SKIP")), out[-500:]))
    lines = out.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert not failed, "\n".join(failed) + "\n--- output\n" + out[-6000:]
    passed = [line for line in lines if line.startswith("PASS ")]
    missing = [check for check in EXPECTED if not any(line.startswith(f"PASS {check}") for line in passed)]
    assert not missing, f"checks that did not pass: {missing}\n--- output\n{out[-6000:]}"
    assert proc.returncode == 0, out[-6000:]
    control = next(line for line in lines if line.startswith("PASS control"))
    assert "JobState=OUT_OF_MEMORY" in control and "Unrecognized state OUT_OF_MEMORY" in control
    bounded = next(line for line in lines if line.startswith("PASS gpu-memory over"))
    assert "JobState=COMPLETED" in bounded and "row status 'failed'" in bounded
