"""aggnets: end-to-end trainable pooling heads (NetVLAD, NetBoF, NetFV, GeM, R-MAC, MAC, SPoC, CroW, spatial pyramids)
and the classical encoders they generalise (BoF, VLAD, Fisher vectors), as plain ``nn.Module``s."""
from . import backbones, codebook, convert, data, functional, heads, inspection, models, retrieval
from . import pretrained
from .models import Classifier, Embedder
from .registry import build_head, get_head_class, list_heads, register_head

__version__ = "0.1.0"

__all__ = ["__version__", "backbones", "codebook", "convert", "data", "functional", "heads", "inspection", "models",
           "pretrained", "retrieval", "Embedder", "Classifier", "build_head", "get_head_class", "list_heads",
           "register_head"]


def __getattr__(name: str):
    if name == "inspect":  # the deprecated name of aggnets.inspection (it warns)
        import importlib
        return importlib.import_module(".inspect", __name__)
    raise AttributeError(f"module 'aggnets' has no attribute {name!r}")
