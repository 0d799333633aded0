"""Train a tiny SN network on scikit-learn's digits for a few seconds and print what each
SN layer learned to use. Run: python examples/quickstart.py"""

import torch
from torch import nn

import normkit


def main(steps: int = 150, batch_size: int = 32, seed: int = 0) -> nn.Module:
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), normkit.SwitchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), normkit.SwitchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        idx = torch.randint(0, len(x) - 297, (batch_size,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[-297:]).argmax(1) == y[-297:]).float().mean().item()
    print(f"held-out accuracy after {steps} steps: {accuracy:.3f}")
    for name, module in model.named_modules():
        if isinstance(module, normkit.SwitchNorm2d):
            means = ", ".join(f"{s}={w:.2f}" for s, w in zip(module.sources, module.mean_weights.tolist()))
            variances = ", ".join(f"{s}={w:.2f}" for s, w in zip(module.sources, module.var_weights.tolist()))
            print(f"layer {name}: mean weights {means} | variance weights {variances}")
    return model


if __name__ == "__main__":
    main()
