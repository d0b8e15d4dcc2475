"""The command-line side of retrieval (scripts/extract.py, scripts/evaluate.py): a model from a train.py checkpoint
or from the backbone / head config groups, descriptors of image lists, and the evaluation protocols of
:mod:`aggnets.retrieval` (generic query/positive pairs, revisited Oxford / Paris, place recognition)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch import Tensor

from aggnets import retrieval as R
from aggnets.codebook import fit_head_codebook
from aggnets.functional.norm import signed_power
from aggnets.inspection import codebook_heads
from aggnets.models import Embedder

from .config import ConfigError, build, build_head

__all__ = ["build_embedder", "list_images", "run_extract", "run_evaluate", "run_evaluate_sets", "evaluate_place_set",
           "place_recall_table"]

log = logging.getLogger(__name__)


def _checkpoint_state(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint: no such file {path!r}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _run_config(checkpoint: str, run_config: Optional[str]) -> DictConfig:
    path = Path(run_config) if run_config else Path(checkpoint).resolve().parent.parent / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"run_config: the training run's config.yaml was not found at {str(path)!r} "
                          "(pass run_config=/path/to/config.yaml)")
    run_cfg = OmegaConf.load(path)
    for group in ("backbone", "head"):  # the only parts instantiated from it
        _check_aggnets_targets(run_cfg.get(group), group, str(path))
    return run_cfg


def _check_aggnets_targets(node: Any, key: str, source: str) -> None:
    """A run config may come with a downloaded checkpoint: its backbone and head may only name aggnets callables,
    so that loading a model never runs arbitrary code (``_target_: os.system``)."""
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if target is not None and not str(target).startswith("aggnets."):
            raise ConfigError(f"{key}._target_: {target!r} in {source} is not an aggnets callable; a run config's "
                              "backbone and head may only build aggnets objects")
        for name in node.keys():
            _check_aggnets_targets(node._get_node(name), f"{key}.{name}", source)
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            _check_aggnets_targets(node._get_node(index), f"{key}[{index}]", source)


def build_embedder(cfg: DictConfig) -> tuple[Embedder, dict]:
    """The model: the backbone and head of a train.py run with its checkpoint's weights when ``checkpoint`` is set,
    else the ``backbone`` / ``head`` groups (e.g. a pretrained backbone + GeM, or a codebook head to fit)."""
    info: dict[str, Any] = {}
    if cfg.get("checkpoint"):
        state = _checkpoint_state(cfg.checkpoint)
        run_cfg = _run_config(cfg.checkpoint, cfg.get("run_config"))
        with open_dict(run_cfg):
            run_cfg.backbone.weights = None  # every weight comes from the checkpoint
        backbone = build(run_cfg.backbone, "backbone")
        head = build_head(run_cfg, backbone)
        task_cfg = run_cfg.get("task", {})
        embedder = Embedder(backbone, head, projection_dim=task_cfg.get("projection_dim"),
                            context_gating=bool(task_cfg.get("context_gating", False)),
                            context_gating_batch_norm=bool(task_cfg.get("context_gating_batch_norm", False)))
        weights = state["state_dict"]
        prefix = "model.embedder." if any(k.startswith("model.embedder.") for k in weights) else "model."
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if "whitening.weight" in own:  # a fitted whitening trained with the model (task.whitening)
            from aggnets.heads import Whitening
            out_features, in_features = own["whitening.weight"].shape
            embedder.set_whitening(Whitening(in_features, out_features))
        missing, unexpected = embedder.load_state_dict(own, strict=False)
        if missing:
            raise ConfigError(f"checkpoint: {cfg.checkpoint} lacks {len(missing)} weights of the model, e.g. "
                              f"{missing[:3]} (a checkpoint from another backbone / head?)")
        info.update(checkpoint=str(cfg.checkpoint), global_step=int(state.get("global_step", 0)),
                    run_dir=str(Path(cfg.checkpoint).resolve().parent.parent), ignored=len(unexpected))
    else:
        backbone = build(cfg.backbone, "backbone")
        embedder = Embedder(backbone, build_head(cfg, backbone))
    return embedder.eval(), info


def list_images(spec: str) -> tuple[str, list[str]]:
    """``(root, relative paths)`` of a folder (all images below it, sorted) or a text file of paths (one per line,
    relative to the file's folder)."""
    path = Path(spec)
    if path.is_dir():
        names = R.scan_images(path)
        root = path
    elif path.is_file():
        root = path.parent
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ConfigError(f"images: {spec!r} is neither a folder nor a list file")
    if not names:
        raise ConfigError(f"images: no images found in {spec!r}")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise ConfigError(f"images: {len(missing)} listed images are missing from disk, e.g. {missing[:3]}")
    return str(root), names


def _fit_codebooks(embedder: Embedder, paths: list[str], cfg: DictConfig) -> None:
    """Codebook heads built from config (no checkpoint) get their codebook from the images themselves."""
    heads = codebook_heads(embedder.head)
    if not heads:
        return
    count = min(len(paths), int(cfg.codebook.max_images))
    chosen = [paths[i] for i in torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))[:count]]
    loader = [R.load_image(p, cfg.extraction.max_size)[None] for p in chosen]
    for name, head in heads:
        summary = fit_head_codebook(head, embedder.backbone, loader, per_image=int(cfg.codebook.per_image),
                                    progress=True)
        log.info("codebook of head%s fitted on %d images: %s", f".{name}" if name else "", count,
                 {k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


def _extract(embedder: Embedder, paths: list[str], cfg: DictConfig, bboxes: Optional[list] = None) -> Tensor:
    e = cfg.extraction
    size = e.get("size")
    return R.extract_descriptors(embedder, paths, batch_size=int(e.batch_size), max_size=e.max_size,
                                 scales=tuple(e.scales), multiscale=e.multiscale, bboxes=bboxes,
                                 device=cfg.get("device"), progress=True,
                                 size=None if size is None else tuple(int(v) for v in size),
                                 resample=e.get("resample", "bicubic"))


def run_extract(cfg: DictConfig) -> str:
    """Descriptors of ``images`` saved to ``output`` (.npy + JSON, or .pt) with the config that made them."""
    embedder, info = build_embedder(cfg)
    root, names = list_images(cfg.images)
    paths = [os.path.join(root, n) for n in names]
    if not cfg.get("checkpoint"):
        _fit_codebooks(embedder, paths, cfg)
    descriptors = _extract(embedder, paths, cfg)
    config = {"config": OmegaConf.to_container(cfg, resolve=False), "model": info, "root": root}
    R.save_descriptors(cfg.output, descriptors.cpu().numpy(), names, config)
    print(f"{len(names)} descriptors of dimension {descriptors.shape[1]} written to {os.path.abspath(cfg.output)}")
    return cfg.output


def _post_process(queries: Tensor, database: Tensor, cfg: DictConfig) -> tuple[Tensor, Tensor]:
    post = cfg.post
    if post.get("power") is not None:  # signed power normalisation sign(x)|x|^power, then L2
        queries, database = (torch.nn.functional.normalize(signed_power(x, float(post.power)), dim=1)
                             for x in (queries, database))
    if post.get("whitening"):
        whitening = R.load_whitening(post.whitening)
        if whitening.in_features != queries.shape[1]:
            raise ConfigError(f"post.whitening: {post.whitening} expects {whitening.in_features}-d descriptors, "
                              f"the model gives {queries.shape[1]}")
        with torch.no_grad():
            queries, database = whitening(queries.to(whitening.weight)), whitening(database.to(whitening.weight))
    if int(post.get("qe_k", 0)) > 0:
        queries = R.alpha_query_expansion(queries, database, int(post.qe_k), alpha=float(post.qe_alpha))
    return queries, database


def _protocol_inputs(cfg: DictConfig) -> dict[str, Any]:
    """Image paths, query boxes and ground truth for ``eval.protocol``."""
    ev = cfg.eval
    if ev.protocol == "pairs":
        gt = R.load_pairs_csv(ev.csv, root=ev.get("root"))
        paths = [os.path.join(gt.root, n) for n in gt.names]
        return {"database": paths, "queries": None, "gt": gt, "names": (list(gt.names), None)}
    if ev.protocol == "revisited":
        gnd = R.load_revisited_gnd(ev.gnd)
        images = Path(ev.root) / "jpg"
        database = [str(images / f"{n}.jpg") for n in gnd.imlist]
        queries = [str(images / f"{n}.jpg") for n in gnd.qimlist]
        missing = [p for p in database + queries if not os.path.isfile(p)]
        if missing:
            raise ConfigError(f"eval.root: {len(missing)} images of {ev.gnd} are missing from {images}, "
                              f"e.g. {missing[:2]}")
        boxes = [tuple(float(v) for v in entry["bbx"]) for entry in gnd.gnd] if ev.get("crop_queries", True) \
            else None
        return {"database": database, "queries": queries, "boxes": boxes, "gt": gnd,
                "names": (list(gnd.imlist), list(gnd.qimlist))}
    if ev.protocol == "place":
        db_root, db_names = list_images(ev.database)
        q_root, q_names = list_images(ev.queries)
        return {"database": [os.path.join(db_root, n) for n in db_names],
                "queries": [os.path.join(q_root, n) for n in q_names],
                "positions": _place_positions(ev.get("utm_csv"), q_names, db_names),
                "names": (db_names, q_names)}
    raise ConfigError(f"eval.protocol: expected 'pairs', 'revisited' or 'place', got {ev.protocol!r}")


def _rank(queries: Tensor, database: Tensor, cfg: DictConfig, k: Optional[int] = None) -> Any:
    """Exact scores (Q, N) — or, given ``k``, the exact top-k indices —, or, with ``search.index`` (a faiss factory
    string such as "IVF1024,PQ32"), the top ``k`` (default ``search.k``) indices of an approximate search (a partial
    ranking; AP then counts unranked positives as missed)."""
    search = cfg.get("search") or {}
    if not search.get("index"):
        if k is None:
            return (queries @ database.T).numpy()
        return R.knn(queries.numpy(), database.numpy(), min(k, len(database)))[1]
    k = min(int(k if k is not None else search.get("k", 100)), len(database))
    _, indices = R.approximate_knn(queries.numpy(), database.numpy(), k, index=search.index,
                                   nprobe=int(search.get("nprobe", 16)))
    return indices


def _place_positions(utm_csv: Optional[str], q_names: list[str], db_names: list[str]) -> tuple[Any, Any]:
    """UTM positions of the queries and the database: from a ``name,utm_east,utm_north`` CSV (names as listed
    under their folders), else parsed from the file names (``@east@north@...``)."""
    if not utm_csv:
        return R.positions_from_filenames(q_names), R.positions_from_filenames(db_names)
    names, positions = R.load_utm_csv(utm_csv)
    where = dict(zip(names, positions))
    missing = [n for n in q_names + db_names if n not in where]
    if missing:
        raise ConfigError(f"eval.utm_csv: {len(missing)} images have no row in {utm_csv}, e.g. {missing[:3]}")
    return (torch.tensor([list(where[n]) for n in q_names]).numpy(),
            torch.tensor([list(where[n]) for n in db_names]).numpy())


def _evaluate(protocol: str, scores: Any, inputs: dict, cfg: DictConfig) -> dict[str, float]:
    if protocol == "pairs":
        return R.evaluate_pairs(scores, inputs["gt"])
    if protocol == "revisited":
        results = R.evaluate_revisited(scores, inputs["gt"])
        return {f"{setting}/{k}": v for setting, values in results.items() for k, v in values.items()}
    query_pos, db_pos = inputs["positions"]
    return R.recall_at_n(scores, query_pos, db_pos, ns=tuple(cfg.eval.recall_ns), threshold=float(cfg.eval.threshold))


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Extract, post-process, search and evaluate; prints a table, writes results.json and the descriptors to
    ``output_dir`` and, for a checkpoint, logs the metrics into the training run's TensorBoard. With ``eval.sets``:
    :func:`run_evaluate_sets`."""
    if cfg.eval.get("sets"):
        return run_evaluate_sets(cfg)
    embedder, info = build_embedder(cfg)
    inputs = _protocol_inputs(cfg)
    if not cfg.get("checkpoint"):
        _fit_codebooks(embedder, inputs["database"], cfg)
    database = _extract(embedder, inputs["database"], cfg).cpu()
    if inputs["queries"] is None:  # pairs: the queries are database images
        queries = database[torch.as_tensor(inputs["gt"].queries)]
    else:
        queries = _extract(embedder, inputs["queries"], cfg, inputs.get("boxes")).cpu()
    queries, database = _post_process(queries.double(), database.double(), cfg)
    results = _evaluate(cfg.eval.protocol, _rank(queries, database, cfg), inputs, cfg)
    output_dir = cfg.output_dir
    os.makedirs(output_dir, exist_ok=True)
    db_names, q_names = inputs["names"]
    R.save_descriptors(os.path.join(output_dir, "database.npy"), database.float().numpy(), db_names,
                       {"protocol": cfg.eval.protocol})
    if q_names is not None:
        R.save_descriptors(os.path.join(output_dir, "queries.npy"), queries.float().numpy(), q_names,
                           {"protocol": cfg.eval.protocol})
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump({"results": results, "model": info}, handle, indent=1)
    _print_table(cfg.eval.protocol, results)
    if info.get("run_dir"):
        _log_to_run(info, cfg.eval.protocol, results)
    return results


def _print_table(protocol: str, results: dict[str, float]) -> None:
    lines = [f"| {protocol} metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    print("\n".join(lines), flush=True)


def _log_to_run(info: dict, protocol: str, results: dict[str, float]) -> None:
    directory = Path(info["run_dir"]) / "tensorboard"
    if not directory.is_dir():
        return
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(directory))
    for key, value in results.items():
        if isinstance(value, (int, float)):
            writer.add_scalar(f"retrieval/{protocol}/{key}", value, info["global_step"])
    writer.close()
    print(f"metrics logged to {directory} (tags retrieval/{protocol}/...)")


def _set_names(sets: Any) -> list[str]:
    if isinstance(sets, str):
        return [name.strip() for name in sets.split(",") if name.strip()]
    return [str(name) for name in sets]


def evaluate_place_set(embedder: Embedder, place_set: R.PlaceSet, cfg: DictConfig,
                       fit_codebooks: bool = False) -> tuple[dict[str, float], Tensor, Tensor]:
    """recall@N (``eval.recall_ns``) of one set: descriptors of its database and queries (``extraction``),
    post-processed (``post``), the top max(N) database images of each query (exact, or ``search.index``)."""
    if fit_codebooks:
        _fit_codebooks(embedder, place_set.database, cfg)
    database = _extract(embedder, place_set.database, cfg).cpu()
    queries = _extract(embedder, place_set.queries, cfg).cpu()
    queries, database = _post_process(queries.float(), database.float(), cfg)
    ns = tuple(int(n) for n in cfg.eval.recall_ns)
    k = min(max(ns), len(database))
    ranks = _rank(queries, database, cfg, k)
    return R.recall_at_n_positives(ranks, place_set.positives, [n for n in ns if n <= k]), queries, database


def run_evaluate_sets(cfg: DictConfig) -> dict[str, Any]:
    """One model on many place-recognition sets (``eval.sets`` under ``eval.root``): prints the papers' table
    (R@N per set), writes ``results.json`` ({set: {R@1: .., ...}}) and each set's descriptors to ``output_dir``,
    and logs ``retrieval/<set>/R@N`` to TensorBoard (the training run's for a checkpoint, else
    ``output_dir/tensorboard``). A model built from config with codebook heads (e.g. AnyLoc) fits its codebook on
    each set's database images before describing that set."""
    from .vpr_sets import build_place_set

    names = _set_names(cfg.eval.sets)
    ev = cfg.eval
    place_sets = [build_place_set(name, ev.get("root"), ev.get("index_root"), bool(ev.get("check_files", True)))
                  for name in names]  # every layout checked before the first extraction
    embedder, info = build_embedder(cfg)
    output_dir = cfg.output_dir
    os.makedirs(output_dir, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    for place_set in place_sets:
        log.info("evaluating %r", place_set)
        scores, queries, database = evaluate_place_set(embedder, place_set, cfg,
                                                       fit_codebooks=not cfg.get("checkpoint"))
        results[place_set.name] = scores
        for part, values, paths in (("database", database, place_set.database),
                                    ("queries", queries, place_set.queries)):
            R.save_descriptors(os.path.join(output_dir, f"{place_set.name}_{part}.npy"), values.numpy(), paths,
                               {"set": place_set.name})
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump({"results": results, "model": info}, handle, indent=1)
    print(place_recall_table(results, tuple(int(n) for n in ev.recall_ns)), flush=True)
    _log_sets(results, Path(info["run_dir"]) / "tensorboard" if info.get("run_dir") else
              Path(output_dir) / "tensorboard", int(info.get("global_step", 0)))
    return results


def place_recall_table(results: dict[str, dict[str, float]], ns: tuple[int, ...]) -> str:
    """The papers' table: one row per set, R@N in percent, and the number of queries."""
    lines = ["| set | " + " | ".join(f"R@{n}" for n in ns) + " | queries |",
             "|---|" + "---:|" * (len(ns) + 1)]
    for name, values in results.items():
        cells = [f"{values[f'R@{n}']:.1f}" if f"R@{n}" in values else "-" for n in ns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {values['queries']} |")
    return "\n".join(lines)


def _log_sets(results: dict[str, dict[str, float]], directory: Path, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter
    directory.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(directory))
    for name, values in results.items():
        for key, value in values.items():
            if key.startswith("R@"):
                writer.add_scalar(f"retrieval/{name}/{key}", value, step)
    writer.close()
    print(f"metrics logged to {directory} (tags retrieval/<set>/R@N)")
