"""The folder + pairs-CSV retrieval format: loader, evaluation (self-exclusion, standard AP, recall@k), chance level."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from aggnets.retrieval import PairsGroundTruth, chance_level, evaluate_pairs, load_pairs_csv, pairs_per_query


def _gt(n: int, queries, positives) -> PairsGroundTruth:
    return PairsGroundTruth(root=".", names=[f"{i}.png" for i in range(n)], queries=np.asarray(queries),
                            positives=[np.asarray(p) for p in positives])


# ---- evaluation ------------------------------------------------------------------------------------------------

def test_hand_made_ap_with_self_exclusion():
    gt = _gt(5, [0, 3], [[2, 4], [1]])
    scores = np.array([[0.99, 0.8, 0.9, 0.1, 0.5],   # self first; then 2 (pos), 1, 4 (pos), 3
                       [0.7, 0.2, 0.6, 1.0, 0.3]])   # self first; then 0, 2, 4, 1 (pos)
    # query 0: positives at 0-based positions 0 and 2 once itself is removed -> AP = (1/1 + 2/3) / 2 = 5/6
    #          (had the query stayed in the list: positions 1 and 3 -> (1/2 + 2/4) / 2 = 1/2)
    # query 1: its positive at position 3 -> AP = 1/4
    aps, hits = pairs_per_query(scores, gt, ks=(1, 3, 4))
    np.testing.assert_allclose(aps, [5 / 6, 1 / 4])
    np.testing.assert_array_equal(hits, [[1, 1, 1], [0, 0, 1]])
    result = evaluate_pairs(scores, gt, ks=(1, 3, 4))
    assert result["mAP"] == pytest.approx(100 * (5 / 6 + 1 / 4) / 2)
    assert result["R@1"] == pytest.approx(50) and result["R@3"] == pytest.approx(50)
    assert result["R@4"] == pytest.approx(100)
    assert result["queries"] == 2 and result["db"] == 5
    fractions = evaluate_pairs(torch.tensor(scores), gt, ks=(1,), percent=False)
    assert fractions["mAP"] == pytest.approx(13 / 24) and fractions["R@1"] == pytest.approx(0.5)


def test_rankings_with_or_without_the_query_and_partial():
    gt = _gt(5, [0, 3], [[2, 4], [1]])
    with_self = np.array([[0, 2, 1, 4, 3], [3, 0, 2, 4, 1]])
    without_self = np.array([[2, 1, 4, 3], [0, 2, 4, 1]])
    for ranks in (with_self, without_self):
        aps, _ = pairs_per_query(ranks, gt)
        np.testing.assert_allclose(aps, [5 / 6, 1 / 4])
    # partial ranking (top 2): query 0 finds only positive 2 -> AP 1/2; query 1 finds nothing -> 0
    aps, hits = pairs_per_query(np.array([[2, 1], [0, 2]]), gt, ks=(1, 5))
    np.testing.assert_allclose(aps, [0.5, 0.0])
    np.testing.assert_array_equal(hits, [[1, 1], [0, 0]])


def _loop_ap(score_row: np.ndarray, query: int, positives: set[int]) -> tuple[float, int]:
    """Independent reference: walk the ranking, skip the query, average the precision at each positive."""
    order = sorted(range(len(score_row)), key=lambda j: (-score_row[j], j))
    found, precision_sum, rank, first = 0, 0.0, 0, None
    for j in order:
        if j == query:
            continue
        rank += 1
        if j in positives:
            found += 1
            precision_sum += found / rank
            first = rank if first is None else first
    return precision_sum / len(positives), first


def test_matches_an_independent_loop():
    rng = np.random.default_rng(0)
    n, q = 40, 15
    queries = rng.choice(n, q, replace=False)
    positives = [rng.choice(np.setdiff1d(np.arange(n), [qi]), rng.integers(1, 6), replace=False) for qi in queries]
    gt = _gt(n, queries, positives)
    scores = rng.normal(size=(q, n))
    scores[np.arange(q), queries] += 3.0  # the query resembles itself: must not count
    result = evaluate_pairs(scores, gt, ks=(1, 5, 10), percent=False)
    reference = [_loop_ap(scores[i], queries[i], set(positives[i].tolist())) for i in range(q)]
    assert result["mAP"] == pytest.approx(np.mean([ap for ap, _ in reference]), abs=1e-12)
    for k in (1, 5, 10):
        assert result[f"R@{k}"] == pytest.approx(np.mean([first <= k for _, first in reference]), abs=1e-12)


def test_chance_level_equals_the_mean_over_all_rankings():
    gt = _gt(6, [0, 1, 5], [[1], [0, 2, 3], [2, 4]])
    ks = (1, 2, 4)
    expected_ap, expected_hits = np.zeros(3), np.zeros((3, len(ks)))
    orders = list(itertools.permutations(range(6)))
    for order in orders:
        ranks = np.tile(np.array(order), (3, 1))
        aps, hits = pairs_per_query(ranks, gt, ks=ks)
        expected_ap += aps / len(orders)
        expected_hits += hits / len(orders)
    chance = chance_level(gt, ks=ks, percent=False)
    assert chance["mAP"] == pytest.approx(expected_ap.mean(), abs=1e-12)
    for j, k in enumerate(ks):
        assert chance[f"R@{k}"] == pytest.approx(expected_hits[:, j].mean(), abs=1e-12)
    one_positive = chance_level(_gt(37, [0], [[1]]), ks=(1,), percent=False)
    assert one_positive["mAP"] == pytest.approx(sum(1 / r for r in range(1, 37)) / 36)
    assert one_positive["R@1"] == pytest.approx(1 / 36)


def test_shape_and_ground_truth_errors():
    gt = _gt(5, [0, 3], [[2, 4], [1]])
    with pytest.raises(ValueError, match=r"\(2, 6\).*5 database"):
        evaluate_pairs(np.zeros((2, 6)), gt)
    with pytest.raises(ValueError, match=r"\(3, 5\).*2 queries"):
        evaluate_pairs(np.zeros((3, 5)), gt)
    with pytest.raises(ValueError, match="transposed"):
        evaluate_pairs(np.zeros((5, 2)), gt)
    with pytest.raises(ValueError, match="2-D"):
        evaluate_pairs(np.zeros(5), gt)
    with pytest.raises(ValueError, match="lists itself"):
        evaluate_pairs(np.zeros((1, 5)), _gt(5, [0], [[0, 1]]))
    with pytest.raises(ValueError, match="no positive"):
        evaluate_pairs(np.zeros((1, 5)), _gt(5, [0], [[]]))
    with pytest.raises(ValueError, match="ks"):
        evaluate_pairs(np.zeros((2, 5)), gt, ks=(0,))


# ---- CSV loader ------------------------------------------------------------------------------------------------

def _png(path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (value, 0, 0)).save(path, format="PNG")


@pytest.fixture
def image_folder(tmp_path):
    for name in ("a/one.png", "a/two.PNG", "b/three.png", "four.png", "sub/deep/five.png"):
        _png(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def _write(path, text: str):
    path.write_text(text)
    return path


def test_load_pairs_csv(image_folder):
    csv_path = _write(image_folder / "pairs.csv", "query,positive\n./a/one.png,b/three.png\na/two.PNG,four.png\n"
                      "a/one.png,sub/deep/five.png\n\nb/three.png,a/one.png\n")
    gt = load_pairs_csv(csv_path)
    assert gt.root == str(image_folder)
    assert gt.names == ["a/one.png", "a/two.PNG", "b/three.png", "four.png", "sub/deep/five.png"]
    assert [gt.names[q] for q in gt.queries] == ["a/one.png", "a/two.PNG", "b/three.png"]  # CSV order
    assert [[gt.names[p] for p in ps] for ps in gt.positives] == [["b/three.png", "sub/deep/five.png"],
                                                                  ["four.png"], ["a/one.png"]]
    assert gt.num_queries == 3 and gt.num_db == 5
    assert all(path.endswith(name) for path, name in zip(gt.paths, gt.names))
    # extra columns are fine; a given database restricts the distractors; an explicit root
    other = _write(image_folder / "elsewhere.csv", "id,query,positive\n1,a/one.png,four.png\n")
    gt = load_pairs_csv(other, root=image_folder, database=["four.png", "a/one.png", "b/three.png"])
    assert gt.names == ["a/one.png", "b/three.png", "four.png"]
    assert gt.queries.tolist() == [0] and gt.positives[0].tolist() == [2]


def test_load_pairs_csv_errors(image_folder):
    with pytest.raises(FileNotFoundError, match="pairs CSV not found"):
        load_pairs_csv(image_folder / "absent.csv")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['positive'\]"):
        load_pairs_csv(_write(image_folder / "c1.csv", "query,match\na/one.png,four.png\n"))
    missing = "".join(f"a/one.png,gone{i}.png\n" for i in range(7))
    with pytest.raises(FileNotFoundError, match=r"7 image\(s\) named in the CSV are missing.*gone0\.png.*\.\.\."):
        load_pairs_csv(_write(image_folder / "c2.csv", "query,positive\n" + missing))
    with pytest.raises(ValueError, match=r"1 query\(ies\) with no positive.*four\.png"):
        load_pairs_csv(_write(image_folder / "c3.csv", "query,positive\na/one.png,b/three.png\nfour.png,\n"))
    with pytest.raises(ValueError, match="no query"):
        load_pairs_csv(_write(image_folder / "c4.csv", "query,positive\n"))
    with pytest.raises(ValueError, match="paired with itself"):
        load_pairs_csv(_write(image_folder / "c5.csv", "query,positive\nfour.png,./four.png\n"))
    with pytest.raises(ValueError, match="not in the database"):
        load_pairs_csv(_write(image_folder / "c6.csv", "query,positive\nfour.png,notes.txt\n"))
    with pytest.raises(ValueError, match="not in the database"):
        load_pairs_csv(image_folder / "c6.csv", database=["a/one.png"])
    with pytest.raises(FileNotFoundError, match="database image"):
        load_pairs_csv(_write(image_folder / "c7.csv", "query,positive\nfour.png,a/one.png\n"),
                       database=["four.png", "a/one.png", "nope.png"])
    with pytest.raises(FileNotFoundError, match="root folder"):
        load_pairs_csv(image_folder / "c7.csv", root=image_folder / "nowhere")


def test_loader_and_evaluation_end_to_end(image_folder):
    gt = load_pairs_csv(_write(image_folder / "pairs.csv", "query,positive\na/one.png,four.png\nfour.png,a/one.png\n"))
    # descriptors: one.png and four.png identical, the rest orthogonal -> perfect retrieval
    descriptors = np.eye(5)
    descriptors[gt.names.index("four.png")] = descriptors[gt.names.index("a/one.png")]
    scores = descriptors[gt.queries] @ descriptors.T
    result = evaluate_pairs(scores, gt)
    assert result["mAP"] == pytest.approx(100) and result["R@1"] == pytest.approx(100)
    assert math.isclose(chance_level(gt)["mAP"], 100 * sum(1 / r for r in range(1, 5)) / 4)
