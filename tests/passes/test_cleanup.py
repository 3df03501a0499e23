"""cleanup: removes inference no-ops and dead code without changing outputs."""
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.models import get_model


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.5)
        self.drop2d = nn.Dropout2d(0.2)
        self.ident = nn.Identity()
        self.unused = nn.Linear(6, 100)

    def forward(self, x):
        dead = self.unused(x)            # noqa: F841  computed, never used
        y = self.ident(self.drop(self.fc(x)))
        y = F.dropout(y, p=0.3, training=self.training)
        y = y.contiguous() * 1 + 0
        return self.drop2d(y.unsqueeze(-1)).squeeze(-1)


def test_noops_and_dead_code_removed_exactly():
    model = Noisy().eval()
    x = torch.randn(3, 6)
    opt = graphopt.optimize(model, target="torch", pipeline="cleanup", example_inputs=(x,))
    gm = opt.graph_module
    kinds = {type(m) for m in gm.modules()}
    assert not kinds & {nn.Dropout, nn.Dropout2d, nn.Identity}
    assert not hasattr(gm, "unused")
    code = gm.code
    assert "dropout" not in code and "contiguous" not in code and "* 1" not in code and "+ 0" not in code
    assert torch.equal(opt(x), model(x))
    removed = {d["removed"]: d["count"] for d in opt.report.records[-1].details}
    assert removed["Dropout"] == 1 and removed["Identity"] == 1 and removed["dead nodes"] >= 1
    assert opt.report.records[-1].params < opt.report.records[0].params


def test_int_tensor_times_float_one_is_kept():
    class Promote(nn.Module):
        def forward(self, x):
            return x * 1.0

    x = torch.arange(4)
    opt = graphopt.optimize(Promote(), target="torch", pipeline="cleanup", example_inputs=(x,))
    assert opt(x).dtype == torch.float32


def test_bert_encoder_dropouts_removed():
    model, inputs = get_model("bert_tiny")
    opt = graphopt.optimize(model, target="torch", pipeline="fold_bn,cleanup", example_inputs=inputs)
    assert not any(isinstance(m, nn.Dropout) for m in opt.graph_module.modules())
    torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=0, atol=0)


def test_contiguous_before_a_view_is_kept():
    """ShuffleNet's channel shuffle: transpose -> .contiguous() -> .view(); without the copy the view fails."""
    class Shuffle(nn.Module):
        def forward(self, x):
            n, c, h, w = x.size()
            x = x.view(n, 2, c // 2, h, w)
            x = torch.transpose(x, 1, 2).contiguous()
            y = x.view(n, c, h, w)
            return y + x.permute(0, 2, 1, 3, 4).contiguous().sum(1)[:, None].expand(n, 2, c // 2, h, w).reshape(
                n, c, h, w)

    model = Shuffle().eval()
    x = torch.randn(2, 6, 3, 3)
    opt = graphopt.optimize(model, target="torch", pipeline="cleanup", example_inputs=(x,))
    assert torch.equal(opt(x), model(x))
    assert opt.graph_module.code.count(".contiguous()") == 1          # the one before .view kept, the other removed
    assert any("kept 1 .contiguous()" in n for n in opt.report.records[-1].notes)
