"""Synthetic training steps (what fashion_search.training does per batch: normalise, augment, bf16 autocast forward and
backward, grad clipping, AdamW), with the default multi-tensor ("foreach") AdamW against the fused one the shared
loop uses, alternated step by step in the same process so that the machine's changing speed hits both alike.

Also the training figure on CUDA (benchmarks/gpu.sh): --device cuda, with ResNet-50 or torchvision's ViT-B/32 (the
same layer shapes as CLIP's vision tower) at 224 px. Synthetic batches already in memory: the images/s of the step
alone, without the data loading that the training loop also times.

Usage: python benchmarks/train_step.py [--arch resnet18] [--image-size 64] [--batch-size 128] [--rounds 3]
                                       [--device cpu]
"""
import argparse
import time

import torch
import torch.nn.functional as F
import torchvision

from fashion_search import backbones, runtime, transforms


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18", choices=(*backbones.RESNET_ARCHS, "vit_b_32"))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and optimizer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", type=runtime.device_arg, default="cpu")
    args = parser.parse_args(argv)
    device = runtime.resolve_device(args.device)
    dtype = runtime.autocast_dtype(device)
    vit = args.arch == "vit_b_32"
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8)
    labels = torch.randint(0, 69, (args.batch_size,))
    nets, optimizers = {}, {}
    for fused in (False, True):
        options = {"image_size": args.image_size} if vit else {}
        nets[fused] = torchvision.models.get_model(args.arch, num_classes=69, **options).to(
            device, memory_format=torch.channels_last)
        optimizers[fused] = torch.optim.AdamW(nets[fused].parameters(), lr=1e-3, weight_decay=0.05, fused=fused,
                                              foreach=not fused)
    generator = torch.Generator().manual_seed(0)

    def step(fused):  # -> (seconds for the whole step, seconds in optimizer.step)
        net, optimizer = nets[fused], optimizers[fused]
        sync(device)
        step_started = time.perf_counter()
        batch = transforms.augment(transforms.normalize(images, backbones.IMAGENET_MEAN, backbones.IMAGENET_STD, device, True),
                                   transforms.augment_draws(len(images), generator))
        with runtime.autocast(device, dtype):
            loss = F.cross_entropy(net(batch).float(), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        sync(device)
        started = time.perf_counter()
        optimizer.step()
        sync(device)
        done = time.perf_counter()
        return done - step_started, done - started

    for fused in (False, True):
        for _ in range(3):
            step(fused)  # warm-up: oneDNN kernels, optimizer state
    print(f"{args.arch}, {args.image_size} px, batch {args.batch_size}, {device}, autocast {dtype}, "
          f"{torch.get_num_threads()} threads")
    print("| round | foreach AdamW img/s | fused AdamW img/s | speed-up | optimizer step ms (foreach -> fused) |")
    print("|---:|---:|---:|---:|---|")
    for round_ in range(1, args.rounds + 1):
        seconds = {False: [0.0, 0.0], True: [0.0, 0.0]}
        for _ in range(args.steps):
            for fused in (False, True):  # alternate step by step: the machine's speed drifts within seconds
                whole, optimizer_only = step(fused)
                seconds[fused][0] += whole
                seconds[fused][1] += optimizer_only
        rate = {fused: args.steps * args.batch_size / seconds[fused][0] for fused in seconds}
        step_ms = {fused: seconds[fused][1] / args.steps * 1000 for fused in seconds}
        print(f"| {round_} | {rate[False]:.0f} | {rate[True]:.0f} | {rate[True] / rate[False]:.2f}x | "
              f"{step_ms[False]:.1f} -> {step_ms[True]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
