"""Checkpoint converters: HF transformers and GGUF checkpoints -> jaxgen model directories.

Installed as `jaxgen.converters`; mirrors `ctranslate2.converters`.
"""

from jaxgen.converters.base import Converter

__all__ = ["Converter", "TransformersConverter", "GGUFConverter"]


def __getattr__(name: str):
    # Imported lazily so that `import jaxgen` does not read every converter's dependencies.
    if name == "TransformersConverter":
        from jaxgen.converters.transformers import TransformersConverter

        return TransformersConverter
    if name == "GGUFConverter":
        from jaxgen.converters.gguf import GGUFConverter

        return GGUFConverter
    raise AttributeError(name)
