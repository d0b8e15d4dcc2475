"""Retrieval evaluation protocols: revisited Oxford/Paris mAP/mP@k, VPR recall@N, exact k-NN search.

Expected values are worked out by hand, or come from loop implementations written here from the definitions
(the revisitop ``compute_map`` / ``compute_ap`` loops, and the textbook AP), independent of the library's
vectorised code path.
"""
from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
import torch

from aggnets.retrieval import (RefusedGlobalError, RevisitedGroundTruth, as_ranking, average_precision,
                               evaluate_revisited, knn, load_revisited_gnd, load_utm_csv, parse_utm_from_filename,
                               positions_from_filenames, precision_at_k, ranking_from_scores, recall_at_n)

try:  # faiss is optional: the tests that compare against it skip without it
    import faiss

    faiss.omp_set_num_threads(1)
except ImportError:  # pragma: no cover
    faiss = None
needs_faiss = pytest.mark.skipif(faiss is None, reason="faiss not installed")


# --- independent references (loops, from the definitions) -------------------------------------------------------

def ref_revisitop_map(ranks_dbq: np.ndarray, gnd_ok_junk: list[dict], kappas: tuple[int, ...]):
    """The official revisitop ``compute_map`` loop, on (num_db, num_queries) ranks; returns (mAP, mP@k) fractions."""
    aps, prs = [], []
    for i, g in enumerate(gnd_ok_junk):
        ok, junk = np.array(g["ok"]), np.array(g["junk"])
        if ok.shape[0] == 0:
            continue
        pos = np.arange(ranks_dbq.shape[0])[np.isin(ranks_dbq[:, i], ok)]
        jpos = np.arange(ranks_dbq.shape[0])[np.isin(ranks_dbq[:, i], junk)]
        k, ij = 0, 0
        for ip in range(len(pos)):
            while ij < len(jpos) and pos[ip] > jpos[ij]:
                k += 1
                ij += 1
            pos[ip] -= k
        ap = 0.0
        for j, rank in enumerate(pos):
            p0 = 1.0 if rank == 0 else j / rank
            p1 = (j + 1) / (rank + 1)
            ap += (p0 + p1) / len(ok) / 2.0
        aps.append(ap)
        pos = pos + 1
        prs.append([(pos <= min(max(pos), kq)).sum() / min(max(pos), kq) for kq in kappas])
    return float(np.mean(aps)), np.mean(prs, axis=0)


def ref_standard(ranking: np.ndarray, ok: set, ignored: set, ks: tuple[int, ...]):
    """Textbook AP and P@k: walk the ranking, skip ignored items, precision at every hit."""
    hits, seen, ap, prec = 0, 0, 0.0, {}
    for item in ranking:
        if item in ignored and item not in ok:
            continue
        seen += 1
        if item in ok:
            hits += 1
            ap += hits / seen
        if seen in ks:
            prec[seen] = hits / seen
    return ap / len(ok), [prec.get(k, hits / k) for k in ks]


def setting_lists(g: dict, setting: str) -> tuple[list, list]:
    e, h, j = list(g["easy"]), list(g["hard"]), list(g["junk"])
    return {"easy": (e, j + h), "medium": (e + h, j), "hard": (h, j + e)}[setting]


def random_gnd(rng: np.random.Generator, num_q: int, num_db: int) -> list[dict]:
    gnd = []
    for _ in range(num_q):
        perm = rng.permutation(num_db)
        ne, nh, nj = rng.integers(0, 6, size=3)
        gnd.append({"bbx": [0.0, 0.0, 1.0, 1.0], "easy": perm[:ne].tolist(), "hard": perm[ne:ne + nh].tolist(),
                    "junk": perm[ne + nh:ne + nh + nj].tolist()})
    return gnd


# --- hand-made revisited ground truth ------------------------------------------------------------------------------

HAND_GND = [
    {"bbx": [1, 2, 3, 4], "easy": [0, 3], "hard": [5], "junk": [1]},
    {"bbx": [1, 2, 3, 4], "easy": [9], "hard": [], "junk": []},  # no hard positive: skipped in Hard
    {"bbx": [1, 2, 3, 4], "easy": [], "hard": [], "junk": [4]},  # no positive at all: skipped everywhere
]
HAND_RANKS = np.array([[1, 0, 2, 5, 3, 4, 6, 7, 8, 9],
                       [9, 0, 1, 2, 3, 4, 5, 6, 7, 8],
                       list(range(10))])


def test_hand_made_revisitop_ap_and_precision():
    # Query 0. Easy: junk 1 and hard 5 removed -> [0,2,3,4,...]: positives at 0 and 2 ->
    #   AP = ((1+1) + (1/2+2/3)) / (2*2) = 19/24; P@1 = 1; P@5: last positive at rank 3 -> k_q = 3 -> 2/3.
    # Medium: junk 1 removed -> [0,2,5,3,...]: positives at 0, 2, 3 -> AP = (2 + 7/6 + 17/12) / 6 = 55/72; P@5 = 3/4.
    # Hard: junk 1, easy 0 and 3 removed -> [2,5,4,...]: positive at 1 -> AP = (0 + 1/2) / 2 = 1/4; P@1 = 0,
    #   P@5 = 1/2 (k_q = 2). Query 1: AP = 1, P@k = 1 in Easy/Medium, skipped in Hard. Query 2: skipped.
    res = evaluate_revisited(HAND_RANKS, HAND_GND, ks=(1, 5), percent=False)
    assert res["easy"]["mAP"] == pytest.approx((19 / 24 + 1) / 2)
    assert res["medium"]["mAP"] == pytest.approx((55 / 72 + 1) / 2)
    assert res["hard"]["mAP"] == pytest.approx(1 / 4)
    assert res["easy"]["mP@1"] == pytest.approx(1.0) and res["hard"]["mP@1"] == pytest.approx(0.0)
    assert res["easy"]["mP@5"] == pytest.approx((2 / 3 + 1) / 2)
    assert res["medium"]["mP@5"] == pytest.approx((3 / 4 + 1) / 2)
    assert res["hard"]["mP@5"] == pytest.approx(1 / 2)
    assert (res["easy"]["skipped"], res["medium"]["skipped"], res["hard"]["skipped"]) == (1, 1, 2)
    pct = evaluate_revisited(HAND_RANKS, HAND_GND, ks=(1, 5))
    assert pct["medium"]["mAP"] == pytest.approx(100 * (55 / 72 + 1) / 2)


def test_hand_made_standard_variant():
    # Standard AP: Easy (1 + 2/3)/2 = 5/6; Medium (1 + 2/3 + 3/4)/3 = 29/36; Hard 1/2. P@5: 2/5, 3/5, 1/5.
    res = evaluate_revisited(HAND_RANKS, HAND_GND, ks=(5,), variant="standard", percent=False)
    assert res["easy"]["mAP"] == pytest.approx((5 / 6 + 1) / 2)
    assert res["medium"]["mAP"] == pytest.approx((29 / 36 + 1) / 2)
    assert res["hard"]["mAP"] == pytest.approx(1 / 2)
    assert res["easy"]["mP@5"] == pytest.approx((2 / 5 + 1 / 5) / 2)
    assert res["hard"]["mP@5"] == pytest.approx(1 / 5)


def test_average_precision_and_precision_helpers():
    assert average_precision([0, 2], 3) == pytest.approx((2 + 1 / 2 + 2 / 3) / 6)
    assert average_precision(np.array([True, False, True]), 3) == pytest.approx(average_precision([0, 2], 3))
    assert average_precision([0, 2], 3, variant="standard") == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision([], 4) == 0.0
    assert average_precision(torch.tensor([2, 0]), 2) == pytest.approx(average_precision([0, 2], 2))
    assert precision_at_k([0, 2], 10, 2) == pytest.approx(2 / 3)  # revisitop: k_q = last positive rank = 3
    assert precision_at_k([0, 2], 10, 2, variant="standard") == pytest.approx(2 / 10)
    assert precision_at_k([0, 2], 10, 5) == pytest.approx(2 / 10)  # not all positives ranked: k_q = k


def test_random_rankings_match_official_loop(rng):
    num_q, num_db, ks = 12, 40, (1, 5, 10)
    gnd = random_gnd(rng, num_q, num_db)
    ranks = np.stack([rng.permutation(num_db) for _ in range(num_q)])
    res = evaluate_revisited(ranks, gnd, ks=ks, percent=False)
    for setting in ("easy", "medium", "hard"):
        lists = [dict(zip(("ok", "junk"), setting_lists(g, setting))) for g in gnd]
        ref_map, ref_pr = ref_revisitop_map(ranks.T, lists, ks)
        assert res[setting]["mAP"] == pytest.approx(ref_map, abs=1e-12)
        assert [res[setting][f"mP@{k}"] for k in ks] == pytest.approx(ref_pr.tolist(), abs=1e-12)


def test_random_rankings_match_textbook_standard(rng):
    num_q, num_db, ks = 10, 30, (1, 5, 10)
    gnd = random_gnd(rng, num_q, num_db)
    ranks = np.stack([rng.permutation(num_db) for _ in range(num_q)])
    res = evaluate_revisited(ranks, gnd, ks=ks, variant="standard", percent=False)
    for setting in ("easy", "medium", "hard"):
        refs = [ref_standard(ranks[q], set(ok), set(ign), ks)
                for q, (ok, ign) in enumerate(setting_lists(g, setting) for g in gnd) if ok]
        assert res[setting]["mAP"] == pytest.approx(np.mean([r[0] for r in refs]), abs=1e-12)
        assert [res[setting][f"mP@{k}"] for k in ks] == pytest.approx(np.mean([r[1] for r in refs], axis=0))


def test_scores_and_ranks_are_equivalent(rng):
    gnd = RevisitedGroundTruth(imlist=[f"db{i}" for i in range(25)], qimlist=[f"q{i}" for i in range(6)],
                               gnd=random_gnd(rng, 6, 25), name="toy")
    scores = rng.standard_normal((6, 25)).astype(np.float32)
    ranks = np.argsort(-scores, axis=1)
    by_ranks = evaluate_revisited(ranks, gnd)
    assert evaluate_revisited(scores, gnd) == by_ranks
    assert evaluate_revisited(torch.from_numpy(scores), gnd) == by_ranks
    assert evaluate_revisited(torch.from_numpy(ranks), gnd, kind="ranks") == by_ranks
    _, idx = knn(rng.standard_normal((6, 4)), rng.standard_normal((25, 4)), k=25, engine="torch")
    assert evaluate_revisited(idx, gnd.gnd) == evaluate_revisited(np.asarray(idx), gnd)


def test_partial_ranking_prefix(rng):
    gnd = random_gnd(rng, 8, 60)
    ranks = np.stack([rng.permutation(60) for _ in range(8)])
    full = evaluate_revisited(ranks, gnd, ks=(1, 5), percent=False)
    part = evaluate_revisited(ranks[:, :30], gnd, ks=(1, 5), percent=False)  # >= 5 non-ignored items kept
    for setting in ("easy", "medium", "hard"):
        assert part[setting]["mP@1"] == pytest.approx(full[setting]["mP@1"])
        assert part[setting]["mP@5"] == pytest.approx(full[setting]["mP@5"])
        assert part[setting]["mAP"] <= full[setting]["mAP"] + 1e-12


def test_ranking_from_scores_ties_and_topk():
    s = np.array([[0.5, 0.9, 0.5, 0.1]])
    assert ranking_from_scores(s).tolist() == [[1, 0, 2, 3]]  # ties by lower index
    assert ranking_from_scores(s, k=2).tolist() == [[1, 0]]
    assert as_ranking(np.array([[0.5, 0.9, 0.5, 0.1]]), num_db=4, k=3).tolist() == [[1, 0, 2]]


# --- ground-truth pickles ------------------------------------------------------------------------------------------

def _write_gnd(path, protocol: int, **override):
    cfg = {"imlist": ["a", "b", "c", "d"], "qimlist": ["q0", "q1"],
           "gnd": [{"bbx": np.array([1.0, 2.0, 30.5, 40.0]), "easy": np.array([0, 2]), "hard": [1],
                    "junk": np.array([], dtype=np.int64)},
                   {"bbx": [0, 0, 5, 5], "easy": [3], "hard": np.array([0], dtype=np.int32), "junk": [1, 2]}]}
    cfg.update(override)
    path.write_bytes(pickle.dumps(cfg, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_load_revisited_gnd_with_numpy_arrays(tmp_path, protocol):
    gt = load_revisited_gnd(_write_gnd(tmp_path / "gnd_roxford5k.pkl", protocol))
    assert gt.name == "roxford5k" and gt.num_db == 4 and gt.num_queries == 2
    assert gt.imlist == ["a", "b", "c", "d"] and gt.qimlist == ["q0", "q1"]
    assert gt.gnd[0]["easy"].tolist() == [0, 2] and gt.gnd[1]["junk"].tolist() == [1, 2]
    assert np.allclose(gt.gnd[0]["bbx"], [1.0, 2.0, 30.5, 40.0])
    res = evaluate_revisited(np.array([[0, 2, 1, 3], [3, 0, 1, 2]]), gt)
    assert res["easy"]["mAP"] == pytest.approx(100.0)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvilEval:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_without_executing(tmp_path, protocol):
    marker = tmp_path / "pwned"
    bad = tmp_path / "gnd_evil.pkl"
    bad.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil(marker)]}, protocol=protocol))
    with pytest.raises(RefusedGlobalError, match="system"):
        load_revisited_gnd(bad)
    assert not marker.exists()
    bad.write_bytes(pickle.dumps({"imlist": _EvilEval()}, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="eval"):
        load_revisited_gnd(bad)


def test_gnd_file_errors(tmp_path):
    missing = tmp_path / "gnd_rparis6k.pkl"
    with pytest.raises(FileNotFoundError, match="gnd_rparis6k.pkl.*revisitop"):
        load_revisited_gnd(missing)
    no_key = tmp_path / "nokey.pkl"
    no_key.write_bytes(pickle.dumps({"imlist": [], "gnd": []}))
    with pytest.raises(ValueError, match="missing key.*qimlist"):
        load_revisited_gnd(no_key)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a readable"):
        load_revisited_gnd(tmp_path / "junk.pkl")
    with pytest.raises(ValueError, match="2 entries but 'qimlist' has 3"):
        load_revisited_gnd(_write_gnd(tmp_path / "b.pkl", 4, qimlist=["x", "y", "z"]))
    with pytest.raises(ValueError, match=r"gnd\[0\]\['easy'\].*outside"):
        load_revisited_gnd(_write_gnd(tmp_path / "c.pkl", 4, imlist=["a"]))
    bad_entry = [{"easy": [0]}, {"easy": [], "hard": [], "junk": []}]
    with pytest.raises(ValueError, match=r"gnd\[0\] is missing key"):
        load_revisited_gnd(_write_gnd(tmp_path / "d.pkl", 4, gnd=bad_entry))


def test_evaluate_revisited_bad_inputs():
    gt = RevisitedGroundTruth(imlist=[str(i) for i in range(10)], qimlist=["a", "b", "c"], gnd=HAND_GND)
    with pytest.raises(ValueError, match="has 2 rows but gnd has 3 queries"):
        evaluate_revisited(HAND_RANKS[:2], gt)
    with pytest.raises(ValueError, match=r"ranks\.T"):
        evaluate_revisited(np.zeros((10, 3)), gt)
    with pytest.raises(ValueError, match="10 items"):
        evaluate_revisited(np.zeros((3, 9)), gt)
    with pytest.raises(ValueError, match="repeats"):
        evaluate_revisited(np.zeros((3, 10), dtype=np.int64), gt)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        evaluate_revisited(HAND_RANKS + 1, gt)
    with pytest.raises(ValueError, match="ks"):
        evaluate_revisited(HAND_RANKS, gt, ks=(0,))
    with pytest.raises(ValueError, match="variant"):
        evaluate_revisited(HAND_RANKS, gt, variant="voc")
    with pytest.raises(ValueError, match="kind"):
        evaluate_revisited(HAND_RANKS, gt, kind="sims")
    with pytest.raises(ValueError, match="gnd must be"):
        evaluate_revisited(HAND_RANKS, {"gnd": HAND_GND})
    with pytest.raises(ValueError, match="NaN"):
        evaluate_revisited(np.full((3, 10), np.nan), gt)
    with pytest.raises(ValueError, match=r"gnd\[0\]\['hard'\].*outside the database \[0, 5\)"):
        evaluate_revisited(np.zeros((3, 5)), HAND_GND)  # a list of entries: the score matrix fixes num_db


def test_average_precision_bad_inputs():
    with pytest.raises(ValueError, match="num_positives"):
        average_precision([0], 0)
    with pytest.raises(ValueError, match="distinct"):
        average_precision([1, 1], 3)
    with pytest.raises(ValueError, match="num_positives=1"):
        average_precision([0, 1], 1)
    with pytest.raises(ValueError, match="dtype"):
        average_precision([0.5], 1)
    with pytest.raises(ValueError, match="variant"):
        average_precision([0], 1, variant="11-point")
    with pytest.raises(ValueError, match="k must"):
        precision_at_k([0], 0, 1)


# --- place recognition ------------------------------------------------------------------------------------------

DB_POS = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0], [300.0, 0.0], [400.0, 0.0]])
Q_POS = np.array([[5.0, 0.0], [210.0, 0.0], [1000.0, 1000.0], [400.0, 25.0]])  # q2 far from all: skipped
VPR_RANKS = np.array([[1, 0, 2, 3, 4],  # q0: first hit (db0) at rank 2
                      [2, 0, 1, 3, 4],  # q1: hit at rank 1
                      [0, 1, 2, 3, 4],
                      [0, 1, 2, 3, 4]])  # q3: db4 at exactly 25 m, rank 5


def test_recall_at_n_hand_made():
    res = recall_at_n(VPR_RANKS, Q_POS, DB_POS, ns=(1, 2, 5), threshold=25.0, percent=False)
    assert res == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@5": pytest.approx(1.0),
                   "queries": 3, "skipped": 1}
    strict = recall_at_n(VPR_RANKS, Q_POS, DB_POS, ns=(1, 5), threshold=24.9)  # q3 now skipped too
    assert strict == {"R@1": pytest.approx(50.0), "R@5": pytest.approx(100.0), "queries": 2, "skipped": 2}
    scores = np.zeros(VPR_RANKS.shape)
    np.put_along_axis(scores, VPR_RANKS, np.arange(5, 0, -1, dtype=float)[None].repeat(4, 0), axis=1)
    assert recall_at_n(scores, Q_POS, DB_POS, ns=(1, 2, 5)) == recall_at_n(VPR_RANKS, Q_POS, DB_POS, ns=(1, 2, 5))
    assert recall_at_n(VPR_RANKS[:, :2], Q_POS, DB_POS, ns=(1, 2))["R@2"] == pytest.approx(200 / 3)


def test_recall_at_n_bad_inputs():
    with pytest.raises(ValueError, match="query_positions"):
        recall_at_n(VPR_RANKS, Q_POS[:, :1], DB_POS)
    with pytest.raises(ValueError, match="db_positions"):
        recall_at_n(VPR_RANKS, Q_POS, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="4 rows but query_positions has 3"):
        recall_at_n(VPR_RANKS, Q_POS[:3], DB_POS, ns=(1,))
    with pytest.raises(ValueError, match="threshold"):
        recall_at_n(VPR_RANKS, Q_POS, DB_POS, ns=(1,), threshold=0)
    with pytest.raises(ValueError, match="ns"):
        recall_at_n(VPR_RANKS, Q_POS, DB_POS, ns=(1, 10))
    with pytest.raises(ValueError, match="fewer than max"):
        recall_at_n(VPR_RANKS[:, :2], Q_POS, DB_POS, ns=(1, 5))
    with pytest.raises(ValueError, match="no query has a database image within"):
        recall_at_n(VPR_RANKS, Q_POS, DB_POS + 1e4, ns=(1,))


def test_parse_utm_from_filename():
    name = "@0543256.96@4178906.53@10@S@037.75683@-122.50737@abcdEF@@@@@201311@@.jpg"
    assert parse_utm_from_filename(name) == (543256.96, 4178906.53)
    assert parse_utm_from_filename(f"/data/sf_xl/test/database/{name}") == (543256.96, 4178906.53)
    assert positions_from_filenames([name, "@1@2@.png"]).tolist() == [[543256.96, 4178906.53], [1.0, 2.0]]
    with pytest.raises(ValueError, match="convention"):
        parse_utm_from_filename("img_0001.jpg")
    with pytest.raises(ValueError, match="cannot read"):
        parse_utm_from_filename("@east@north@10@S@.jpg")
    with pytest.raises(ValueError, match="empty"):
        positions_from_filenames([])


def test_load_utm_csv(tmp_path):
    good = tmp_path / "db.csv"
    good.write_text("name,utm_east,utm_north,extra\nx.jpg,543256.96,4178906.53,1\ny.jpg,10,20,2\n")
    names, pos = load_utm_csv(good)
    assert names == ["x.jpg", "y.jpg"] and pos.tolist() == [[543256.96, 4178906.53], [10.0, 20.0]]
    latlon = tmp_path / "ll.csv"
    latlon.write_text("name,lat,lon\nx.jpg,37.7,-122.5\n")
    with pytest.raises(ValueError, match="latitude/longitude.*UTM"):
        load_utm_csv(latlon)
    other = tmp_path / "o.csv"
    other.write_text("file,east\nx,1\n")
    with pytest.raises(ValueError, match="name,utm_east,utm_north"):
        load_utm_csv(other)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,utm_east,utm_north\nx,1,oops\n")
    with pytest.raises(ValueError, match="line 2"):
        load_utm_csv(bad)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_utm_csv(tmp_path / "nope.csv")


# --- k-NN search ------------------------------------------------------------------------------------------------

@needs_faiss
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_knn_torch_equals_faiss(rng, metric):
    q = rng.standard_normal((37, 16)).astype(np.float32)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    s_f, i_f = knn(q, x, k=10, metric=metric, engine="faiss")
    s_t, i_t = knn(q, x, k=10, metric=metric, engine="torch", chunk_size=8)
    assert np.array_equal(i_f, i_t)
    assert np.allclose(s_f, s_t, rtol=1e-4, atol=1e-4)
    s_a, i_a = knn(q, x, k=10, metric=metric)  # auto -> faiss
    assert np.array_equal(i_a, i_f)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_knn_torch_matches_brute_force_and_chunking(rng, metric):
    q = rng.standard_normal((23, 8))
    x = rng.standard_normal((50, 8))
    full = q @ x.T if metric == "ip" else ((q[:, None] - x[None]) ** 2).sum(-1)
    ref_idx = np.argsort(-full if metric == "ip" else full, axis=1)[:, :5]
    for chunk in (1, 7, 1000):
        s, i = knn(q, x, k=5, metric=metric, engine="torch", chunk_size=chunk)
        assert np.array_equal(i, ref_idx) and s.dtype == np.float64
        assert np.allclose(s, np.take_along_axis(full, ref_idx, 1))
    s_t, i_t = knn(torch.from_numpy(q).float(), torch.from_numpy(x), k=5, metric=metric, engine="torch")
    assert isinstance(i_t, torch.Tensor) and i_t.dtype == torch.long and torch.equal(i_t, torch.from_numpy(ref_idx))


def test_knn_without_faiss_falls_back(rng, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    q, x = rng.standard_normal((4, 3)), rng.standard_normal((9, 3))
    s, i = knn(q, x, k=3)
    assert i.shape == (4, 3) and s.shape == (4, 3)
    with pytest.raises(ImportError, match="faiss-cpu"):
        knn(q, x, k=3, engine="faiss")


def test_knn_bad_inputs(rng):
    q, x = rng.standard_normal((4, 3)), rng.standard_normal((9, 3))
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(9, 3\)"):
        knn(rng.standard_normal((4, 5)), x, k=1)
    with pytest.raises(ValueError, match="queries is empty"):
        knn(np.zeros((0, 3)), x, k=1)
    with pytest.raises(ValueError, match="database is empty"):
        knn(q, np.zeros((0, 3)), k=1)
    with pytest.raises(ValueError, match="queries must be 2-D"):
        knn(q[0], x, k=1)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 9\]"):
        knn(q, x, k=10)
    with pytest.raises(ValueError, match="k must"):
        knn(q, x, k=0)
    with pytest.raises(ValueError, match="metric"):
        knn(q, x, k=1, metric="cos")
    with pytest.raises(ValueError, match="engine"):
        knn(q, x, k=1, engine="annoy")
    with pytest.raises(ValueError, match="chunk_size"):
        knn(q, x, k=1, engine="torch", chunk_size=0)
    with pytest.raises(ValueError, match="numpy array or a torch tensor"):
        knn([[1.0, 2.0, 3.0]], x, k=1)
