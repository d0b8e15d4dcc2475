"""torch.hub entry points of aggnets: the published place-recognition / retrieval models, and any backbone + head.

    torch.hub.load("<owner>/aggnets", "boq", backbone="dinov2")                 # BoQ's released DINOv2 model
    torch.hub.load("<owner>/aggnets", "cosplace", backbone="resnet50", fc_output_dim=2048)
    torch.hub.load("<owner>/aggnets", "mixvpr", file="resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt")
    torch.hub.load("<owner>/aggnets", "embedder", backbone="resnet50", layer="layer3", head="netvlad")  # random head
    torch.hub.load("/path/to/clone", "salad", source="local", file="dino_salad.ckpt")                   # offline

Each returns an ``aggnets.Embedder`` in eval mode; the published ones carry ``.preprocessing`` (image size, resize
filter, normalisation). ``pretrained=False`` gives the same architecture with random weights. ``file``: a local copy
of the checkpoint (offline, or the Google-Drive-only releases: MixVPR, pytorch-NetVlad).
"""
from typing import Any, Optional

dependencies = ["torch", "torchvision", "timm", "numpy", "PIL", "tqdm"]


def _load(name: str, pretrained: bool, file: Optional[str], build_random) -> Any:
    import aggnets

    if pretrained:
        return aggnets.pretrained.load(name, file=file)
    model = build_random()
    model.preprocessing = aggnets.pretrained.info(name).preprocessing
    return model.eval()


def pretrained_model(name: str, file: Optional[str] = None) -> Any:
    """Any model of ``aggnets.pretrained.list()`` by name, with its published weights."""
    import aggnets

    return aggnets.pretrained.load(name, file=file)


def _cosplace_like(family: str, backbone: str, fc_output_dim: int, pretrained: bool, file: Optional[str]) -> Any:
    from aggnets import Embedder, heads
    from aggnets.backbones import build_backbone

    backbone = backbone.lower()
    name = f"{family}_{backbone}_{fc_output_dim}"

    def build():
        net = build_backbone(backbone, "features.28" if backbone == "vgg16" else "layer4", weights=None)
        return Embedder(net, heads.CosPlace(net.out_channels, fc_output_dim))

    return _load(name, pretrained, file, build)


def cosplace(backbone: str = "resnet50", fc_output_dim: int = 2048, pretrained: bool = True,
             file: Optional[str] = None) -> Any:
    """CosPlace (Berton et al., CVPR 2022): ``backbone`` resnet18 / 50 / 101 / 152 or vgg16, ``fc_output_dim`` as
    released (gmberton/CosPlace's table)."""
    return _cosplace_like("cosplace", backbone, fc_output_dim, pretrained, file)


def eigenplaces(backbone: str = "resnet50", fc_output_dim: int = 2048, pretrained: bool = True,
                file: Optional[str] = None) -> Any:
    """EigenPlaces (Berton et al., ICCV 2023): the CosPlace architecture with its own weights."""
    return _cosplace_like("eigenplaces", backbone, fc_output_dim, pretrained, file)


def mixvpr(dim: int = 4096, pretrained: bool = True, file: Optional[str] = None) -> Any:
    """MixVPR (Ali-bey et al., WACV 2023) on ResNet-50 layer3 at 320 x 320 px: ``dim`` 4096, 512 or 128. The weights
    are on Google Drive only: pass the downloaded ``file``."""
    from aggnets import Embedder, heads
    from aggnets.backbones import build_backbone

    channels, rows = {4096: (1024, 4), 512: (256, 2), 128: (64, 2)}[dim]

    def build():
        net = build_backbone("resnet50", "layer3", weights=None)
        return Embedder(net, heads.MixVPR(1024, 20, 20, out_channels=channels, out_rows=rows))

    return _load(f"mixvpr_resnet50_{dim}", pretrained, file, build)


def boq(backbone: str = "resnet50", pretrained: bool = True, file: Optional[str] = None) -> Any:
    """BoQ (Ali-bey et al., CVPR 2024): ``backbone`` "resnet50" (16384-d, 384 x 384 px) or "dinov2" (ViT-B/14,
    12288-d, 322 x 322 px)."""
    from aggnets import Embedder, heads
    from aggnets.backbones import build_backbone

    def build():
        if backbone == "resnet50":
            return Embedder(build_backbone("resnet50", "layer3", weights=None), heads.BoQ(1024, 512, 64, 2, 32))
        net = build_backbone("timm:vit_base_patch14_dinov2", "blocks.11", weights=None, norm=False)
        return Embedder(net, heads.BoQ(768, 384, 64, 2, 32))

    name = {"resnet50": "boq_resnet50_16384", "dinov2": "boq_dinov2_12288"}[backbone]
    return _load(name, pretrained, file, build)


def salad(pretrained: bool = True, file: Optional[str] = None) -> Any:
    """SALAD (Izquierdo & Civera, CVPR 2024) on DINOv2 ViT-B/14, 8448-d, 322 x 322 px."""
    from aggnets import Embedder, heads
    from aggnets.backbones import build_backbone

    def build():
        return Embedder(build_backbone("timm:vit_base_patch14_dinov2", "blocks.11", weights=None, norm=True),
                        heads.SALAD(768))

    return _load("salad_dinov2_8448", pretrained, file, build)


def netvlad(pretrained: bool = True, file: Optional[str] = None) -> Any:
    """NetVLAD on VGG16 trained on Pitts30k (Nanne/pytorch-NetVlad; Google Drive only: pass ``file``)."""
    from aggnets import Embedder, heads
    from aggnets.backbones import build_backbone

    def build():
        head = heads.NetVLAD(512, 64, normalize_input=True, intra_norm=True, power=None, bias=False)
        return Embedder(build_backbone("vgg16", "features.28", weights=None), head)

    return _load("netvlad_vgg16_pitts30k", pretrained, file, build)


def patch_netvlad(dataset: str = "pitts", dim: int = 4096, file: Optional[str] = None) -> Any:
    """Patch-NetVLAD's global descriptor (NetVLAD + WPCA to ``dim`` 128 / 512 / 4096), trained on "pitts" or
    "mapillary"."""
    return pretrained_model(f"patch_netvlad_{dataset}_wpca{dim}", file)


def cirtorch(name: str = "gl18-tl-resnet101-gem-w", file: Optional[str] = None) -> Any:
    """A cnnimageretrieval-pytorch GeM network with its whitening (``name`` as in their PRETRAINED table)."""
    return pretrained_model(f"cirtorch_{name}", file)


def embedder(backbone: str = "resnet50", layer: Optional[str] = None, head: str = "gem",
             weights: Optional[str] = None, **head_kwargs: Any) -> Any:
    """Any backbone (``aggnets.backbones.build_backbone``: torchvision, timm, offline; ``weights`` "DEFAULT" for the
    library's pretrained ones) cut at ``layer``, with any registered head (``aggnets.list_heads()``) randomly
    initialised, its ``in_channels`` from the backbone and the rest from ``head_kwargs``."""
    import aggnets
    from aggnets.backbones import build_backbone

    net = build_backbone(backbone, layer, weights=weights)
    return aggnets.Embedder(net, aggnets.build_head(head, in_channels=net.out_channels, **head_kwargs)).eval()
