"""bconv's COP importance against the released code (ZJULearning/COP, prune_algorithm/prune_common.py).

The reference below transcribes the released NumPy code line for line, in its TensorFlow kernel layout
[kh, kw, in, out]; bconv must compute the same numbers on the same weights (docs/design.md §8).
"""

import numpy as np
import pytest
import torch

from bconv.prune.importance import Redundancy, similarity_matrix


def released_matrix(weights: np.ndarray, method: str) -> np.ndarray:
    """get_correlation / get_cosine_sim / get_inner_product: [kh, kw, in, out] -> [in, in]."""
    shape = weights.shape
    weights = np.reshape(weights, [shape[0] * shape[1], shape[2], shape[3]])
    if method == "pearson":
        feature_mean = np.mean(weights, axis=2, keepdims=True)
        feature_std = np.std(weights, axis=2, keepdims=True)
        feature = weights - feature_mean
        feature_t = np.transpose(feature, [0, 2, 1])
        feature_std_t = np.transpose(feature_std, [0, 2, 1])
        corr = np.matmul(feature, feature_t) / weights.shape[2] / (np.matmul(feature_std, feature_std_t) + 1e-8)
    elif method == "cosine":
        norm = np.linalg.norm(weights, ord=2, axis=2, keepdims=True)
        corr = np.matmul(weights, np.transpose(weights, [0, 2, 1])) / (np.matmul(norm, np.transpose(norm, [0, 2, 1])) + 1e-8)
    else:
        corr = np.matmul(weights, np.transpose(weights, [0, 2, 1]))
    return np.mean(np.abs(corr), axis=0)


def released_normalized(stat: np.ndarray, normalize: str) -> np.ndarray:
    """get_normalized_feature's normalisation: the normaliser is taken with a zero diagonal."""
    norm_func = {
        "max": lambda s: np.unique(s)[-1],
        "l1": lambda s: np.sum(np.abs(s)) / 2,
        "l2": lambda s: np.linalg.norm(s),
    }[normalize]
    tmp_stat = stat * (1 - np.eye(stat.shape[0]))
    return stat / norm_func(tmp_stat)


def released_redundancy(stat: np.ndarray, top_k: int) -> np.ndarray:
    """get_weights_importance's stat part: the top_k largest of each column, the largest (itself) left out."""
    mean_stat = np.sort(stat, axis=0)
    return np.mean(mean_stat[-top_k - 1 : -1], axis=0)


def consumer(seed: int = 0, out: int = 24, n: int = 10) -> torch.Tensor:
    """A fixed consumer kernel [out, n, 3, 3] with some correlated input channels, as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, 3, 3, generator=g, dtype=torch.float64)
    w[:, 4] = 0.7 * w[:, 1] + 0.3 * torch.randn(out, 3, 3, generator=g, dtype=torch.float64)
    w[:, 8] = -0.5 * w[:, 2] + 0.5 * torch.randn(out, 3, 3, generator=g, dtype=torch.float64)
    return w


def bconv_matrix_and_r(w: torch.Tensor, similarity: str, normalize: str, top_k: int = 3):
    taps = w.reshape(w.shape[0], w.shape[1], -1).permute(2, 0, 1)  # [taps, out, n]
    m = similarity_matrix(taps, similarity, normalize)
    return m.double().numpy(), Redundancy(m[None], top_k).mean


def tf_layout(w: torch.Tensor) -> np.ndarray:
    return w.permute(2, 3, 1, 0).numpy()  # [out, in, kh, kw] -> [kh, kw, in, out]


@pytest.mark.parametrize("similarity", ["pearson", "cosine", "inner"])
@pytest.mark.parametrize("normalize", ["max", "l1", "l2"])
def test_matrix_and_redundancy_match_the_released_formulas(similarity, normalize):
    w = consumer()
    stat = released_matrix(tf_layout(w), similarity)
    expected = released_normalized(stat, normalize)
    m, r = bconv_matrix_and_r(w, similarity, normalize)
    off = ~np.eye(len(stat), dtype=bool)
    np.testing.assert_allclose(m[off], expected[off], rtol=1e-5)
    # The released top-k leaves out each column's largest entry, meaning the diagonal (a channel with itself).
    # That holds for pearson and cosine (|corr| <= 1 = the diagonal); with inner products a channel's product
    # with a larger one can exceed its own norm, and there bconv takes the top-k of the other channels as
    # docs/design.md §8 says, where the released code would count the channel with itself.
    itself = np.argmax(stat, axis=0) == np.arange(len(stat))
    assert itself.all() or similarity == "inner"
    assert itself.sum() >= len(stat) - 2
    np.testing.assert_allclose(r[itself], released_redundancy(expected, 3)[itself], rtol=1e-5)


@pytest.mark.parametrize("normalize", ["max", "l1", "l2"])
def test_dead_channel_is_most_redundant_and_leaves_the_other_scores_as_released(normalize):
    w = consumer()
    w[:, 3] = 0.0  # channel 3 is dead: its consumer weights are constant
    stat = released_matrix(tf_layout(w), "pearson")
    released = released_redundancy(released_normalized(stat, normalize), 3)
    assert released[3] == 0.0  # the released code: unique, so never cut
    _, r = bconv_matrix_and_r(w, "pearson", normalize)
    others = np.arange(len(r)) != 3
    np.testing.assert_allclose(r[others], released[others], rtol=1e-5)
    assert r[3] == pytest.approx(1.0) and r[3] > r[others].max()


@pytest.mark.parametrize("taps, filters, n", [(1, 40, 513), (3, 24, 700), (1, 16, 1030), (2, 8, 300)])
def test_wide_similarity_in_strips_is_the_whole_product(taps, filters, n):
    # Wide consumers (ResNet-50's 2048-wide stream) compute each off-diagonal block once and mirror it.
    from bconv.prune.importance import mean_abs_similarity

    z = torch.randn(taps, filters, n, generator=torch.Generator().manual_seed(n))
    scale = z.norm(dim=1)
    whole = torch.bmm(z.transpose(1, 2), z)
    expected = (whole / filters / (scale.unsqueeze(2) * scale.unsqueeze(1) + 1e-8)).abs().mean(dim=0)
    torch.testing.assert_close(mean_abs_similarity(z, scale, filters), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean_abs_similarity(z, None, 1), whole.abs().mean(dim=0), rtol=1e-5, atol=1e-4)
    wide = torch.randn(1, filters, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    released = released_matrix(wide[0].t().reshape(1, 1, n, filters).numpy(), "pearson")
    off = ~np.eye(n, dtype=bool)
    np.testing.assert_allclose(similarity_matrix(wide, "pearson", "max").double().numpy()[off],
                               released_normalized(released, "max")[off], rtol=1e-5, atol=1e-6)
