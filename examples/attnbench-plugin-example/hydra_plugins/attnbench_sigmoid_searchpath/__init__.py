"""Hydra search-path plugin: puts this package's conf/ (variant/sigmoid.yaml) in attnbench's reach.

Hydra imports every module under the `hydra_plugins` namespace package at start-up and calls
`manipulate_search_path`; keep this file free of heavy imports.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class AttnbenchSigmoidSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="attnbench-sigmoid", path="pkg://attnbench_sigmoid.conf")
