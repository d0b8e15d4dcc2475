"""The published weights aggnets loads: where they are, what they are, what their authors report."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

from ..models import Embedder
from . import builders
from .preprocessing import Preprocessing

__all__ = ["PretrainedModel", "MODELS"]


@dataclass(frozen=True)
class PretrainedModel:
    """One released checkpoint. ``url``: a direct download (None: ``source`` says where to get the file, then
    ``load(name, file=...)``); ``sha256``: the file's checksum where the authors publish one (none of these do);
    ``reported``: the authors' numbers for it (R@1 in %, or mAP), with the paper."""
    name: str
    family: str
    dim: int
    build: Callable[[Any], Embedder]
    preprocessing: Preprocessing
    paper: str
    url: Optional[str] = None
    filename: Optional[str] = None
    source: str = ""
    sha256: Optional[str] = None
    reported: dict[str, float] = field(default_factory=dict)


_FULL = Preprocessing()  # full resolution, ImageNet normalisation (CosPlace, EigenPlaces, NetVLAD)
_MODELS: list[PretrainedModel] = []

_COSPLACE = {"vgg16": [64, 128, 256, 512], "resnet18": [32, 64, 128, 256, 512],
             "resnet50": [32, 64, 128, 256, 512, 1024, 2048], "resnet101": [32, 64, 128, 256, 512, 1024, 2048],
             "resnet152": [32, 64, 128, 256, 512, 1024, 2048]}
_EIGENPLACES = {"vgg16": [512], "resnet18": [256, 512], "resnet50": [128, 256, 512, 1024, 2048],
                "resnet101": [128, 256, 512, 1024, 2048]}
_TORCHVISION_NAME = {"vgg16": "VGG16", "resnet18": "ResNet18", "resnet50": "ResNet50", "resnet101": "ResNet101",
                     "resnet152": "ResNet152"}

for _family, _table, _paper in (("cosplace", _COSPLACE, "Berton et al., Rethinking visual geo-localization for "
                                 "large-scale applications (CosPlace), CVPR 2022"),
                                ("eigenplaces", _EIGENPLACES, "Berton et al., EigenPlaces: training viewpoint robust "
                                 "models for visual place recognition, ICCV 2023")):
    for _backbone, _dims in _table.items():
        for _dim in _dims:
            _file = f"{_TORCHVISION_NAME[_backbone]}_{_dim}_{_family}.pth"
            _MODELS.append(PretrainedModel(
                f"{_family}_{_backbone}_{_dim}", _family, _dim, partial(builders.cosplace_embedder, backbone=_backbone,
                                                                        what=f"{_family}_{_backbone}_{_dim}"),
                _FULL, _paper, url=f"https://github.com/gmberton/{'CosPlace' if _family == 'cosplace' else 'EigenPlaces'}"
                f"/releases/download/v1.0/{_file}", filename=_file,
                source=f"gmberton/{'CosPlace' if _family == 'cosplace' else 'EigenPlaces'} hubconf.py"))

_MIXVPR_PAPER = "Ali-bey et al., MixVPR: feature mixing for visual place recognition, WACV 2023"
for _dim, _drive, _file, _numbers in (
        (4096, "1vuz3PvnR7vxnDDLQrdHJaOA04SQrtk5L", "resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt",
         {"Pitts250k-test R@1": 94.3, "Pitts30k-test R@1": 91.6, "MSLS-val R@1": 88.2}),
        (512, "1khiTUNzZhfV2UUupZoIsPIbsMRBYVDqj", "resnet50_MixVPR_512_channels(256)_rows(2).ckpt",
         {"Pitts250k-test R@1": 93.2, "Pitts30k-test R@1": 90.7, "MSLS-val R@1": 84.1}),
        (128, "1DQnefjk1hVICOEYPwE4-CZAZOvi1NSJz", "resnet50_MixVPR_128_channels(64)_rows(2).ckpt",
         {"Pitts250k-test R@1": 88.7, "Pitts30k-test R@1": 87.8, "MSLS-val R@1": 78.5})):
    _MODELS.append(PretrainedModel(
        f"mixvpr_resnet50_{_dim}", "mixvpr", _dim, partial(builders.mixvpr_embedder, what=f"mixvpr_resnet50_{_dim}"),
        Preprocessing(size=(320, 320), resample="bilinear"), _MIXVPR_PAPER, filename=_file,
        source=f"Google Drive only (amaralibey/MixVPR README): https://drive.google.com/file/d/{_drive}", reported=_numbers))

_CONVAP_PAPER = "Ali-bey et al., GSV-Cities: toward appropriate supervised visual place recognition, Neurocomputing 2022"
for _dim, _numbers, _resample in (
        (8192, {"Pitts250k-test R@1": 92.8, "Pitts30k-test R@1": 90.5, "MSLS-val R@1": 83.1, "Nordland R@1": 42.7},
         "bilinear"),
        (4096, {"Pitts250k-test R@1": 92.5, "Pitts30k-test R@1": 90.5, "MSLS-val R@1": 83.5, "Nordland R@1": 42.6},
         "bicubic"),
        (2048, {"Pitts250k-test R@1": 92.3, "Pitts30k-test R@1": 90.6, "MSLS-val R@1": 83.4, "Nordland R@1": 40.3},
         "bilinear"),
        (512, {"Pitts250k-test R@1": 90.7, "Pitts30k-test R@1": 89.1, "MSLS-val R@1": 82.6, "Nordland R@1": 36.3},
         "bilinear")):
    _MODELS.append(PretrainedModel(
        f"convap_resnet50_{_dim}", "convap", _dim, partial(builders.convap_embedder, what=f"convap_resnet50_{_dim}"),
        Preprocessing(size=(320, 320), resample=_resample), _CONVAP_PAPER,
        source="Google Drive only (amaralibey/gsv-cities README): https://drive.google.com/drive/folders/"
               "1VYPw9uGD11NgiGFgfWueLt3noJYOIuhL", reported=_numbers))

_BENCHMARK_PAPER = "Berton et al., Deep visual geo-localization benchmark, CVPR 2022"
_BENCHMARK = {  # (backbone, aggregation, descriptor size of the conv4 models): R@1 on (Pitts30k-test, MSLS-val)
    "vgg16_netvlad": (("vgg16", "netvlad", 32768), (83.2, 50.9), (79.0, 74.6)),
    "resnet18_netvlad": (("resnet18", "netvlad", 16384), (86.4, 47.4), (81.6, 75.8)),
    "resnet50_netvlad": (("resnet50", "netvlad", 65536), (86.0, 50.7), (80.9, 76.9)),
    "resnet101_netvlad": (("resnet101", "netvlad", 65536), (86.5, 51.8), (80.8, 77.7)),
    "resnet50_gem_fc2048": (("resnet50", "gem_fc", 2048), (80.1, 33.7), (79.2, 73.5)),
    "resnet50_gem_fc65536": (("resnet50", "gem_fc", 65536), (80.8, 35.8), (79.0, 74.4)),
    "resnet50_crn": (("resnet50", "crn", 65536), (85.8, 54.0), (80.8, 77.8)),
}
for _variant, ((_backbone, _aggregation, _dim), _pitts, _msls) in _BENCHMARK.items():
    for _trained, _numbers in (("pitts30k", _pitts), ("msls", _msls)):
        _name = f"benchmark_{_variant}_{_trained}"
        _MODELS.append(PretrainedModel(
            _name, "benchmark", _dim, partial(builders.benchmark_embedder, backbone=_backbone,
                                             aggregation=_aggregation, what=_name),
            Preprocessing(size=(480, 640), resample="bilinear"), _BENCHMARK_PAPER,
            source="Google Drive only (gmberton/deep-visual-geo-localization-benchmark README, Model Zoo)",
            reported={"Pitts30k-test R@1": _numbers[0], "MSLS-val R@1": _numbers[1]}))

_BOQ_PAPER = "Ali-bey et al., BoQ: a place is worth a bag of learnable queries, CVPR 2024"
_MODELS += [
    PretrainedModel("boq_resnet50_16384", "boq", 16384, partial(builders.boq_embedder, backbone="resnet50",
                                                                  what="boq_resnet50_16384"),
                    Preprocessing(size=(384, 384), resample="bicubic"), _BOQ_PAPER,
                    url="https://github.com/amaralibey/Bag-of-Queries/releases/download/v1.0/resnet50_16384.pth",
                    filename="resnet50_16384.pth", source="amaralibey/Bag-of-Queries hubconf.py",
                    reported={"MSLS-val R@1": 91.2, "Pitts30k-test R@1": 92.4, "Pitts250k-test R@1": 95.0,
                              "Nordland R@1": 70.7, "SPED R@1": 86.5}),
    PretrainedModel("boq_dinov2_12288", "boq", 12288, partial(builders.boq_embedder, backbone="dinov2",
                                                                what="boq_dinov2_12288"),
                    Preprocessing(size=(322, 322), resample="bicubic"), _BOQ_PAPER,
                    url="https://github.com/amaralibey/Bag-of-Queries/releases/download/v1.0/dinov2_12288.pth",
                    filename="dinov2_12288.pth", source="amaralibey/Bag-of-Queries hubconf.py",
                    reported={"MSLS-val R@1": 93.8, "Pitts30k-test R@1": 93.7, "Pitts250k-test R@1": 96.6,
                              "Nordland R@1": 81.3, "SPED R@1": 92.5}),
    PretrainedModel("salad_dinov2_8448", "salad", 8448, partial(builders.salad_embedder, what="salad_dinov2_8448"),
                    Preprocessing(size=(322, 322), resample="bilinear"),
                    "Izquierdo & Civera, Optimal transport aggregation for visual place recognition (SALAD), CVPR 2024",
                    url="https://github.com/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt",
                    filename="dino_salad.ckpt", source="serizba/salad hubconf.py",
                    reported={"MSLS-val R@1": 92.2, "Nordland R@1": 76.0, "MSLS-challenge R@1": 75.0}),
    PretrainedModel("netvlad_vgg16_pitts30k", "netvlad", 32768, partial(builders.netvlad_embedder,
                                                                          what="netvlad_vgg16_pitts30k"),
                    _FULL, "Arandjelović et al., NetVLAD, CVPR 2016 (Nanne/pytorch-NetVlad's PyTorch training)",
                    filename="model_best.pth.tar",
                    source="Google Drive only (Nanne/pytorch-NetVlad README): https://drive.google.com/open?id="
                           "17luTjZFCX639guSVy00OUtzfTQo4AMF2, checkpoints/model_best.pth.tar",
                    reported={"Pitts30k-val R@1": 85.2}),
]
for _data, _remote in (("mapillary", "mapillary"), ("pitts", "pitts")):
    for _pcs in (128, 512, 4096):
        _file = f"{_remote}_WPCA{_pcs}.pth.tar"
        _MODELS.append(PretrainedModel(
            f"patch_netvlad_{_data}_wpca{_pcs}", "patch_netvlad", _pcs,
            partial(builders.netvlad_embedder, what=f"patch_netvlad_{_data}_wpca{_pcs}"),
            Preprocessing(size=(480, 640), resample="bilinear"),
            "Hausler et al., Patch-NetVLAD, CVPR 2021 (the global NetVLAD + WPCA descriptor)",
            url=f"https://huggingface.co/TobiasRobotics/Patch-NetVLAD/resolve/main/{_file}?download=true",
            filename=_file, source="QVPR/Patch-NetVLAD download_models.py"))

_CIRTORCH = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks"
for _name, _path, _dim, _numbers in (
        ("retrievalSfM120k-vgg16-gem", "retrieval-SfM-120k/retrievalSfM120k-vgg16-gem-b4dcdc6.pth", 512,
         {"ROxford-M mAP": 60.9, "RParis-M mAP": 69.3, "ROxford-H mAP": 32.9, "RParis-H mAP": 44.2}),
        ("retrievalSfM120k-resnet101-gem", "retrieval-SfM-120k/retrievalSfM120k-resnet101-gem-b80fb85.pth", 2048,
         {"ROxford-M mAP": 65.4, "RParis-M mAP": 76.7, "ROxford-H mAP": 40.1, "RParis-H mAP": 55.2}),
        ("rSfM120k-tl-resnet50-gem-w", "retrieval-SfM-120k/rSfM120k-tl-resnet50-gem-w-97bf910.pth", 2048,
         {"ROxford-M mAP": 64.7, "RParis-M mAP": 76.3, "ROxford-H mAP": 39.0, "RParis-H mAP": 54.9}),
        ("rSfM120k-tl-resnet101-gem-w", "retrieval-SfM-120k/rSfM120k-tl-resnet101-gem-w-a155e54.pth", 2048,
         {"ROxford-M mAP": 67.8, "RParis-M mAP": 77.6, "ROxford-H mAP": 41.7, "RParis-H mAP": 56.3}),
        ("rSfM120k-tl-resnet152-gem-w", "retrieval-SfM-120k/rSfM120k-tl-resnet152-gem-w-f39cada.pth", 2048,
         {"ROxford-M mAP": 68.8, "RParis-M mAP": 78.0, "ROxford-H mAP": 41.3, "RParis-H mAP": 57.2}),
        ("gl18-tl-resnet50-gem-w", "gl18/gl18-tl-resnet50-gem-w-83fdc30.pth", 2048,
         {"ROxford-M mAP": 63.6, "RParis-M mAP": 78.0, "ROxford-H mAP": 40.9, "RParis-H mAP": 57.5}),
        ("gl18-tl-resnet101-gem-w", "gl18/gl18-tl-resnet101-gem-w-a4d43db.pth", 2048,
         {"ROxford-M mAP": 67.3, "RParis-M mAP": 80.6, "ROxford-H mAP": 44.3, "RParis-H mAP": 61.5}),
        ("gl18-tl-resnet152-gem-w", "gl18/gl18-tl-resnet152-gem-w-21278d5.pth", 2048,
         {"ROxford-M mAP": 68.7, "RParis-M mAP": 79.7, "ROxford-H mAP": 44.2, "RParis-H mAP": 60.3})):
    _MODELS.append(PretrainedModel(
        f"cirtorch_{_name}", "cirtorch", _dim, partial(builders.cirtorch_embedder, what=f"cirtorch_{_name}"),
        Preprocessing(max_size=1024, resample="bicubic"),
        "Radenović, Tolias & Chum, Fine-tuning CNN image retrieval with no human annotation, TPAMI 2018",
        url=f"{_CIRTORCH}/{_path}", filename=_path.split("/")[-1],
        source="filipradenovic/cnnimageretrieval-pytorch cirtorch/examples/test.py (multi-scale numbers)",
        reported=_numbers))

MODELS: dict[str, PretrainedModel] = {model.name: model for model in _MODELS}
