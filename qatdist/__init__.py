"""qatdist: distributed PT2E quantization-aware training on x86 CPU clusters."""

__version__ = "0.1.0"
