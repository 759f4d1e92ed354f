"""The authors' signals (class_share, mix_share), their low-pass filter (lfm) and imported targets, against
independent float64 numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unidd_ray.spectral import EMU, Moments, Targets, batch_statistics, make_filter, unidd_layer_loss


def _features(seed=0, n=12, c=5, h=3, w=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 2, 3, 0, 2, 3, 3, 0, 2, 2, 0][:n])
    probs = torch.softmax(torch.randn(n, 6, generator=g, dtype=torch.float64), 1)
    return x, labels, probs


def test_batch_share_signals_are_the_sums_over_the_batch_divided_by_its_size_over_all_classes():
    x, labels, probs = _features()
    pooled = x.numpy().mean((2, 3))  # (N, C)
    onehot = np.eye(6)[labels.numpy()]
    st = batch_statistics(x, labels, signal="class_share", num_classes=6)
    assert st.columns.tolist() == list(range(6))  # every class, absent ones (1, 4, 5) as zero columns
    np.testing.assert_allclose(st.signal.numpy(), pooled.T @ onehot / len(x), rtol=1e-13, atol=1e-15)
    assert np.all(st.signal.numpy()[:, [1, 4, 5]] == 0)
    st = batch_statistics(x, labels, signal="mix_share", probs=probs, num_classes=6)
    np.testing.assert_allclose(st.signal.numpy(), pooled.T @ probs.numpy() / len(x), rtol=1e-13)
    # ours, for contrast: the class means over the classes present
    st = batch_statistics(x, labels, signal="class", num_classes=6)
    assert st.columns.tolist() == [0, 2, 3]
    np.testing.assert_allclose(st.signal.numpy()[:, 0], pooled[labels.numpy() == 0].mean(0), rtol=1e-13)


def test_real_share_signals_weight_each_class_mean_by_its_share_of_the_images():
    x, labels, probs = _features()
    m = Moments(5, 6).update(x[:7], labels[:7], probs[:7]).update(x[7:], labels[7:], probs[7:])
    pooled = x.numpy().mean((2, 3))
    n = len(x)
    expected = np.stack([pooled[labels.numpy() == k].sum(0) / n for k in range(6)], 1)
    np.testing.assert_allclose(m.signal("class_share").numpy(), expected, rtol=1e-13, atol=1e-16)
    counts = np.bincount(labels.numpy(), minlength=6)
    means = m.signal("class").numpy()
    np.testing.assert_allclose(means[:, counts > 0] * counts[counts > 0] / n, expected[:, counts > 0], rtol=1e-13)
    np.testing.assert_allclose(m.signal("mix_share").numpy(), pooled.T @ probs.numpy() / n, rtol=1e-13)
    with pytest.raises(ValueError, match="per_batch covariance"):
        m.covariance("per_batch")


def test_lfm_filters_both_terms_with_the_covariance():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    real_cov, syn_cov = a.T @ a / 7, b.T @ b / 9
    real_sig, syn_sig = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g,
                                                                                         dtype=torch.float64)
    f_loss, s_loss = unidd_layer_loss(make_filter("lfm"), real_cov, real_sig, syn_cov, syn_sig, cache=None)
    rc, sc, rs, ss = (t.numpy() for t in (real_cov, syn_cov, real_sig, syn_sig))
    assert float(f_loss) == pytest.approx(np.linalg.norm(rc - sc), rel=1e-13)
    assert float(s_loss) == pytest.approx(np.linalg.norm(rc @ rs - sc @ ss), rel=1e-13)
    # dc, for contrast, leaves the signal unfiltered
    _, dc_signal = unidd_layer_loss(make_filter("dc"), real_cov, real_sig, syn_cov, syn_sig, cache=None)
    assert float(dc_signal) == pytest.approx(np.linalg.norm(rs - ss), rel=1e-13)


def test_the_emu_averages_share_signals_over_every_batch_with_equal_weights():
    # the authors' EMU: s_t = (1 - 1/t) s̄ + (1/t) ŝ over all K columns, a class absent from a batch adding zeros
    batches = [_features(seed) for seed in range(3)]
    emu = EMU({"l": (5, 6)})
    shares = []
    for x, labels, _ in batches:
        st = batch_statistics(x[:5] if len(shares) == 1 else x, labels[:5] if len(shares) == 1 else labels,
                              signal="class_share", num_classes=6)
        shares.append(st.signal)
        emu.commit("l", st.covariance, st.signal, st.columns)
    emu.synchronise()
    current = torch.zeros(5, 6, dtype=torch.float64)
    _, mixed = emu.mix("l", torch.eye(5, dtype=torch.float64), current, torch.arange(6))
    np.testing.assert_allclose(mixed.numpy(), (sum(s.numpy() for s in shares) + 0) / 4, rtol=1e-13)


def test_targets_refuse_what_they_cannot_serve_and_inconsistent_shapes():
    t = Targets(per_batch=torch.eye(3), second_moment=None, mean=torch.zeros(3))
    assert t.serves() == {"covariance": ["per_batch"], "signal": ["mean"]}
    with pytest.raises(ValueError, match="cannot serve the 'total' covariance"):
        t.covariance("total")
    with pytest.raises(ValueError, match="cannot serve the 'class_share' signal"):
        t.signal("class_share")
    with pytest.raises(ValueError, match="must be 3 x 3"):
        Targets(per_batch=torch.eye(4), second_moment=None, mean=torch.zeros(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Targets(per_batch=torch.full((3, 3), float("nan")), second_moment=None, mean=torch.zeros(3))
