"""jaxgen: a JAX inference engine for decoder-only language models with CTranslate2's Generator API."""

from jaxgen.default_model import default_model_path
from jaxgen.generator import Generator
from jaxgen.results import GenerationResult, GenerationStepResult, ScoringResult

__version__ = "0.1.0"
__all__ = ["default_model_path", "Generator", "GenerationResult", "GenerationStepResult", "ScoringResult"]
