"""FundamentaLLM: train decoder-only transformer language models from scratch, from the command line."""

import os

# PyTorch's CPU threads (GNU OpenMP) spin for a long time after each parallel region before they sleep.
# On a quiet machine that saves a wake-up; on a busy one the spinning threads take the cores that the
# other processes' threads need, and a run beside another run trains 4-16x slower. A short spin keeps
# the quiet speed and lets the threads yield under load. This must happen before torch is imported
# (libgomp reads it once); a user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")

__version__ = "0.1.0"
