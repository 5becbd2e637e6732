"""rlx: an RL and evolution-strategies trainer for aligning causal language models."""

import os as _os

__version__ = "0.1.0"

if _os.environ.get("RLX_CPU_ISA"):  # pretend to be a smaller CPU (rlx.hardware), before vLLM loads
    from rlx.hardware import force_cpu_isa as _force_cpu_isa

    _force_cpu_isa()
