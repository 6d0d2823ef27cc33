"""Hostile case: looks for the host's environment variables in its own environment."""

import os

# What the sandbox gives every call: the safe variables, the scratch's, and
# the sizes of thread pools (its CPUs). Anything else came from the host.
GIVEN = {"PATH", "LANG", "HOME", "TMPDIR"}
THREAD_POOLS = {
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "RAYON_NUM_THREADS",
    "PYTHON_CPU_COUNT",
}


class Plugin:
    def run(self, payload):
        leaked = sorted(
            name
            for name, value in os.environ.items()
            if name not in GIVEN and not (name in THREAD_POOLS and value.isdigit())
        )
        if leaked:
            return {"leaked": leaked}
        raise PermissionError("no host environment variable is visible")
