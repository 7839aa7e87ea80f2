"""The planner's tables for gpt-oss-120b over two machines (docs/rpc.md), without the machines.

The devices are given, as `plan --rpc ... --gpu-mem HOST:PORT=SIZE --gpu-bw ...` would see them,
and the model is the published one as the planner sizes it (runner/known_models.py), so this runs
anywhere in a second. Predictions, not measurements: see docs/benchmarks.md for what was measured.

    python bench/plan_rpc_setups.py [--recipe mxfp4] [--ctx 32768]
"""

from __future__ import annotations

import argparse

from ossgguf.runner import network, speed
from ossgguf.runner.devices import Device, Devices
from ossgguf.runner.known_models import known_model
from ossgguf.runner.plan import PlacementOptions, format_plan, plan

GiB = 1024**3


def setups() -> dict[str, tuple[Devices, list[float], float]]:
    """name -> (devices in llama.cpp's order: workers first), the devices' bandwidths, this machine's RAM bandwidth."""
    mac_ws = 48 * GiB  # macOS lets Metal wire ~75% of a 64 GB Mac
    return {
        "two 64 GB Macs (M4 Max, 546 GB/s): the main one's Metal plus a worker's": (
            Devices(ram_total=64 * GiB, unified=True, gpus=(
                Device("RPC0[mac-b.local:50052]", mac_ws, kind="rpc", host="mac-b.local:50052",
                       description="the other Mac's Metal"),
                Device("Metal", mac_ws, kind="gpu", description="Apple M4 Max"))),
            [546e9, 546e9], 546e9),
        "a 24 GB GPU box (64 GB DDR5) plus a 128 GB RAM box (DDR5, CPU)": (
            Devices(ram_total=64 * GiB, gpus=(
                Device("RPC0[ram-box.lan:50052]", 128 * GiB, kind="rpc", host="ram-box.lan:50052",
                       description="the RAM box's CPU"),
                Device("CUDA0", 24 * GiB, kind="gpu", description="NVIDIA GeForce RTX 4090"))),
            [89.6e9, 1.008e12], 89.6e9),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="mxfp4-q8", help="mxfp4-q8 (Q8_0 attention, 63.4 GB) or mxfp4 (BF16 attention)")
    ap.add_argument("--ctx", type=int, default=32768)
    args = ap.parse_args()
    model = known_model("gpt-oss-120b", args.recipe)
    for name, (devices, bws, ram_bw) in setups().items():
        p = plan(model, PlacementOptions(ctx=args.ctx), devices=devices)
        print(f"## {name}\n")
        print(format_plan(p))
        print()
        print(network.format_hosts(p, 1.0))
        mem = speed.memories(p, ram_bw=ram_bw, gpu_bw=bws)
        for gbit in (1.0, 10.0):
            s = speed.predict(p, *mem, link_gbit=gbit)
            print(f"at {gbit:g} Gbit/s: decode ~{speed._tps(s.decode)} tok/s at the start "
                  f"(network {s.parts.get('network', 0) / sum(s.parts.values()):.0%} of a token's time)")
        s = speed.predict(p, *mem, link_gbit=1e6)
        print(f"with a free network: decode ~{speed._tps(s.decode)} tok/s\n")


if __name__ == "__main__":
    main()
