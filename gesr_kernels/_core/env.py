"""Environment flags, read once when the package is imported."""
import os

# TRITON_INTERPRET only takes effect when set before triton is imported, which importing this package does;
# reading it once keeps it off the per-call host path (os.environ lookups cost ~1 µs each).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRETING
