"""(a) Client-training throughput inside fedbench against a plain PyTorch loop.

Both train the same model on the same on-device uint8 tensors with the same batched
augmentation (random crop with padding 4, horizontal flip) and SGD; the ratio
fedbench / plain is the harness overhead (Fabric, batch iteration, loss bookkeeping).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table, timed  # noqa: E402

from fedbench.client import LocalTrainConfig, LocalTrainer  # noqa: E402
from fedbench.data import ImagePipeline, ImageSet, random_crop  # noqa: E402
from fedbench.models import build_model  # noqa: E402


def plain_loop(model, images, labels, mean, std, steps, batch_size, channels_last, precision, generator):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    order = torch.randperm(len(labels), generator=generator, device=labels.device)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    for step in range(steps):
        index = order[(step * batch_size) % (len(labels) - batch_size):][:batch_size]
        x = random_crop(images[index].float() / 255, 4, generator)
        flip = torch.rand(len(index), generator=generator, device=x.device) < 0.5
        x = (torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x) - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def measure(model_name: str, steps: int, batch_size: int, channels_last: bool, precision: str, device: str):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=device, devices=1, precision=precision)
    dev = fabric.device
    n = max(steps * batch_size, 4 * batch_size)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (n,), device=dev)
    pipeline = ImagePipeline((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 3, True, True, 4, device=dev)
    torch.manual_seed(0)
    base = build_model(model_name, 10, 3, 32).to(dev)
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    config = LocalTrainConfig(batch_size=batch_size, local_steps=steps, channels_last=channels_last)
    model = copy.deepcopy(base)
    trainer = LocalTrainer(model, config, pipeline, fabric)
    data = ImageSet(images, labels)
    ours = timed(lambda: trainer.train(data, torch.Generator(device=dev).manual_seed(0)), sync=dev)
    plain_model = copy.deepcopy(base)
    theirs = timed(lambda: plain_loop(plain_model, images, labels, pipeline.mean, pipeline.std, steps, batch_size,
                                      channels_last, precision, torch.Generator(device=dev).manual_seed(0)), sync=dev)
    samples = steps * batch_size
    return samples / ours, samples / theirs


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=150, help="steps per measurement for simple_cnn")
    parser.add_argument("--resnet-steps", type=int, default=4)
    args = parser.parse_args(argv)
    rows = []
    for model_name, steps in (("simple_cnn", args.steps), ("resnet18", args.resnet_steps)):
        for channels_last, precision in ((False, "32-true"), (True, "32-true"), (True, "bf16-mixed")):
            ours, plain = measure(model_name, steps, 64, channels_last, precision, args.device)
            rows.append([model_name, "channels_last" if channels_last else "contiguous", precision,
                         round(ours), round(plain), f"{100 * ours / plain:.0f}%"])
    text = f"### Client-training throughput (batch 64, samples/s), {machine()}\n\n" + table(
        ["model", "memory format", "precision", "fedbench", "plain loop", "fedbench / plain"], rows)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
