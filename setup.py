"""Build glue pyproject.toml cannot express: the repository's top-level conf/ ships inside the
package as `harness/conf` (harness.config.conf_dir finds it through the package at run time;
a checkout and an editable install use conf/ itself). Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["harness*", "variants*", "hydra_plugins*"]),
              "harness.conf"],
    package_dir={"harness.conf": "conf"},
)
