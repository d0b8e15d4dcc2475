"""Pooling heads: (B, C, H, W) feature map [+ (B, H, W) bool mask] -> (B, out_dim) descriptor."""
from .base import PoolingHead
from .global_pool import MAC, CroW, GeM, SPoC
from .netbof import BoF, NetBoF
from .netfv import FisherVector, NetFV
from .netvlad import VLAD, NetVLAD
from .norm import IntraNorm, L2Norm, PowerNorm, Whitening
from .pyramid import SpatialPyramid
from .rmac import RMAC

__all__ = [
    "PoolingHead", "MAC", "SPoC", "GeM", "CroW", "RMAC", "SpatialPyramid", "NetVLAD", "VLAD", "NetBoF", "BoF",
    "NetFV", "FisherVector", "L2Norm", "PowerNorm", "IntraNorm", "Whitening",
]
