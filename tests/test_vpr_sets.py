"""Place-recognition evaluation sets in the field's two layouts, written here exactly as the authors' loaders read them
(VPR-datasets-downloader folders with @utm_east@utm_north@ names; gsv-cities / MixVPR / SALAD .npy index files, MSLS
with qIdx / pIdx), and scripts/evaluate.py's eval.sets on them, where the recall is known by construction: a query that
is a byte copy of a positive database image is found at R@1; one whose copied image is not a positive is missed at
R@1 and found once N covers the whole database; one without positives is never found."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from aggnets import retrieval as R
from aggnets_train.config import ConfigError
from aggnets_train.retrieval_run import run_evaluate
from aggnets_train.vpr_sets import build_place_set, vpr_set_names

CONF = Path(__file__).resolve().parents[1] / "conf"


def random_jpegs(folder: Path, names: list[str], seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path, format="JPEG")
        paths.append(path)
    return paths


def utm_name(east: float, north: float, tag: str) -> str:
    return f"@{east:.2f}@{north:.2f}@17@T@40.44@-79.99@{tag}@@@@@@@@.jpg"


def write_folder_set(folder: Path) -> None:
    """Database at (100 i, 0), i < 5. Queries: a copy of db 2 at (210, 0) (positive: db 2); a copy of db 4 at (0, 10)
    (positive: db 0 only); a copy of db 1 at (5000, 5000) (no positive)."""
    db = random_jpegs(folder / "database", [utm_name(100.0 * i, 0.0, f"db{i}") for i in range(5)], seed=1)
    queries = folder / "queries"
    queries.mkdir(parents=True)
    for source, (east, north), tag in ((db[2], (210.0, 0.0), "q0"), (db[4], (0.0, 10.0), "q1"),
                                       (db[1], (5000.0, 5000.0), "q2")):
        shutil.copyfile(source, queries / utm_name(east, north, tag))


def write_index_set(images: Path, index: Path, prefix: str, msls: bool = False) -> None:
    """Database ref/000000i.jpg, i < 4. Queries: a copy of db 1 (positives [1]), of db 3 (positives [0, 2]), of db 0
    (no positive). MSLS-style: one more query in qImages that qIdx leaves out, the ground truth in pIdx."""
    db_names = [f"ref/{i:07d}.jpg" for i in range(4)]
    db = random_jpegs(images, db_names, seed=2)
    q_names = [f"query/{i:07d}.jpg" for i in range(3)]
    for name, source in zip(q_names, (db[1], db[3], db[0])):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, images / name)
    gt = np.empty(3, dtype=object)
    gt[0], gt[1], gt[2] = np.array([1]), np.array([0, 2]), np.array([], dtype=np.int64)
    index.mkdir(parents=True, exist_ok=True)
    np.save(index / f"{prefix}_dbImages.npy", np.array(db_names))
    if msls:
        random_jpegs(images, ["query/extra.jpg"], seed=3)
        np.save(index / f"{prefix}_qImages.npy", np.array(["query/extra.jpg", *q_names]))
        np.save(index / f"{prefix}_qIdx.npy", np.array([1, 2, 3]))
        np.save(index / f"{prefix}_pIdx.npy", gt, allow_pickle=True)
    else:
        np.save(index / f"{prefix}_qImages.npy", np.array(q_names))
        np.save(index / f"{prefix}_gt.npy", gt, allow_pickle=True)


def test_recall_from_positives_counts_every_query():
    ranks = np.array([[3, 1, 0], [2, 0, 1], [0, 1, 2], [1, 2, 3]])
    positives = [np.array([3]), np.array([1]), np.array([], dtype=np.int64), np.array([3, 9])]
    out = R.recall_at_n_positives(ranks, positives, ns=(1, 2, 3))
    assert out == {"R@1": 25.0, "R@2": 25.0, "R@3": 75.0, "queries": 4, "without_positives": 1}
    with pytest.raises(ValueError, match="at most the ranking's 3 columns"):
        R.recall_at_n_positives(ranks, positives, ns=(1, 5))


def test_radius_positives_equal_a_brute_force_distance_check():
    rng = np.random.default_rng(0)
    db, queries = rng.uniform(0, 200, (300, 2)), rng.uniform(0, 200, (40, 2))
    found = R.radius_positives(queries, db, 25.0)
    for q, row in enumerate(found):
        expected = np.flatnonzero(np.linalg.norm(db - queries[q], axis=1) <= 25.0)
        np.testing.assert_array_equal(row, expected)


def test_both_layouts_load_as_the_authors_read_them(tmp_path):
    write_folder_set(tmp_path / "tokyo247" / "images" / "test")
    tokyo = build_place_set("tokyo247", str(tmp_path))
    # queries in sorted path order: (0, 10) -> db 0, (210, 0) -> db 2, (5000, 5000) -> none
    assert [Path(p).name.split("@")[1] for p in tokyo.queries] == ["0.00", "210.00", "5000.00"]
    assert [p.tolist() for p in tokyo.positives] == [[0], [2], []]
    write_index_set(tmp_path / "msls_val", tmp_path / "msls_val", "msls_val", msls=True)
    msls = build_place_set("msls_val", str(tmp_path))
    assert [Path(p).name for p in msls.queries] == ["0000000.jpg", "0000001.jpg", "0000002.jpg"]
    assert [p.tolist() for p in msls.positives] == [[1], [0, 2], []] and len(msls.database) == 4
    # the npy files elsewhere (gsv-cities keeps them in its repository's datasets/ folder)
    write_index_set(tmp_path / "SPEDTEST", tmp_path / "repo" / "datasets" / "SPED", "SPED")
    sped = build_place_set("sped", str(tmp_path), index_root=str(tmp_path / "repo" / "datasets"))
    assert sped.database[0] == str(tmp_path / "SPEDTEST" / "ref" / "0000000.jpg")


def test_bad_layouts_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no set 'msls_vall'; did you mean 'msls_val'"):
        build_place_set("msls_vall", str(tmp_path))
    with pytest.raises(ConfigError, match=r"tokyo247/images/test/database' not found: a folder-layout set"):
        build_place_set("tokyo247", str(tmp_path))
    with pytest.raises(ConfigError, match=r"database list .*SPED_dbImages.npy' not found"):
        build_place_set("sped", str(tmp_path))
    write_index_set(tmp_path / "SPEDTEST", tmp_path / "SPED", "SPED")
    (tmp_path / "SPEDTEST" / "ref" / "0000002.jpg").unlink()
    with pytest.raises(ConfigError, match=r"1 images listed .* missing .*ref/0000002.jpg"):
        build_place_set("sped", str(tmp_path))
    np.save(tmp_path / "SPED" / "SPED_gt.npy", np.array([0.5, 1.5, 2.5]))
    with pytest.raises(ConfigError, match="one array of database indices per query"):
        build_place_set("sped", str(tmp_path), check_files=False)
    np.save(tmp_path / "SPED" / "SPED_gt.npy", np.array([[1], [7], [0]]))
    with pytest.raises(ConfigError, match=r"query 1's positives \[7\] fall outside the 4 database images"):
        build_place_set("sped", str(tmp_path), check_files=False)
    assert {"msls_val", "pitts30k_val", "pitts30k_test", "pitts250k_test", "nordland", "sped", "tokyo247",
            "amstertime", "st_lucia", "sf_xl_test"} <= set(vpr_set_names())


def test_evaluate_py_sets_print_the_papers_table_with_the_recall_known_by_construction(tmp_path, capsys):
    write_folder_set(tmp_path / "data" / "tokyo247" / "images" / "test")
    write_index_set(tmp_path / "data" / "msls_val", tmp_path / "data" / "msls_val", "msls_val", msls=True)
    own = tmp_path / "own.yaml"  # a set of one's own, by path: the same index files under another name
    own.write_text("layout: index\nimages: msls_val\nindex: msls_val\nprefix: msls_val\ngt: pIdx\nquery_index: qIdx\n")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"eval.sets=[tokyo247,msls_val,{own}]", f"eval.root={tmp_path / 'data'}", "eval.recall_ns=[1,4,5]",
            "backbone=resnet18", "backbone.weights=null", "extraction.size=[32,48]", "extraction.batch_size=4",
            f"output_dir={tmp_path / 'out'}"])
    results = run_evaluate(cfg)
    tokyo = results["tokyo247"]  # R@4 depends on where the random net ranks db 0: not known by construction
    assert (tokyo["R@1"], tokyo["R@5"], tokyo["queries"], tokyo["without_positives"]) == (
        pytest.approx(100 / 3), pytest.approx(200 / 3), 3, 1)
    assert results["msls_val"] == {"R@1": pytest.approx(100 / 3), "R@4": pytest.approx(200 / 3), "queries": 3,
                                   "without_positives": 1}
    assert results["own"] == results["msls_val"]
    table = capsys.readouterr().out
    assert "| set | R@1 | R@4 | R@5 | queries |" in table
    assert f"| tokyo247 | 33.3 | {tokyo['R@4']:.1f} | 66.7 | 3 |" in table
    assert "| msls_val | 33.3 | 66.7 | - | 3 |" in table
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert saved["tokyo247"]["R@5"] == pytest.approx(200 / 3)
    descriptors = R.load_descriptors(tmp_path / "out" / "msls_val_queries.npy")
    assert descriptors[0].shape[0] == 3
    from tests.test_training import tensorboard_tags
    assert {"retrieval/tokyo247/R@1", "retrieval/msls_val/R@4"} <= tensorboard_tags(tmp_path / "out")["scalars"]


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_a_fixed_evaluation_size_resizes_as_pil_does_whatever_the_aspect(tmp_path, resample):
    """The papers resize every image to 320 x 320 / 322 x 322 with PIL (torchvision's Resize on a PIL image)."""
    [path] = random_jpegs(tmp_path, ["a.jpg"], seed=4)
    got = R.load_image(path, size=(20, 30), resample=resample)
    with Image.open(path) as image:
        method = Image.Resampling.BILINEAR if resample == "bilinear" else Image.Resampling.BICUBIC
        expected = np.asarray(image.convert("RGB").resize((30, 20), method), dtype=np.float32) / 255.0
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"size must be None or \(height, width\)"):
        R.load_image(path, size=(20,))


def test_training_validation_recall_takes_images_in_any_order_with_repeats():
    """A distributed sampler hands the images out in shards and pads with repeats: place_recall orders them back."""
    import torch

    from aggnets_train.tasks import place_recall

    gen = torch.Generator().manual_seed(0)
    db = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(db[[4, 1, 2]] + 0.05 * torch.randn(3, 8, generator=gen), dim=1)
    place_set = R.PlaceSet("toy", [f"d{i}" for i in range(6)], ["q0", "q1", "q2"],
                           [np.array([4]), np.array([0, 5]), np.array([2])])
    order = torch.tensor([7, 0, 8, 3, 5, 1, 6, 2, 4, 0, 7])  # shuffled, 0 and 7 twice
    table = torch.cat([db, queries])
    got = place_recall(table[order], order, place_set, ks=(1, 6))
    assert got == {"R@1": pytest.approx(200 / 3), "R@6": pytest.approx(100.0)}  # q1's nearest is db 1: not a positive
    with pytest.raises(RuntimeError, match="1 of its 9 images are missing"):
        place_recall(table[order[order != 3]], order[order != 3], place_set)


def test_evaluate_py_sets_run_a_config_built_anyloc_with_no_training(tmp_path):
    """experiment=anyloc_dinov2_vits14 on a tiny random ViT: the vocabulary is fitted on the set's database images
    (hard VLAD, cosine k-means), then the set is evaluated; the copies are still found at R@1 where positive."""
    write_index_set(tmp_path / "data" / "SPEDTEST", tmp_path / "data" / "SPED", "SPED")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            "experiment=anyloc_dinov2_vits14", "eval.sets=[sped]", f"eval.root={tmp_path / 'data'}",
            "eval.recall_ns=[1,4]", "backbone.weights=null",
            "backbone.model_kwargs={embed_dim: 24, depth: 2, num_heads: 2}", "backbone.layer=blocks.1",
            "head.num_clusters=3", "codebook.per_image=20", "extraction.size=[28,42]",
            f"output_dir={tmp_path / 'out'}"])
    results = run_evaluate(cfg)
    assert results["sped"]["R@1"] == pytest.approx(100 / 3) and results["sped"]["R@4"] == pytest.approx(200 / 3)
    assert R.load_descriptors(tmp_path / "out" / "sped_database.npy")[0].shape == (4, 3 * 24)
