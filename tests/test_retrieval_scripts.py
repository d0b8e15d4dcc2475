"""scripts/extract.py and scripts/evaluate.py (aggnets_train.retrieval_run), in-process on tiny real PNG files: a
model from config or from a train.py checkpoint, the three protocols, post-processing, and clear errors."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from aggnets import retrieval as R
from aggnets.data import MotifDataset
from aggnets_train.config import ConfigError
from aggnets_train.retrieval_run import build_embedder, run_evaluate, run_extract

CONF = Path(__file__).resolve().parents[1] / "conf"
FAST = ["extraction.max_size=64", "codebook.max_images=8", "codebook.per_image=20"]


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def write_images(folder: Path, count: int, names=None) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    motifs = MotifDataset("test", size=count, image_size=48)
    written = []
    for index in range(count):
        name = names[index] if names else f"{index:02d}.png"
        image = (motifs[index][0].permute(1, 2, 0).numpy() * 255).astype("uint8")
        Image.fromarray(image).save(folder / name)
        written.append(name)
    return written


def test_extract_from_config_writes_descriptors_with_their_config(tmp_path):
    names = write_images(tmp_path / "images", 5)
    cfg = compose_config("extract", f"images={tmp_path / 'images'}", f"output={tmp_path / 'd.npy'}", *FAST)
    run_extract(cfg)
    loaded = R.load_descriptors(tmp_path / "d.npy")
    assert loaded[0].shape == (5, 40) and list(loaded[1]) == names
    assert loaded[2]["config"]["head"]["_target_"] == "aggnets.heads.GeM"
    np.testing.assert_allclose(np.linalg.norm(loaded[0], axis=1), 1.0, rtol=1e-5)


def test_extract_from_a_training_checkpoint_reproduces_the_trained_model(tmp_path):
    from tests.test_training import SMALL, compose_train
    from aggnets_train.run import build_run
    run_dir = tmp_path / "run"
    cfg = compose_train(*SMALL, f"paths.output_dir={run_dir}", "head.num_clusters=4", "trainer.max_steps=2",
                        "trainer.limit_val_batches=0", "test=false")
    run = build_run(cfg)
    run.trainer.fit(run.task, datamodule=run.datamodule)
    from omegaconf import OmegaConf
    OmegaConf.save(cfg, run_dir / "config.yaml")
    write_images(tmp_path / "images", 3)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    embedder, info = build_embedder(compose_config("extract", f"checkpoint={checkpoint}", "images=unused"))
    assert info["global_step"] == 2
    images = torch.rand(2, 3, 48, 48)
    trained = run.task.embedder.eval()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(trained(images), dim=1)
        torch.testing.assert_close(embedder(images), expected, rtol=1e-5, atol=1e-6)
    # evaluating the checkpoint logs the retrieval metrics into the training run's TensorBoard
    names = write_images(tmp_path / "set", 4)
    (tmp_path / "set" / "pairs.csv").write_text(f"query,positive\n{names[0]},{names[1]}\n{names[2]},{names[3]}\n")
    run_evaluate(compose_config("evaluate", f"checkpoint={checkpoint}", "eval.protocol=pairs",
                                f"eval.csv={tmp_path / 'set' / 'pairs.csv'}", *FAST, f"output_dir={tmp_path / 'ev'}"))
    from tests.test_training import tensorboard_tags
    assert {"retrieval/pairs/mAP", "retrieval/pairs/R@1"} <= tensorboard_tags(run_dir)["scalars"]


def test_evaluate_pairs_protocol_and_post_processing(tmp_path):
    names = write_images(tmp_path / "set", 6)
    (tmp_path / "set" / "pairs.csv").write_text("query,positive\n" + "".join(
        f"{names[a]},{names[b]}\n{names[b]},{names[a]}\n" for a, b in ((0, 1), (2, 3), (4, 5))))
    common = ["eval.protocol=pairs", f"eval.csv={tmp_path / 'set' / 'pairs.csv'}", *FAST]
    results = run_evaluate(compose_config("evaluate", *common, f"output_dir={tmp_path / 'out'}"))
    assert 0.0 < results["mAP"] <= 100.0 and "R@1" in results
    assert (tmp_path / "out" / "results.json").exists() and (tmp_path / "out" / "database.npy").exists()
    database = R.load_descriptors(tmp_path / "out" / "database.npy")[0]
    R.save_whitening(R.fit_pca_whitening(torch.as_tensor(database).double(), dim=4), tmp_path / "w.pt")
    whitened = run_evaluate(compose_config("evaluate", *common, f"output_dir={tmp_path / 'out2'}",
                                           f"post.whitening={tmp_path / 'w.pt'}", "post.qe_k=1"))
    assert 0.0 < whitened["mAP"] <= 100.0
    approximate = run_evaluate(compose_config("evaluate", *common, f"output_dir={tmp_path / 'out4'}",
                                              "post.power=0.5", "search.index='IVF2,Flat'", "search.k=5",
                                              "search.nprobe=2"))
    assert 0.0 < approximate["mAP"] <= 100.0
    R.save_whitening(R.fit_pca_whitening(torch.randn(20, 8).double()), tmp_path / "w8.pt")
    with pytest.raises(ConfigError, match=r"^post\.whitening: .* expects 8-d descriptors, the model gives 40"):
        run_evaluate(compose_config("evaluate", *common, f"output_dir={tmp_path / 'out3'}",
                                    f"post.whitening={tmp_path / 'w8.pt'}"))


def _write_gnd(path: Path, database: list[str], queries: list[str]) -> None:
    gnd = [{"bbx": [0.0, 0.0, 40.0, 40.0], "easy": [0], "hard": [1], "junk": [2]},
           {"bbx": [5.0, 5.0, 45.0, 45.0], "easy": [3], "hard": [], "junk": []}]
    with open(path, "wb") as handle:
        pickle.dump({"imlist": [n[:-4] for n in database], "qimlist": [n[:-4] for n in queries], "gnd": gnd}, handle)


def test_evaluate_revisited_protocol_and_its_errors(tmp_path):
    database = write_images(tmp_path / "rox" / "jpg", 5, names=[f"db{i}.jpg" for i in range(5)])
    queries = write_images(tmp_path / "rox" / "jpg", 2, names=["q0.jpg", "q1.jpg"])
    _write_gnd(tmp_path / "rox" / "gnd_test.pkl", database, queries)
    common = ["eval.protocol=revisited", f"eval.root={tmp_path / 'rox'}", *FAST]
    results = run_evaluate(compose_config("evaluate", *common, f"eval.gnd={tmp_path / 'rox' / 'gnd_test.pkl'}",
                                          f"output_dir={tmp_path / 'out'}"))
    assert {"easy/mAP", "medium/mAP", "hard/mAP", "medium/mP@1"} <= set(results)
    with pytest.raises(FileNotFoundError, match="gnd_missing.pkl"):
        run_evaluate(compose_config("evaluate", *common, f"eval.gnd={tmp_path / 'rox' / 'gnd_missing.pkl'}",
                                    f"output_dir={tmp_path / 'out2'}"))
    (tmp_path / "rox" / "jpg" / "db4.jpg").unlink()
    with pytest.raises(ConfigError, match=r"^eval\.root: 1 images of .* are missing"):
        run_evaluate(compose_config("evaluate", *common, f"eval.gnd={tmp_path / 'rox' / 'gnd_test.pkl'}",
                                    f"output_dir={tmp_path / 'out3'}"))


def test_evaluate_place_recognition_from_utm_file_names(tmp_path):
    db_names = [f"@{500000 + 100 * i:.2f}@{4000000.0:.2f}@db{i}.png" for i in range(4)]
    q_names = [f"@{500000 + 100 * i + 5:.2f}@{4000000.0:.2f}@q{i}.png" for i in range(2)]
    write_images(tmp_path / "database", 4, names=db_names)
    write_images(tmp_path / "queries", 2, names=q_names)
    results = run_evaluate(compose_config("evaluate", "eval.protocol=place", f"eval.database={tmp_path / 'database'}",
                                          f"eval.queries={tmp_path / 'queries'}", "eval.recall_ns=[1,4]", *FAST,
                                          f"output_dir={tmp_path / 'out'}"))
    assert results["R@4"] == 100.0 and 0.0 <= results["R@1"] <= 100.0


def test_empty_image_folder_and_unknown_protocol_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^images: no images found"):
        run_extract(compose_config("extract", f"images={tmp_path / 'empty'}", f"output={tmp_path / 'd.npy'}"))
    with pytest.raises(ConfigError, match=r"^eval\.protocol: expected 'pairs', 'revisited' or 'place'"):
        run_evaluate(compose_config("evaluate", "eval.protocol=oxford", f"output_dir={tmp_path}"))


def test_approximate_search_agrees_with_exact_on_clustered_data():
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(8, 32, generator=generator), dim=1)
    database = torch.nn.functional.normalize(centres.repeat(50, 1) + 0.05 * torch.randn(400, 32, generator=generator),
                                             dim=1)
    queries = database[:40] + 0.01 * torch.randn(40, 32, generator=generator)
    _, exact = R.knn(queries, database, 1)
    _, approx = R.approximate_knn(queries, database, 10, index="IVF8,Flat", nprobe=8)
    assert (approx[:, 0] == exact[:, 0].numpy()).mean() == 1.0  # all lists probed: exact
    _, compressed = R.approximate_knn(queries, database, 10, index="IVF8,PQ8", nprobe=2)
    found = np.array([exact[i, 0].item() in compressed[i] for i in range(40)])
    assert found.mean() >= 0.8


def test_a_fitted_whitening_travels_with_the_embedder_and_its_checkpoint(tmp_path):
    from aggnets.backbones import build_backbone
    from aggnets.heads import GeM, Whitening
    from aggnets.models import Embedder
    backbone = build_backbone("resnet18", "layer1")
    whitening = R.fit_pca_whitening(torch.randn(100, 64).double(), dim=16).float()
    embedder = Embedder(backbone, GeM(64), whitening=whitening)
    assert embedder.out_dim == 16 and embedder(torch.rand(2, 3, 32, 32)).shape == (2, 16)
    assert {"whitening.weight", "whitening.bias"} <= set(embedder.state_dict())
    with pytest.raises(ValueError, match="whitening expects 16-d input, the descriptor before it has 64"):
        Embedder(backbone, GeM(64), whitening=Whitening(16, 8))


def test_metric_learning_fine_tunes_a_whitening_file_and_the_checkpoint_keeps_it(tmp_path):
    from omegaconf import OmegaConf
    from tests.test_training import SMALL, compose_train
    from aggnets_train.run import build_run
    R.save_whitening(R.fit_pca_whitening(torch.randn(200, 40).double(), dim=8).float(), tmp_path / "w.pt")
    run_dir = tmp_path / "run"
    cfg = compose_train(*SMALL, f"paths.output_dir={run_dir}", "experiment=motifs_metric_learning", "head=gem",
                        "data.batch_size=16", "task.projection_dim=null", f"task.whitening={tmp_path / 'w.pt'}",
                        "trainer.max_steps=2",
                        "trainer.limit_val_batches=0", "test=false")
    run = build_run(cfg)
    before = run.task.embedder.whitening.weight.detach().clone()
    run.trainer.fit(run.task, datamodule=run.datamodule)
    assert not torch.equal(before, run.task.embedder.whitening.weight)  # fine-tuned with the head
    OmegaConf.save(cfg, run_dir / "config.yaml")
    embedder, _ = build_embedder(compose_config("extract", f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}",
                                                "images=unused"))
    images = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(embedder(images), run.task.embedder.eval()(images))
    assert embedder.out_dim == 8


def test_place_positions_from_a_utm_csv(tmp_path):
    write_images(tmp_path / "database", 3, names=["a.png", "b.png", "c.png"])
    write_images(tmp_path / "queries", 1, names=["q.png"])
    rows = ["name,utm_east,utm_north", "a.png,0,0", "b.png,100,0", "c.png,200,0", "q.png,101,0"]
    (tmp_path / "utm.csv").write_text("\n".join(rows) + "\n")
    common = ["eval.protocol=place", f"eval.database={tmp_path / 'database'}", f"eval.queries={tmp_path / 'queries'}",
              "eval.recall_ns=[1,3]", *FAST]
    results = run_evaluate(compose_config("evaluate", *common, f"eval.utm_csv={tmp_path / 'utm.csv'}",
                                          f"output_dir={tmp_path / 'out'}"))
    assert results["R@3"] == 100.0
    (tmp_path / "utm.csv").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(ConfigError, match=r"^eval\.utm_csv: 1 images have no row"):
        run_evaluate(compose_config("evaluate", *common, f"eval.utm_csv={tmp_path / 'utm.csv'}",
                                    f"output_dir={tmp_path / 'out2'}"))


def test_fit_whitening_script_pca_and_learned(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("fit_whitening", CONF.parent / "scripts" / "fit_whitening.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    names = [f"{i}.png" for i in range(30)]
    R.save_descriptors(tmp_path / "d.npy", np.random.default_rng(0).standard_normal((30, 12)).astype("float32"),
                       names, {})
    pca = script.main(["--descriptors", str(tmp_path / "d.npy"), "--dim", "5", "--out", str(tmp_path / "p.pt")])
    assert pca.out_features == 5 and R.load_whitening(tmp_path / "p.pt").out_features == 5
    (tmp_path / "pairs.csv").write_text("query,positive\n" + "".join(f"{i}.png,{i + 1}.png\n" for i in range(0, 30, 2)))
    lw = script.main(["--descriptors", str(tmp_path / "d.npy"), "--pairs", str(tmp_path / "pairs.csv"),
                      "--out", str(tmp_path / "lw.pt")])
    assert lw.out_features == 12
    (tmp_path / "bad.csv").write_text("query,positive\n0.png,nope.png\n")
    with pytest.raises(ValueError, match=r"^--pairs: 1 names are not in the descriptors file"):
        script.main(["--descriptors", str(tmp_path / "d.npy"), "--pairs", str(tmp_path / "bad.csv"),
                     "--out", str(tmp_path / "x.pt")])
