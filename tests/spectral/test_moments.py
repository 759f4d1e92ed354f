"""Moments: shard- and order-invariant float64 statistics, checked against one-pass numpy."""

import numpy as np
import pytest
import torch

from unidd_ray.spectral import Moments, batch_statistics

C, K = 5, 4


def _data(seed=0, n=37, h=3, w=2):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, C, h, w, generator=g) * 3 + torch.arange(C).view(1, C, 1, 1)
    labels = torch.randint(0, K, (n,), generator=g)
    labels[:K] = torch.arange(K)  # every class present
    probs = torch.softmax(torch.randn(n, K, generator=g), 1)
    return feats, labels, probs


def _numpy_reference(feats, labels, probs):
    x = feats.double().numpy()
    n, c, h, w = x.shape
    pos = x.transpose(0, 2, 3, 1).reshape(-1, c)  # one row per spatial position
    pos_labels = np.repeat(labels.numpy(), h * w)
    mu = pos.mean(0)
    total = (pos - mu).T @ (pos - mu) / len(pos)
    within = np.zeros((c, c))
    for k in range(K):
        xk = pos[pos_labels == k]
        within += (xk - xk.mean(0)).T @ (xk - xk.mean(0))
    within /= len(pos)
    pooled = x.mean((2, 3))
    class_means = np.stack([pooled[labels.numpy() == k].mean(0) for k in range(K)])
    p = probs.double().numpy()
    soft = (p.T @ pooled) / p.sum(0)[:, None]
    return dict(count=len(pos), mean=mu, total=total, within=within, class_means=class_means, soft=soft)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def test_shards_merged_in_random_order_equal_one_pass_numpy():
    feats, labels, probs = _data()
    ref = _numpy_reference(feats, labels, probs)
    rng = np.random.default_rng(0)
    for trial in range(5):
        cuts = np.sort(rng.choice(np.arange(1, len(feats)), size=rng.integers(1, 8), replace=False))
        bounds = [0, *cuts.tolist(), len(feats)]
        shards = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            shards.append(Moments(C, K).update(feats[a:b], labels[a:b], probs[a:b]))
        order = rng.permutation(len(shards))
        merged = shards[order[0]]
        for i in order[1:]:
            merged = merged + shards[i]
        assert merged.count == ref["count"]
        assert merged.images == len(feats)
        assert _rel(merged.mean, ref["mean"]) <= 1e-12
        assert _rel(merged.covariance("total"), ref["total"]) <= 1e-12
        assert _rel(merged.covariance("within_class"), ref["within"]) <= 1e-12
        assert _rel(merged.class_means, ref["class_means"]) <= 1e-12
        assert _rel(merged.soft_means, ref["soft"]) <= 1e-12


def test_batch_size_does_not_change_the_result_beyond_rounding():
    feats, labels, probs = _data(seed=1, n=64)
    one = Moments(C, K).update(feats, labels, probs)
    many = Moments(C, K)
    for i in range(0, 64, 5):
        many.update(feats[i:i + 5], labels[i:i + 5], probs[i:i + 5])
    for f in Moments._FIELDS:
        assert _rel(getattr(one, f), getattr(many, f)) <= 1e-13, f


def test_signals_and_state_round_trip():
    feats, labels, probs = _data(seed=2)
    m = Moments(C, K).update(feats, labels, probs)
    assert m.signal("mean").shape == (C, 1)
    assert m.signal("class").shape == (C, K)
    torch.testing.assert_close(m.signal("class"), m.class_means.T)
    torch.testing.assert_close(m.signal("soft"), m.soft_means.T)
    again = Moments.from_state_dict(m.state_dict())
    assert again == m
    assert again is not m and again.sumsq.data_ptr() != m.sumsq.data_ptr()


def test_flat_features_and_empty_classes():
    m = Moments(3, 3).update(torch.randn(10, 3, dtype=torch.float64), torch.zeros(10, dtype=torch.long))
    assert m.count == 10
    assert torch.isnan(m.class_means[1:]).all()  # classes 1 and 2 never seen
    assert torch.isfinite(m.covariance("within_class")).all()


def test_batch_statistics_match_moments():
    feats, labels, probs = _data(seed=3)
    m = Moments(C, K).update(feats, labels, probs)
    stats = batch_statistics(feats.double(), labels, signal="class", num_classes=K)
    torch.testing.assert_close(stats.covariance, m.covariance("total"))
    torch.testing.assert_close(stats.signal, m.signal("class"))
    assert stats.columns.tolist() == list(range(K))
    soft = batch_statistics(feats.double(), labels, signal="soft", probs=probs.double(), num_classes=K)
    torch.testing.assert_close(soft.signal, m.signal("soft"))
    mean = batch_statistics(feats.double())
    torch.testing.assert_close(mean.signal, m.signal("mean"))


def test_batch_statistics_restrict_class_signal_to_present_classes():
    feats, _, _ = _data(seed=4, n=6)
    labels = torch.tensor([2, 2, 0, 0, 0, 2])
    stats = batch_statistics(feats.double(), labels, signal="class", num_classes=K)
    assert stats.columns.tolist() == [0, 2]
    expected = torch.stack([feats[labels == 0].double().mean((0, 2, 3)), feats[labels == 2].double().mean((0, 2, 3))], 1)
    torch.testing.assert_close(stats.signal, expected)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.update(torch.randn(4, C + 1, 2, 2), torch.zeros(4, dtype=torch.long)), "channels"),
        (lambda m: m.update(torch.full((4, C, 2, 2), float("nan")), torch.zeros(4, dtype=torch.long)), "NaN or Inf"),
        (lambda m: m.update(torch.full((4, C, 2, 2), float("inf")), torch.zeros(4, dtype=torch.long)), "NaN or Inf"),
        (lambda m: m.update(torch.randn(4, C, 2, 2), torch.tensor([0, 1, K, 0])), f"label {K} is out of range"),
        (lambda m: m.update(torch.randn(4, C, 2, 2), torch.tensor([0, -1, 0, 0])), "label -1 is out of range"),
        (lambda m: m.update(torch.randn(4, C, 2, 2), torch.zeros(3, dtype=torch.long)), "labels must have shape"),
        (lambda m: m.update(torch.randn(4, C, 2, 2), torch.zeros(4)), "integer class indices"),
        (lambda m: m.merge(Moments(C + 1, K)), "cannot merge"),
        (lambda m: m.covariance("spatial"), "unknown covariance mode"),
        (lambda m: m.signal("median"), "unknown signal"),
        (lambda m: m.update(torch.randn(4, C, 2, 2), torch.zeros(4, dtype=torch.long), torch.ones(4, K + 1)), "probs"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(call, message):
    m = Moments(C, K).update(torch.randn(2, C, 2, 2), torch.zeros(2, dtype=torch.long))
    before = m.copy()
    with pytest.raises(ValueError, match=message):
        call(m)
    assert m == before  # a refused update leaves the moments untouched


def test_empty_moments_refuse_statistics():
    with pytest.raises(ValueError, match="no samples"):
        Moments(C, K).covariance()
    with pytest.raises(ValueError, match="positive integer"):
        Moments(0, K)


@pytest.mark.parametrize("shape", [(5, 3, 4, 4), (5, 12, 2, 1)])  # H·W ≥ C (batched) and H·W < C (flattened)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])  # channels-last: one (N·H·W, C) matrix
def test_batch_statistics_gram_routes_match_numpy(shape, layout):
    feats = torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    if layout == "channels_last":
        feats = feats.contiguous(memory_format=torch.channels_last)
    stats = batch_statistics(feats)
    x = feats.numpy().transpose(1, 0, 2, 3).reshape(shape[1], -1)  # (C, N·H·W), every position a sample
    np.testing.assert_allclose(stats.sumsq.numpy(), x @ x.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.covariance.numpy(), np.cov(x, bias=True), rtol=1e-10, atol=1e-12)
    small = feats[:2, :, :2, :1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: batch_statistics(f).sumsq, (small,))


@pytest.mark.parametrize("shape", [(3, 2, 3, 2), (3, 5, 2, 1)])  # H·W ≥ C (batched) and H·W < C (flattened)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("signal", ["class", "mean"])  # per-image sums / batch sums
def test_batch_statistics_gradients_of_every_output(shape, layout, signal):
    """gradcheck of the Gram matrix, the position sum, the signal and a loss mixing them
    (the hand-written backward must also accumulate the three gradients correctly)."""
    feats = torch.randn(*shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    if layout == "channels_last":
        feats = feats.contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([1, 0, 1])

    def outputs(f):
        stats = batch_statistics(f, labels, signal=signal, num_classes=2)
        mixed = (stats.covariance @ stats.covariance).sum() + stats.signal.pow(3).sum()
        return stats.sumsq, stats.sum, stats.signal, mixed

    assert torch.autograd.gradcheck(outputs, (feats.clone().requires_grad_(True),))


@pytest.mark.parametrize("shape", [(6, 16, 5, 3), (4, 40, 4, 3)])  # positions ≥ channels: float32 stays float32
@pytest.mark.parametrize("signal", ["class", "mean"])  # mean: the sums' gradient is the convolution's bias
def test_float32_channels_last_gram_by_convolution_matches_float64(shape, signal, monkeypatch):
    """Float32 channels-last maps on the CPU take the oneDNN 1 x 1 convolution route; its Gram
    matrix, sums and the whole gradient agree with a float64 reference and with the matmul route."""
    from unidd_ray.spectral import moments

    assert moments._rows_by_convolution(torch.zeros(1, 2, 3).contiguous()) == torch.backends.mkldnn.is_available()
    base = torch.randn(*shape, generator=torch.Generator().manual_seed(9)).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(shape[0]) % 3

    def run(feats):
        feats = feats.clone(memory_format=torch.channels_last).requires_grad_(True)
        stats = batch_statistics(feats, labels, signal=signal, num_classes=3)
        g = torch.Generator().manual_seed(10)
        weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
                   for t in (stats.sumsq, stats.sum, stats.signal)]
        loss = sum((w * t).sum() for w, t in zip(weights, (stats.sumsq, stats.sum, stats.signal)))
        loss.backward()
        return stats.sumsq.detach(), stats.sum.detach(), feats.grad

    reference = run(base.double())
    by_convolution = run(base)
    assert by_convolution[2].is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(moments, "_rows_by_convolution", lambda x: False)
    by_matmul = run(base)
    for ref, conv, mm in zip(reference, by_convolution, by_matmul):
        assert conv.dtype == torch.float32
        assert _rel(conv, ref) < 1e-6 and _rel(mm, ref) < 1e-6


@pytest.mark.parametrize("shape, layout, dtype", [
    ((3, 4, 3, 3), torch.contiguous_format, torch.float64),  # batched
    ((3, 8, 2, 1), torch.contiguous_format, torch.float64),  # columns
    ((3, 4, 3, 3), torch.channels_last, torch.float64),  # rows
    ((3, 4, 3, 3), torch.channels_last, torch.float32),  # rows by convolution (CPU, oneDNN)
])
def test_gram_gradient_is_a_fresh_tensor_in_the_input_layout(shape, layout, dtype):
    """Every route hands back a tensor of its own (not a view) in the map's layout, so autograd can
    add the tapped layer's own gradient into it in place instead of allocating another map."""
    feats = torch.randn(*shape, dtype=dtype).contiguous(memory_format=layout).requires_grad_(True)
    stats = batch_statistics(feats)
    (grad,) = torch.autograd.grad(stats.sumsq.sum() + stats.sum.sum(), feats)
    assert grad._base is None and grad.is_contiguous(memory_format=layout)
    x = feats.detach().double()
    expected = 2 * torch.einsum("nchw,cd->ndhw", x, torch.ones(shape[1], shape[1], dtype=torch.float64)) + 1
    assert _rel(grad, expected) < 1e-6


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_batch_statistics_refuse_a_non_finite_feature(bad):
    feats = torch.randn(4, 3, 2, 2)
    feats[2, 1, 0, 1] = bad  # one position of one channel
    with pytest.raises(ValueError, match="NaN or Inf"):
        batch_statistics(feats)
