"""Deprecated: the trained adapter is ``training.methods`` (one strategy object per adapter kind) and its norm
log ``training.norms``. The old names still import from here for one release, with a DeprecationWarning."""

from .._deprecated import deprecated_names
from . import methods, norms

_MOVED = {
    methods: (
        "AdapterSetup",
        "add_adapters",
        "nblora_configs",
        "TEXT_COMPONENTS",
        "INPUT_FACTORS",
        "OUTPUT_FACTORS",
    ),
    norms: ("layer_norms", "lowrank_svdvals"),
}

__getattr__ = deprecated_names(
    __name__,
    {
        name: (f"{module.__name__}.{name}", lambda module=module, name=name: getattr(module, name))
        for module, names in _MOVED.items()
        for name in names
    },
)
