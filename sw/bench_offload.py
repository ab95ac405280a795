"""``skipconv bench offload``: host-side throughput of offloading the example network.

Figures (issue 5):

* ``golden_images_per_s``: MNIST test images per second through ``offload`` with the golden
  backend (every engine layer run by the golden model, tiling and checks included);
* ``responder_layers_per_s``: engine layers per second through the full protocol path (encode,
  bytes, the software engine, decode) in-process: the host's own cost per layer;
* ``sim_layers_per_s``: engine layers per second on the Verilator-simulated engine;
* ``overhead_vs_sim``: driver wall time / simulated engine wall time on that run (the time
  the driver spent in ``Device.run`` divided by the time the simulator spent running the
  clock); goal <= 1.2, i.e. the host side is not the bottleneck.
"""

from __future__ import annotations

import time

HELP = "offload throughput on the example network: golden images/s, simulated layers/s, " \
       "driver overhead vs the simulator"


def add_arguments(parser):
    parser.add_argument("--images", type=int, default=200,
                        help="test images for the golden backend (default: 200)")
    parser.add_argument("--sim-images", type=int, default=4,
                        help="test images for the simulated engine (default: 4)")
    parser.add_argument("--lanes", type=int, default=8, help="engine lanes (default: 8)")
    parser.add_argument("--no-sim", action="store_true", help="skip the simulator figures")


def run(args) -> dict:
    from . import data, export, zoo
    from .driver.demo import demo_config
    from .driver.device import GoldenDevice, open_device
    from .driver.offload import offload

    config = demo_config(args.lanes)          # the demo's engine (its build is shared)
    net = export.export(zoo.get_model("lenet", progress=False), data.mnist_split("calib").x)
    test = data.mnist_split("test")
    n_layers = len(net.layers)
    figures = {"model": "lenet", "engine_layers": n_layers, "lanes": config.lanes}

    n = max(1, min(args.images, len(test)))
    t0 = time.perf_counter()
    offload(net, GoldenDevice(config), test.x[:n], progress=False)
    figures["golden_images"] = n
    figures["golden_images_per_s"] = round(n / (time.perf_counter() - t0), 2)

    m = max(1, min(20, n))
    dev = open_device("responder", config)
    t0 = time.perf_counter()
    offload(net, dev, test.x[:m], progress=False)
    figures["responder_layers_per_s"] = round(m * n_layers / (time.perf_counter() - t0), 2)

    figures.update(sim_layers_per_s=None, overhead_vs_sim=None)
    if args.no_sim:
        figures["sim"] = "skipped (--no-sim)"
        return figures
    from .driver.sim_backend import SimUnavailable, open_sim
    try:
        sim = open_sim(config, progress=False)
    except SimUnavailable as e:
        figures["sim"] = f"unavailable: {e}".splitlines()[0]
        return figures
    k = max(1, args.sim_images)
    try:
        before = sim.transport.stats()
        t0 = time.perf_counter()
        res = offload(net, sim, test.x[:k], compare=True, progress=False)
        wall = time.perf_counter() - t0
        after = sim.transport.stats()
    finally:
        sim.close()
    sim_s = after["sim_s"] - before["sim_s"]
    figures["sim_images"] = k
    figures["sim_layers_per_s"] = round(k * n_layers / wall, 3)
    figures["sim_cycles"] = after["cycles"] - before["cycles"]
    figures["sim_cycles_per_s"] = round(figures["sim_cycles"] / sim_s) if sim_s else None
    figures["driver_s"] = round(sim.stats["wall_s"], 3)
    figures["simulator_s"] = round(sim_s, 3)
    figures["overhead_vs_sim"] = round(sim.stats["wall_s"] / sim_s, 3) if sim_s else None
    figures["bit_exact"] = res.mismatch is None
    return figures
