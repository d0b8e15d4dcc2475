"""Pooling heads: (B, C, H, W) feature map (+ an optional (B, H, W) bool mask, + the (B, C) global token) ->
(B, out_dim) descriptor."""
from .base import HeadCapabilities, PoolingHead
from .boq import BoQ
from .class_token import ClassToken
from .convap import ConvAP
from .crn import CRN
from .cosplace import CosPlace
from .global_pool import MAC, CroW, GeM, SPoC
from .mixvpr import MixVPR
from .netbof import BoF, NetBoF
from .netfv import FisherVector, NetFV
from .netvlad import VLAD, NetVLAD
from .norm import ContextGating, IntraNorm, L2Norm, PowerNorm, Whitening
from .pyramid import SpatialPyramid
from .rmac import RMAC
from .salad import SALAD

__all__ = [
    "PoolingHead", "HeadCapabilities", "MAC", "SPoC", "GeM", "CroW", "RMAC", "SpatialPyramid", "NetVLAD", "VLAD",
    "NetBoF", "BoF", "NetFV", "FisherVector", "ClassToken", "L2Norm", "PowerNorm", "IntraNorm", "Whitening",
    "ContextGating",
]
__all__ += ["MixVPR", "ConvAP", "CosPlace"]
__all__ += ["CRN"]
__all__ += ["SALAD", "BoQ"]
