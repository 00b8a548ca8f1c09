"""The machine a float64 result was computed on: CPU model, BLAS/LAPACK build, torch version and thread count.

Bit-identical replay of a recorded trajectory is only a meaningful demand on the machine that recorded it: another
CPU (Intel or AMD), another BLAS (MKL or OpenBLAS, and MKL's code path per instruction set), another torch release
or another thread count may order the sums of a product differently, which moves float64 results by round-off.
``tests/test_trajectories.py`` compares bit for bit where the fingerprint matches the recorded one and at a derived
round-off tolerance elsewhere.
"""

from __future__ import annotations

import os
import platform
import re

import torch

from precond.ablate.machine import cpu_model


def blas() -> str:
    """torch's BLAS and LAPACK as its build reports them, with the MKL release where MKL is the BLAS."""
    config = torch.__config__.show()
    found = dict(re.findall(r"(BLAS_INFO|LAPACK_INFO)=([^,\s]+)", config))
    mkl = re.search(r"Math Kernel Library Version ([^\s]+)", torch.__config__.parallel_info())
    return f"blas={found.get('BLAS_INFO', '?')} lapack={found.get('LAPACK_INFO', '?')}" + (
        f" mkl={mkl.group(1)}" if mkl else "")


def fingerprint() -> dict[str, str]:
    """Everything that may change a float64 result's last bits between two runs of the same code."""
    environment = " ".join(f"{k}={os.environ[k]}" for k in _CODE_PATH_VARIABLES if k in os.environ)
    return {"cpu": cpu_model(), "machine": platform.machine(), "blas": blas(), "torch": torch.__version__,
            "threads": str(torch.get_num_threads()), "code_path": environment}


_CODE_PATH_VARIABLES = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
"""Environment variables that choose a BLAS or ATen kernel path (and with it the order of a sum)."""
