"""kl_divergence, elbo_loss and compression_report on small models with known answers."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vbdropout import LinearVBD, compression_report, elbo_loss, kl_divergence
from vbdropout.losses import elbo_terms


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(LinearVBD(6, 5), nn.ReLU(), nn.Linear(5, 4), LinearVBD(4, 3))


def test_kl_divergence_sums_every_variational_layer():
    model = small_model()
    expected = model[0].kl() + model[3].kl()
    assert kl_divergence(model).item() == pytest.approx(expected.item())
    assert kl_divergence(nn.Linear(2, 2)).item() == 0.0


def test_elbo_scales_the_data_term_to_the_dataset():
    model = small_model().train()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    torch.manual_seed(1)
    logits = model(x)
    n, beta = 1000, 0.3
    loss = elbo_loss(logits, y, model, dataset_size=n, kl_weight=beta)
    expected = n * F.cross_entropy(logits, y) + beta * kl_divergence(model)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    mean = elbo_loss(logits, y, model, dataset_size=n, kl_weight=beta, reduction="mean")
    assert mean.item() == pytest.approx(expected.item() / n, rel=1e-6)
    terms = elbo_terms(logits, y, model, n, beta)
    assert terms.nll.item() == pytest.approx(F.cross_entropy(logits, y).item())
    assert terms.kl.item() == pytest.approx(kl_divergence(model).item())
    loss.backward()
    assert model[0].log_sigma2.grad is not None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dataset_size": 0}, "dataset_size"),
        ({"dataset_size": 10.5}, "dataset_size"),
        ({"dataset_size": 10, "kl_weight": -1.0}, "kl_weight"),
        ({"dataset_size": 10, "kl_weight": float("nan")}, "kl_weight"),
        ({"dataset_size": 10, "reduction": "none"}, "reduction"),
    ],
)
def test_elbo_rejects_bad_arguments(kwargs, match):
    model = small_model()
    with pytest.raises(ValueError, match=match):
        elbo_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), model, **kwargs)
    with pytest.raises(ValueError, match="logits of shape"):
        elbo_loss(torch.randn(4, 3), torch.zeros(5, dtype=torch.long), model, 10)


def test_compression_report_counts_exactly():
    model = small_model()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].log_sigma2.fill_(-5.0)
        model[0].log_sigma2[:2].fill_(4.0)  # 2 rows × 6 inputs pruned
        model[2].weight[0].zero_()  # a plain layer's exact zeros count too
        model[3].log_sigma2.fill_(-30.0)
    report = compression_report(model)
    assert [layer.name for layer in report.layers] == ["0", "2", "3"]
    assert [(layer.weights, layer.nonzero) for layer in report.layers] == [
        (30, 18),
        (20, 15),
        (12, 12),
    ]
    assert report.weights == 62 and report.nonzero == 45
    assert report.ratio == pytest.approx(62 / 45)
    assert report.layers[0].sparsity == pytest.approx(40.0)
    assert report.sparsity_per_layer() == "40.0-25.0-0.0"
    # the nonzero count equals the eval-mode weight actually used
    assert int(torch.count_nonzero(model[0].masked_weight())) == 18
    as_dict = report.to_dict()
    json.dumps(as_dict)
    assert as_dict["compression_ratio"] == pytest.approx(62 / 45)
    assert as_dict["layers"][0]["nonzero"] == 18
    text = str(report)
    assert "total" in text and "LinearVBD" in text


def test_compression_report_threshold_override_and_full_pruning():
    model = small_model()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].log_sigma2.fill_(2.0)
    assert compression_report(model).layers[0].nonzero == 30
    pruned = compression_report(model, log_alpha_threshold=1.0)
    assert pruned.layers[0].nonzero == 0 and pruned.threshold == 1.0
    assert pruned.layers[0].ratio == float("inf")
    assert pruned.to_dict()["layers"][0]["compression_ratio"] is None
    assert compression_report(model, log_alpha_threshold=None).layers[0].nonzero == 30
    with pytest.raises(ValueError, match="threshold"):
        compression_report(model, log_alpha_threshold=50.0)
