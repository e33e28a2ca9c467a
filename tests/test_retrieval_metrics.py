import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from e2_eval import (FaissIndex, RetrievalRecall, cross_modal_retrieval, recall_at_k, sample_negatives,
                     sampled_retrieval, topk_indices)

# ---------------------------------------------------------------------------------------------------------
# Independent numpy references: the whole similarity matrix at once, ranked with a stable argsort on -score
# (so on equal scores the lower gallery index comes first).


def ref_ranking(queries, gallery):
    scores = queries.numpy().astype(np.float64) @ gallery.numpy().astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")


def ref_recall(queries, gallery, positive_sets, ks):
    ranking = ref_ranking(queries, gallery)
    return {k: 100.0 * np.mean([len(set(ranking[i, :k].tolist()) & set(p)) > 0 for i, p in enumerate(positive_sets)])
            for k in ks}


def ref_sampled(queries, gallery, candidates, ks):
    q, g = queries.numpy().astype(np.float64), gallery.numpy().astype(np.float64)
    ranks = []
    for i, cand in enumerate(candidates.numpy()):
        scores = g[cand] @ q[i]
        ranks.append(int(np.sum(scores[1:] >= scores[0])))   # pessimistic: ties go to the negatives
    ranks = np.array(ranks)
    return {k: 100.0 * np.mean(ranks < k) for k in ks}


# ---------------------------------------------------------------------------------------------------------
# Data.


def gaussian_unit(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


def paired(n, d, seed, noise=2.0, dtype=torch.float32):
    """Images and texts of n items, text i = image i + noise, so recall is neither 0 nor 100."""
    images = gaussian_unit(n, d, seed, torch.float64)
    g = torch.Generator().manual_seed(seed + 1000)
    texts = F.normalize(images + noise * torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d), dim=1)
    return images.to(dtype), texts.to(dtype)


def quarter_vectors(n, d, seed):
    """Unit vectors with four entries of +-1/2 and the rest 0: every dot product is an exact multiple of
    1/4 in float32, so there are many exact ties and no rounding anywhere."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, d), dtype=np.float32)
    for row in x:
        row[rng.choice(d, size=4, replace=False)] = rng.choice([-0.5, 0.5], size=4)
    return torch.from_numpy(x)


def all_equal(n, d=4):
    x = torch.zeros(n, d)
    x[:, 0] = 1.0
    return x


def angles(*degrees):
    r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([r.cos(), r.sin()], dim=1)


# ---------------------------------------------------------------------------------------------------------
# topk_indices


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_queries, num_gallery, chunk_size", [(60, 150, 7), (113, 301, 64), (113, 301, 4096)])
def test_topk_matches_reference_with_exact_ties(seed, num_queries, num_gallery, chunk_size):
    queries, gallery = quarter_vectors(num_queries, 12, seed), quarter_vectors(num_gallery, 12, seed + 10)
    ranking = ref_ranking(queries, gallery)
    assert len(np.unique(queries.numpy() @ gallery.numpy().T)) <= 9     # heavy ties are really there
    for k in (1, 10, num_gallery):
        got = topk_indices(queries, gallery, k, chunk_size=chunk_size)
        assert got.dtype == torch.long and got.shape == (num_queries, k)
        np.testing.assert_array_equal(got.numpy(), ranking[:, :k])


@pytest.mark.parametrize("seed", [3, 4])
def test_topk_matches_reference_on_gaussian_features(seed):
    queries, gallery = gaussian_unit(150, 32, seed, torch.float64), gaussian_unit(280, 32, seed + 1, torch.float64)
    ranking = ref_ranking(queries, gallery)
    for chunk_size in (13, 4096):
        np.testing.assert_array_equal(topk_indices(queries, gallery, 10, chunk_size=chunk_size).numpy(),
                                      ranking[:, :10])


@pytest.mark.parametrize("chunk_size", [32, 96, 200, 800])
def test_topk_screened_chunks_match_reference(chunk_size):
    # Chunks of 8 columns or more are screened group by group, with a remainder taken whole; from
    # 64·k columns on, a chunk's own bound comes from sets of groups.
    for seed, (queries, gallery) in enumerate([(quarter_vectors(70, 8, 7), quarter_vectors(900, 8, 8)),
                                               (gaussian_unit(70, 16, 9), gaussian_unit(900, 16, 10))]):
        ranking = ref_ranking(queries, gallery)
        for k in (1, 10, 40, 500):
            np.testing.assert_array_equal(topk_indices(queries, gallery, k, chunk_size=chunk_size).numpy(),
                                          ranking[:, :k], err_msg=f"data {seed}, k={k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_ranks_by_score_then_lower_index(dtype):
    # Candidates arrive in any order; -0.0 and 0.0 are one score, so the lower index of the two wins.
    from e2_eval.topk import _select_topk
    values = torch.tensor([[0.0, -0.0, 0.5, -1.0, 0.5, -0.0], [-2.0, -3.0, -2.0, -math.inf, -2.0, -1.0]], dtype=dtype)
    indices = torch.tensor([[9, 4, 70, 2, 8, 5], [6, 5, 3, 0, 1, 2**32 - 2]])
    top_values, top_indices = _select_topk(values, indices, 4)
    assert top_indices.tolist() == [[8, 70, 4, 5], [2**32 - 2, 1, 3, 6]]
    assert top_values.dtype == dtype and top_values.tolist() == [[0.5, 0.5, 0.0, 0.0], [-1.0, -2.0, -2.0, -2.0]]


def test_features_that_require_grad_are_scored_as_they_are():
    # What an encoder returns outside torch.no_grad: searching it must not fail on the autograd graph.
    images, texts = paired(40, 16, 13)
    expected_top = topk_indices(texts, images, 5, chunk_size=16)
    expected_full, expected_sampled = cross_modal_retrieval(images, texts), sampled_retrieval(
        images, texts, groups=[i % 2 for i in range(40)], num_negatives=5)
    images, texts = images.clone().requires_grad_(), (texts * 1.0).requires_grad_()
    assert torch.equal(topk_indices(texts, images, 5, chunk_size=16), expected_top)
    assert cross_modal_retrieval(images, texts) == expected_full
    assert sampled_retrieval(images, texts, groups=[i % 2 for i in range(40)], num_negatives=5) == expected_sampled

def test_topk_reads_a_memory_mapped_gallery(tmp_path):
    queries, gallery = quarter_vectors(30, 12, 11), quarter_vectors(500, 12, 12)
    np.save(tmp_path / "gallery.npy", gallery.numpy().astype(np.float16))
    mapped = np.load(tmp_path / "gallery.npy", mmap_mode="r")
    assert torch.equal(topk_indices(queries, mapped, 10, chunk_size=64), topk_indices(queries, gallery, 10))
    mapped = np.array(mapped)
    mapped[300, 2] = np.nan
    with pytest.raises(ValueError, match="gallery rows 256:320 contains NaN"):
        topk_indices(queries, mapped, 10, chunk_size=64)
    with pytest.raises(ValueError, match="2-D float tensor or array"):
        topk_indices(queries, np.zeros((5, 12), dtype=np.int64), 10)


def test_topk_all_equal_scores_rank_lower_index_first_across_chunks():
    queries, gallery = all_equal(6), all_equal(10)
    expected = torch.arange(5).expand(6, 5)
    for chunk_size in (1, 3, 4, 100):
        assert torch.equal(topk_indices(queries, gallery, 5, chunk_size=chunk_size), expected)


def test_topk_every_item_a_candidate_stays_exact():
    # Each chunk scores all its items equal and above every earlier chunk: no group can be screened out.
    queries = all_equal(5)
    gallery = all_equal(300) * (torch.arange(300) // 64 + 1).float()[:, None]
    expected = torch.arange(256, 266).expand(5, 10)
    assert torch.equal(topk_indices(queries, gallery, 10, chunk_size=64), expected)


def test_topk_k_larger_than_gallery_is_clipped():
    gallery = angles(0, 90, 180, 45)
    got = topk_indices(angles(10), gallery, k=50, chunk_size=3)
    assert got.tolist() == [[0, 3, 1, 2]]
    assert topk_indices(all_equal(2), all_equal(4), k=50).tolist() == [[0, 1, 2, 3]] * 2


def test_topk_hand_made_angles():
    gallery = angles(0, 30, 90, 180)
    # query at 10 deg: distances 10, 20, 80, 170; at 100 deg: 100, 70, 10, 80
    assert topk_indices(angles(10, 100), gallery, k=4, chunk_size=1).tolist() == [[0, 1, 2, 3], [2, 1, 3, 0]]


def test_topk_half_precision_and_empty_queries():
    queries, gallery = quarter_vectors(20, 12, 5), quarter_vectors(30, 12, 6)
    expected = topk_indices(queries, gallery, 5)
    assert torch.equal(topk_indices(queries.half(), gallery.half(), 5, chunk_size=7), expected)
    assert topk_indices(queries[:0], gallery, 5).shape == (0, 5)


@pytest.mark.parametrize("call, message", [
    (lambda: topk_indices(torch.ones(2, 3), torch.ones(4, 5), 1), "dimension"),
    (lambda: topk_indices(torch.ones(2, 3), torch.ones(4, 3), 0), "k must be"),
    (lambda: topk_indices(torch.ones(2, 3), torch.ones(0, 3), 1), "gallery is empty"),
    (lambda: topk_indices(torch.ones(2, 3), torch.ones(4, 3), 1, chunk_size=0), "chunk_size"),
    (lambda: topk_indices(torch.full((2, 3), float("nan")), torch.ones(4, 3), 1), "NaN"),
    (lambda: topk_indices(torch.ones(2, 3, dtype=torch.long), torch.ones(4, 3), 1), "float tensor"),
])
def test_topk_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------------------
# recall_at_k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_reference_single_positive(seed):
    images, texts = paired(300, 16, seed)
    ks = (1, 5, 10, 50)
    got = recall_at_k(images, texts, torch.arange(300), ks, chunk_size=32)
    expected = ref_recall(images, texts, [[i] for i in range(300)], ks)
    assert got.keys() == expected.keys()
    for k in ks:
        assert got[k] == pytest.approx(expected[k], abs=1e-9)
    assert 0 < got[1] < got[50] < 100          # a non-trivial case


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_matches_reference_with_ties_and_multiple_positives(seed):
    queries, gallery = quarter_vectors(200, 12, seed), quarter_vectors(250, 12, seed + 20)
    rng = np.random.default_rng(seed)
    positives = [set(rng.choice(250, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(200)]
    ks = (1, 5, 10, 100)
    got = recall_at_k(queries, gallery, positives, ks, chunk_size=32)
    assert got == pytest.approx(ref_recall(queries, gallery, positives, ks), abs=1e-9)
    # with several positives recall can only go up compared with keeping the first one
    single = recall_at_k(queries, gallery, [[min(p)] for p in positives], ks, chunk_size=32)
    assert all(got[k] >= single[k] for k in ks) and got != single


def test_recall_multiple_positives_hand_made():
    gallery = angles(0, 30, 90, 180)
    queries = angles(10, 100)           # rankings [0, 1, 2, 3] and [2, 1, 3, 0]
    assert recall_at_k(queries, gallery, [{1, 3}, {0}], ks=(1, 2, 3, 4)) == {1: 0.0, 2: 50.0, 3: 50.0, 4: 100.0}
    assert recall_at_k(queries, gallery, [[3, 0], [1, 2]], ks=(1,)) == {1: 100.0}
    assert recall_at_k(queries, gallery, torch.tensor([1, 2]), ks=(1, 2)) == {1: 50.0, 2: 100.0}


def test_recall_tensor_positives_equal_list_positives():
    images, texts = paired(120, 16, 7)
    targets = torch.randint(0, 120, (120,), generator=torch.Generator().manual_seed(0))
    assert recall_at_k(images, texts, targets, chunk_size=7) == recall_at_k(images, texts, [[int(t)] for t in targets])


def test_recall_ties_count_only_within_the_tie_break():
    # every score equal: query i's positive i is in the top K exactly when i < K
    n = 20
    got = recall_at_k(all_equal(n), all_equal(n), torch.arange(n), ks=(1, 5, 10, 20, 50), chunk_size=3)
    assert got == {1: 5.0, 5: 25.0, 10: 50.0, 20: 100.0, 50: 100.0}


def test_recall_k_larger_than_gallery_means_whole_gallery():
    queries, gallery = gaussian_unit(9, 8, 0), gaussian_unit(4, 8, 1)
    positives = torch.tensor([3, 2, 1, 0, 3, 2, 1, 0, 3])
    got = recall_at_k(queries, gallery, positives, ks=(1, 4, 10, 1000))
    assert got[4] == got[10] == got[1000] == 100.0
    assert got[1] == pytest.approx(ref_recall(queries, gallery, [[int(p)] for p in positives], (1,))[1])


@pytest.mark.parametrize("positives, message", [
    (torch.tensor([0, 1]), "2 entries for 3 queries"),
    ([{0}, set(), {1}], "query 1 has no positive"),
    (torch.tensor([0, 1, 4]), "outside the gallery"),
    ([[0], [-1], [1]], "outside the gallery"),
    (torch.tensor([0.0, 1.0, 2.0]), "integer tensor"),
])
def test_recall_rejects_bad_positives(positives, message):
    with pytest.raises(ValueError, match=message):
        recall_at_k(torch.eye(3), torch.eye(4)[:, :3], positives)


def test_recall_rejects_bad_ks():
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(torch.eye(3), torch.eye(3), torch.arange(3), ks=(0, 5))


# ---------------------------------------------------------------------------------------------------------
# cross_modal_retrieval (full protocol)


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_modal_matches_reference(seed):
    images, texts = paired(250, 16, seed)
    got = cross_modal_retrieval(images, texts, chunk_size=32)
    diagonal = [[i] for i in range(250)]
    i2t, t2i = ref_recall(images, texts, diagonal, (1, 5, 10)), ref_recall(texts, images, diagonal, (1, 5, 10))
    assert got["i2t"] == pytest.approx(i2t) and got["t2i"] == pytest.approx(t2i)
    assert got["sumr"] == pytest.approx(sum(i2t.values()) + sum(t2i.values()))
    assert got["i2t"] != got["t2i"]            # the two directions really are computed separately


def test_cross_modal_perfect_and_all_tied():
    x = gaussian_unit(30, 16, 0)
    assert cross_modal_retrieval(x, x) == {"i2t": {1: 100.0, 5: 100.0, 10: 100.0},
                                           "t2i": {1: 100.0, 5: 100.0, 10: 100.0}, "sumr": 600.0}
    tied = cross_modal_retrieval(all_equal(20), all_equal(20), chunk_size=6)
    assert tied == {"i2t": {1: 5.0, 5: 25.0, 10: 50.0}, "t2i": {1: 5.0, 5: 25.0, 10: 50.0}, "sumr": 160.0}


def test_cross_modal_rejects_unpaired_input():
    with pytest.raises(ValueError, match="item i's image must match item i's text"):
        cross_modal_retrieval(torch.eye(3), torch.eye(4)[:, :3])


# ---------------------------------------------------------------------------------------------------------
# sample_negatives


def make_groups(n, seed):
    rng = np.random.default_rng(seed)
    return [["SHIRTS", "JEANS", "SNEAKERS"][g] for g in rng.integers(0, 3, size=n)]


def test_sample_negatives_same_group_distinct_never_self():
    groups = make_groups(300, 0)
    negatives = sample_negatives(groups, num_negatives=20, seed=0)
    assert negatives.dtype == torch.long and negatives.shape == (300, 20)
    for i, row in enumerate(negatives.tolist()):
        assert i not in row
        assert len(set(row)) == 20
        assert all(groups[j] == groups[i] for j in row)


def test_sample_negatives_is_deterministic_for_a_seed():
    groups = make_groups(200, 1)
    first = sample_negatives(groups, 10, seed=3)
    assert torch.equal(first, sample_negatives(groups, 10, seed=3))
    assert not torch.equal(first, sample_negatives(groups, 10, seed=4))


def test_sample_negatives_takes_the_whole_group_when_asked():
    groups = [0, 1, 0, 2, 1, 0, 2, 1, 0] * 3    # groups of 12, 9 and 6 items
    negatives = sample_negatives(torch.tensor(groups), num_negatives=5, seed=0)
    assert negatives.shape == (27, 5)
    small = [i for i, g in enumerate(groups) if g == 2]
    for i in small:                             # group 2 has exactly 5 other members: all of them, once
        assert sorted(negatives[i].tolist()) == [j for j in small if j != i]


def test_sample_negatives_rejects_a_too_small_group():
    groups = ["SHIRTS"] * 50 + ["TIES"] * 4 + ["JEANS"] * 30
    with pytest.raises(ValueError, match=r"group .TIES. has only 4 item\(s\).*10 negatives were asked for; ask for at most 3"):
        sample_negatives(groups, num_negatives=10)
    with pytest.raises(ValueError, match=r"group 'SCARF' has only 1 item\(s\).*drop or merge"):
        sample_negatives(groups + ["SCARF"], num_negatives=3)
    assert sample_negatives(groups, num_negatives=3).shape == (84, 3)


# ---------------------------------------------------------------------------------------------------------
# sampled_retrieval (sample-100 protocol)


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_retrieval_matches_reference(seed):
    images, texts = paired(300, 16, seed, noise=2.0)
    groups = make_groups(300, seed)
    ks = (1, 5, 10)
    got = sampled_retrieval(images, texts, groups, num_negatives=30, ks=ks, seed=seed, chunk_size=7)
    candidates = torch.cat([torch.arange(300)[:, None], sample_negatives(groups, 30, seed)], dim=1)
    i2t, t2i = ref_sampled(images, texts, candidates, ks), ref_sampled(texts, images, candidates, ks)
    assert got["i2t"] == pytest.approx(i2t) and got["t2i"] == pytest.approx(t2i)
    assert got["sumr"] == pytest.approx(sum(i2t.values()) + sum(t2i.values()))
    assert 0 < got["i2t"][1] < 100


def test_sampled_retrieval_matches_reference_with_exact_ties():
    images, texts = quarter_vectors(240, 12, 0), quarter_vectors(240, 12, 1)
    groups = [i % 4 for i in range(240)]
    got = sampled_retrieval(images, texts, groups, num_negatives=40, ks=(1, 5, 10, 41), seed=2, chunk_size=16)
    candidates = torch.cat([torch.arange(240)[:, None], sample_negatives(groups, 40, seed=2)], dim=1)
    assert got["i2t"] == pytest.approx(ref_sampled(images, texts, candidates, (1, 5, 10, 41)))
    assert got["t2i"] == pytest.approx(ref_sampled(texts, images, candidates, (1, 5, 10, 41)))
    assert got["i2t"][41] == 100.0


def test_sampled_retrieval_ties_go_to_the_negatives():
    # all 1 + 5 candidates score the same: the positive ranks last (rank 5), so it is found only at K >= 6
    got = sampled_retrieval(all_equal(12), all_equal(12), [0] * 6 + [1] * 6, num_negatives=5, ks=(1, 5, 6, 10))
    assert got == {"i2t": {1: 0.0, 5: 0.0, 6: 100.0, 10: 100.0}, "t2i": {1: 0.0, 5: 0.0, 6: 100.0, 10: 100.0},
                   "sumr": 400.0}


def test_sampled_retrieval_with_one_group_and_every_negative_equals_full_protocol():
    images, texts = paired(80, 16, 5, dtype=torch.float64)
    sampled = sampled_retrieval(images, texts, ["ALL"] * 80, num_negatives=79, ks=(1, 5, 10), chunk_size=9)
    full = cross_modal_retrieval(images, texts, ks=(1, 5, 10))
    assert sampled["i2t"] == pytest.approx(full["i2t"]) and sampled["t2i"] == pytest.approx(full["t2i"])
    assert 0 < full["i2t"][1] < 100


def test_sampled_retrieval_rejects_groups_of_the_wrong_length():
    with pytest.raises(ValueError, match="groups has 3 entries for 4 items"):
        sampled_retrieval(torch.eye(4), torch.eye(4), [0, 0, 0], num_negatives=1)


# ---------------------------------------------------------------------------------------------------------
# RetrievalRecall


def test_retrieval_recall_equals_functional_results():
    images, texts = paired(150, 16, 9)
    groups = make_groups(150, 9)
    metric = RetrievalRecall(ks=(1, 5, 10), chunk_size=16)
    for start in range(0, 150, 40):
        metric.update(images[start:start + 40].requires_grad_(), texts[start:start + 40])
    assert metric.compute() == cross_modal_retrieval(images, texts)
    assert metric.compute("sample", groups=groups, num_negatives=20, seed=1) == \
        sampled_retrieval(images, texts, groups, num_negatives=20, seed=1)
    assert metric.compute()["i2t"][1] < 100


def test_retrieval_recall_reset_and_errors():
    metric = RetrievalRecall(ks=(1,))
    metric.update(torch.eye(4), torch.eye(4))
    assert metric.compute() == {"i2t": {1: 100.0}, "t2i": {1: 100.0}, "sumr": 200.0}
    with pytest.raises(ValueError, match="needs groups"):
        metric.compute("sample")
    with pytest.raises(ValueError, match="protocol must be"):
        metric.compute("sample-100")
    metric.reset()
    with pytest.raises(ValueError, match="update"):
        metric.compute()
    metric.update(all_equal(4), all_equal(4))
    assert metric.compute()["sumr"] == 50.0          # only the new, tied features count
    with pytest.raises(ValueError, match="3 items but text_features has 2"):
        metric.update(torch.eye(3), torch.eye(3)[:2])


# ---------------------------------------------------------------------------------------------------------
# FaissIndex (optional dependency)


def test_faiss_index_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    with pytest.raises(ImportError, match=r"pip install 'e2-plugins\[faiss\]'"):
        FaissIndex(torch.eye(4), "Flat")


def test_faiss_index_exact_and_approximate():
    pytest.importorskip("faiss")
    queries, gallery = gaussian_unit(50, 16, 20), gaussian_unit(3000, 16, 21)
    exact = topk_indices(queries, gallery, 10)
    assert torch.equal(FaissIndex(gallery, "Flat").search(queries, 10), exact)
    index = FaissIndex(gallery.numpy(), "auto", nprobe=219, chunk_size=500)   # every list searched
    assert index.spec == "IVF219,Flat" and torch.equal(index.search(queries, 10), exact)
    assert FaissIndex(gallery, "HNSW16").search(queries, 10).shape == (50, 10)


def test_faiss_index_names_a_description_it_cannot_build_or_train():
    pytest.importorskip("faiss")
    gallery = gaussian_unit(300, 16, 22)
    with pytest.raises(ValueError, match=r"faiss cannot build 'nonsense' \(could not parse index string nonsense\)"):
        FaissIndex(gallery, "nonsense")
    with pytest.raises(ValueError, match=r"cannot train 'IVF4096,Flat' on 300 rows of the 300-item gallery \(Number of "
                                         r"training points \(300\) should be at least as large as number of clusters"):
        FaissIndex(gallery, "IVF4096,Flat")
