"""Probe the largest safe batch size for a model, then train it with that size through the Python API.

python examples/train_with_probe.py --simulate      # plan for a 16 GiB Mac on any CPU
"""

import argparse
import tempfile

import timm
import torch

from mps_autobatch import find_safe_batch_size
from mps_autobatch.simulate import simulated_backend
from mps_autobatch.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", action="store_true", help="probe and train on a simulated 16 GiB Mac")
    parser.add_argument("--output", default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10)
    device = simulated_backend("mps:16GiB") if args.simulate else "auto"
    probe = find_safe_batch_size(
        model, input_shape=(3, 64, 64), device=device, memory_limit="160MiB" if args.simulate else None, requested=64
    )
    print(f"probe: batch size {probe.batch_size} fits ({len(probe.trials)} trials, {probe.elapsed_s:.1f} s)")

    output = args.output or tempfile.mkdtemp(prefix="autobatch-run-")
    config = TrainConfig(
        dataset="synthetic",
        model="test_efficientnet",
        image_size=64,
        epochs=1,
        batch_size=probe.batch_size,
        effective_batch_size=64,  # the optimisation batch, kept with gradient accumulation if needed
        simulate="mps:16GiB" if args.simulate else None,
        memory_limit="160MiB" if args.simulate else None,
        workers=0,
        output=output,
    )
    result = train(config, model=model)
    last = result.epochs[-1]
    print(
        f"trained {result.updates} updates of {result.effective_batch_size} samples "
        f"(micro-batch {result.micro_batch_size}); val top-1 {last['val_top1']:.3f}; run in {result.output_dir}"
    )


if __name__ == "__main__":
    main()
