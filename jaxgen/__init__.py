"""jaxgen: a JAX inference engine for decoder-only language models with CTranslate2's Generator API.

The names below are imported on first use, so that `import jaxgen` (and `jaxgen --help`,
`jaxgen info`, `jaxgen convert`) does not import JAX.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["default_model_path", "Generator", "GenerationResult", "GenerationStepResult", "ScoringResult"]

_LAZY = {
    "default_model_path": "jaxgen.default_model",
    "Generator": "jaxgen.generator",
    "GenerationResult": "jaxgen.results",
    "GenerationStepResult": "jaxgen.results",
    "ScoringResult": "jaxgen.results",
}

if TYPE_CHECKING:  # pragma: no cover
    from jaxgen.default_model import default_model_path
    from jaxgen.generator import Generator
    from jaxgen.results import GenerationResult, GenerationStepResult, ScoringResult


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxgen' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
