"""convert() on a user's own model with nested containers, and to_deterministic() back."""

import pytest
import torch
from torch import nn

from vbdropout import compression_report, convert, kl_divergence, to_deterministic
from vbdropout.nn import Conv1dVBD, Conv2dVBD, LinearVBD


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2)])
        self.extra = nn.ModuleDict({"mix": nn.Conv1d(8, 8, 1)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        n, c, h, w = x.shape
        return self.extra["mix"](x.flatten(2)).view(n, c, h, w)


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(Block(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.hidden = nn.Linear(32, 16)
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.hidden(self.features(x))))


def test_convert_replaces_every_layer_keeps_weights_and_skips_by_name():
    torch.manual_seed(0)
    net = UserNet().eval()
    x = torch.randn(4, 3, 9, 9)
    expected = net(x)
    model = convert(net, "vbd", skip=["classifier"], threshold=None)
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["features.0.convs.0"] is Conv2dVBD and kinds["features.0.convs.1"] is Conv2dVBD
    assert kinds["features.0.extra.mix"] is Conv1dVBD
    assert kinds["hidden"] is LinearVBD and kinds["classifier"] is nn.Linear
    assert type(net.hidden) is nn.Linear, "the original model is left untouched"
    assert model.features[0].convs[1].stride == (2, 2)
    assert torch.allclose(model.eval()(x), expected, atol=1e-6)
    assert kl_divergence(model).item() > 0
    report = compression_report(model)
    assert [layer.name for layer in report.layers][-1] == "classifier"
    out = model.train()(x)
    (out.sum() + kl_divergence(model)).backward()
    assert model.hidden.log_sigma2.grad is not None


def test_to_deterministic_gives_plain_layers_with_the_pruned_means():
    torch.manual_seed(1)
    model = convert(UserNet(), "sparse_vd")
    with torch.no_grad():
        model.hidden.log_sigma2.uniform_(-12, 6)  # some weights above the threshold
    x = torch.randn(3, 3, 9, 9)
    plain = to_deterministic(model)
    assert not any(hasattr(m, "log_sigma2") for m in plain.modules())
    assert type(plain.hidden) is nn.Linear and type(plain.features[0].extra["mix"]) is nn.Conv1d
    assert torch.allclose(plain(x), model.eval()(x), atol=1e-6)
    assert int((plain.hidden.weight == 0).sum()) == int((~model.hidden.keep_mask()).sum())


def test_convert_options_and_errors():
    model = convert(nn.Sequential(nn.Linear(3, 2)), "vbd", inplace=True, train_clip=True)
    assert model[0].train_clip and model[0].prior.name == "hierarchical"
    assert type(convert(nn.Linear(3, 2))) is LinearVBD
    predicate = convert(UserNet(), skip=lambda name, m: isinstance(m, nn.Conv2d))
    assert type(predicate.features[0].convs[0]) is nn.Conv2d and type(predicate.hidden) is LinearVBD
    with pytest.raises(ValueError, match="supports methods"):
        convert(UserNet(), "bernoulli")
    with pytest.raises(ValueError, match="prior comes from"):
        convert(UserNet(), prior="log_uniform")
