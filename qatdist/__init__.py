"""qatdist: distributed PT2E quantization-aware training on x86 CPU clusters."""

import logging

__version__ = "0.1.0"


class _UpstreamNoise(logging.Filter):
    """Drops two torch log warnings every rank of every run would print, which say nothing
    about the run: torch 2.14 deprecates `register_constant()` for enums, which torchao 0.18
    calls for its `KernelPreference` enum at import (harmless: torch handles enums natively
    now; it goes when torchao stops the call); and `cpp_extension` notes that a CPU-only torch
    has no CUDA runtime when Inductor or qatdist's C++ ops build C++ code."""

    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(needle in message for needle in self.needles)


# Installed here, before any qatdist module imports torchao or builds C++ code: a filter on the
# logger that creates the record applies wherever the record would be handled.
logging.getLogger("torch.utils._pytree").addFilter(
    _UpstreamNoise("KernelPreference", "register_constant()")
)
logging.getLogger("torch.utils.cpp_extension").addFilter(_UpstreamNoise("No CUDA runtime is found"))
