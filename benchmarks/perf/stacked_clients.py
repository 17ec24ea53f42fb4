"""(d) Training several clients at once: torch.func.vmap over stacked parameters.

K copies of simple_cnn (no BatchNorm, so vmap applies) each take S SGD steps on their
own batches of 64, either one client after the other (what fedbench does) or all K in
one vmapped forward/backward per step. fedbench keeps the sequential loop unless this
table shows the stacked version faster on the device at hand.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table, timed  # noqa: E402

from fedbench.models import build_model  # noqa: E402

LR, MOMENTUM = 0.01, 0.9


def sequential(models, optimizers, images, labels, steps):
    for model, optimizer, x_all, y_all in zip(models, optimizers, images, labels):
        for step in range(steps):
            loss = F.cross_entropy(model(x_all[step]), y_all[step])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def stacked(base, params, buffers, velocity, images, labels, steps):
    def loss_of(p, b, x, y):
        return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

    per_client_grad = vmap(grad(loss_of), in_dims=(0, 0, 0, 0))
    for step in range(steps):
        grads = per_client_grad(params, buffers, images[:, step], labels[:, step])
        with torch.no_grad():
            for name, g in grads.items():
                velocity[name].mul_(MOMENTUM).add_(g)
                params[name].sub_(LR * velocity[name])


def measure(clients: int, steps: int, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    images = torch.randn(clients, steps, 64, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (clients, steps, 64), device=device)
    models = [build_model("simple_cnn", 10, 3, 32).to(device) for _ in range(clients)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM) for m in models]
    seq = timed(lambda: sequential(models, optimizers, images, labels, steps), sync=device)
    base = copy.deepcopy(models[0]).to("meta")
    params, buffers = stack_module_state(models)
    params = {k: v.detach().clone() for k, v in params.items()}
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    vec = timed(lambda: stacked(base, params, buffers, velocity, images, labels, steps), sync=device)
    samples = clients * steps * 64
    return samples / seq, samples / vec


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for k in args.clients:
        seq, vec = measure(k, args.steps, device)
        rows.append([k, round(seq), round(vec), f"{vec / seq:.2f}x"])
    text = f"### Clients trained one after another vs vmapped together (simple_cnn, samples/s), {machine()}\n\n" + \
        table(["clients", "sequential", "vmap over stacked params", "vmap / sequential"], rows)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
