"""Shared test helpers."""
import torch


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (a fresh BN is identity)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                    m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model
