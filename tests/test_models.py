"""The model registry builds every network with every method."""

import pytest
import torch
from torch import nn

from vbdropout import kl_divergence
from vbdropout.models import METHODS, MODELS, build_model
from vbdropout.nn import GaussianWeight, StochasticModule

SHAPES = {
    "mlp_srivastava": (1, 28, 28),
    "lenet300_100": (1, 28, 28),
    "lenet500_300": (1, 28, 28),
    "lenet5_caffe": (1, 28, 28),
    "kingma_cifar": (3, 32, 32),
}


NEEDS_N = {"concrete", "adversarial", "pruning", "dns", "ssl"}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_model_with_every_method(name, method):
    options = {"dataset_size": 1000} if method in NEEDS_N else None
    model = build_model(name, method, input_shape=SHAPES[name], method_options=options)
    x = torch.randn(3, *SHAPES[name])
    out = model.train()(x)
    assert out.shape == (3, 10)
    (out.sum() + kl_divergence(model)).backward()
    assert model.eval()(x).shape == (3, 10)
    assert torch.equal(model(x), model(x)), "evaluation is deterministic"
    weights = [m for m in model.modules() if isinstance(m, GaussianWeight)]
    prior = {"vbd": "hierarchical", "sparse_vd": "log_uniform", "vd_b": "kingma"}.get(method)
    if prior is not None:
        assert weights and all(m.prior.name == prior for m in weights)
    if method == "none":
        assert not any(isinstance(m, StochasticModule) for m in model.modules())
    else:
        assert any(isinstance(m, StochasticModule) for m in model.modules())


def test_layer_sizes_follow_the_paper():
    widths = [
        (m.in_features, m.out_features)
        for m in build_model("lenet300_100", "none").modules()
        if isinstance(m, nn.Linear)
    ]
    assert widths == [(784, 300), (300, 100), (100, 10)]
    lenet5 = build_model("lenet5_caffe", "vbd")
    shapes = [tuple(p.shape) for n, p in lenet5.named_parameters() if n.endswith("weight")]
    assert shapes == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
    cifar = build_model("kingma_cifar", "none", input_shape=(3, 32, 32), scale=1.5)
    convs = [m.out_channels for m in cifar.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [48, 96, 192]
    assert [m.out_features for m in cifar if isinstance(m, nn.Linear)] == [384, 10]
    srivastava = build_model("mlp_srivastava", "none", width=340)
    assert [m.out_features for m in srivastava if isinstance(m, nn.Linear)] == [340, 340, 340, 10]


def test_method_options_and_errors():
    model = build_model(
        "lenet300_100", "vbd", method_options={"log_alpha_threshold": 2.0, "train_clip": True}
    )
    layer = model[1]
    assert layer.threshold == 2.0 and layer.train_clip
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        build_model("lenet300_100", "magic")
    with pytest.raises(ValueError, match="bad options for method 'none'"):
        build_model("lenet300_100", "none", method_options={"threshold": 3.0})
    with pytest.raises(ValueError, match="at least 16×16"):
        build_model("lenet5_caffe", input_shape=(1, 8, 8))
