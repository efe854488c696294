"""One module per family of Hugging Face checkpoints; importing this package registers every
loader (see jaxgen.converters.hf_loader)."""

from jaxgen.converters.loaders import alibi, gemma4, gpt2, llama, moe, parallel  # noqa: F401
