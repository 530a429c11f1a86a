"""attnbench: latency, memory, scaling and error of attention variants on your hardware.

The plugin contract, for a package that adds a variant:

    from attnbench import Variant, register, build

The repository's `harness/` and `variants/` install as `attnbench.harness` and
`attnbench.variants` (pyproject.toml maps them): one import name, the distribution's own.
"""

from attnbench.variants import Shape, Variant, build, get, names, register

__all__ = ["Shape", "Variant", "build", "get", "names", "register"]
