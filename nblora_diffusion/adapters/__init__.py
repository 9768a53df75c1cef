"""Deprecated name of ``nblora_diffusion.transformer_models`` (the LLM/ViT package), kept for one release.

``nblora_diffusion.adapters`` and ``nblora_diffusion.adapters.<module>`` are the modules of
``nblora_diffusion.transformer_models`` themselves; the first import warns with a DeprecationWarning.
"""

from .._deprecated import moved_package

moved_package(__name__, "nblora_diffusion.transformer_models")
