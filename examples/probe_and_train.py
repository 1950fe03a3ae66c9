"""Probe a model for its safe batch size, then train a few steps with it (gradient accumulation included).

Runs anywhere: on a Mac it probes the real MPS device; pass --simulate to plan for a 16 GiB Mac on any CPU.

    python examples/probe_and_train.py --simulate
"""

import argparse

import timm
import torch

from mps_autobatch import find_safe_batch_size, plan_accumulation
from mps_autobatch.accumulation import micro_batch_sizes
from mps_autobatch.simulate import simulated_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", action="store_true", help="probe a simulated 16 GiB Mac on this CPU")
    parser.add_argument("--requested", type=int, default=48, help="the optimisation batch you want")
    parser.add_argument("--steps", type=int, default=3, help="training steps to run after probing")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10)
    device = simulated_backend("mps:16GiB") if args.simulate else "auto"
    result = find_safe_batch_size(
        model,
        input_shape=(3, 64, 64),
        num_classes=10,
        device=device,
        memory_limit="112MiB" if args.simulate else None,
        requested=args.requested,
    )
    micro, steps = plan_accumulation(args.requested, result.batch_size)
    print(
        f"safe batch size {result.batch_size} (max verified {result.max_batch_size}) after {len(result.trials)} trials"
    )
    print(f"requested {args.requested} = {steps} micro-batches of up to {micro}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        for size in micro_batch_sizes(args.requested, micro):
            images, labels = torch.randn(size, 3, 64, 64), torch.randint(10, (size,))
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            (loss * size / args.requested).backward()  # weight by share of the batch: the full-batch gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1}: loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
