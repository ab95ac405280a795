"""``skipconv bench engine``: how well the simulated engine turns skipped MACs into saved cycles.

Two workloads, each run on two engines built from the same parameters (``lanes``, ``g``,
limits): the **dense** baseline (no skip mechanism) running the layers without their plans,
and the **skip** engine (all four mechanisms) running them configured:

* (a) the conv layers of the example MNIST network (``lenet`` from the zoo, exported) on real
  MNIST test images, with every mechanism on: predictive early termination on the first layer
  (signed input), exact early termination on the others, VELCRO constants on about 10% of the
  positions (lowest variance over calibration images, their rounded mean), perforation (25%,
  nearest neighbour) on the first layer, diagonal 2x2 zero prediction on the others;
* (b) ResNet-18's 3x3 conv shapes at 32x32 input (CIFAR stem), random weights and post-ReLU
  random inputs, exact early termination and diagonal 2x2 zero prediction on the skip engine.

Figures (issue 3): ``dense_utilization`` = dense MACs / (dense-engine cycles x lanes x g);
``skip_efficiency`` = (dense-engine cycles / skip-engine cycles) / (dense MACs / performed
MACs); ``sim_cycles_per_s`` = simulated clock cycles / CPU seconds of the simulator processes
(``sim_cycles_per_wall_s``: per wall second). Every
result is also compared with the golden model (``mismatches`` must be 0). Layers larger than
the engine's buffers are tiled by the driver's tiler; cycles add up over tiles.
"""

from __future__ import annotations

import sys
import time

HELP = ("engine figures on the simulated engine: dense_utilization, skip_efficiency, "
        "sim_cycles_per_s (MNIST network layers and ResNet-18 3x3 shapes)")

#: ResNet-18 (CIFAR form, 32x32 input): the distinct 3x3 convs as (Cin, H, Cout, stride).
RESNET18_3X3 = [(3, 32, 64, 1), (64, 32, 64, 1), (64, 32, 128, 2), (128, 16, 128, 1),
                (128, 16, 256, 2), (256, 8, 256, 1), (256, 8, 512, 2), (512, 4, 512, 1)]


def add_arguments(parser):
    parser.add_argument("--images", type=int, default=4,
                        help="MNIST test images per layer in part (a) (default: 4)")
    parser.add_argument("--parts", default="ab", help="which workloads: a, b or ab (default)")
    parser.add_argument("--lanes", type=int, default=8, help="engine lanes (default: 8)")
    parser.add_argument("-g", type=int, default=1, help="MACs per PE per cycle (default: 1)")
    parser.add_argument("--resnet-layers", type=int, default=len(RESNET18_3X3),
                        help="how many of the ResNet-18 shapes to run (default: all 8)")
    parser.add_argument("--sim", choices=("verilator", "icarus"), default="verilator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verilog-from", metavar="DIR", default=None,
                        help="use DIR/<config key>/skipconv_engine.v instead of generating "
                             "the Verilog (to benchmark a fixed gateware version)")
    parser.add_argument("--check", choices=("sim", "host"), default="sim",
                        help="sim (default): the simulator also checks every reply word for "
                             "word against the protocol responder (a Python model fed every "
                             "command word); host: it checks only the reply sequence, the "
                             "results are compared with golden.run here in both cases")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")


def engine_configs(lanes: int, g: int):
    """The skip engine and its dense baseline (identical but for the features)."""
    from skipconv.sw.config import FEATURES, EngineConfig
    # Buffers for every ResNet-18 3x3 layer at 32x32 in one pass per 16 output channels
    # (whole input and output planes): the benchmark measures the engine, not the host's
    # tile traffic. (max_cout stays small: the weight memory is max_cout * max_taps.)
    skip = EngineConfig(lanes=lanes, g=g, max_taps=4608, max_cout=16, max_ifmap=65536,
                        max_ofmap=65536, features=frozenset(FEATURES), trace=True)
    return skip, skip.replace(features=frozenset())


def dense_version(layer):
    """``layer`` with every skip mechanism removed (what the dense baseline runs)."""
    import dataclasses
    return dataclasses.replace(layer, kind=None, const=None, nn=None, p=0, leader=None,
                               et="off", order=None, neg_start=None, spec=None, th=None)


# -- workloads ---------------------------------------------------------------------------------

def _velcro(layer, outputs, frac=0.10):
    """CONST on the ``frac`` lowest-variance positions, with their rounded mean (VELCRO)."""
    import dataclasses

    import numpy as np

    from skipconv.sw.layer import COMPUTE, CONST
    mean, var = outputs.mean(axis=0), outputs.var(axis=0)
    kind = (np.zeros(layer.out_shape, np.int64) if layer.kind is None
            else np.asarray(layer.kind).copy())
    free = kind == COMPUTE
    n = int(round(frac * kind.size))
    order = np.argsort(np.where(free, var, np.inf), axis=None, kind="stable")[:n]
    chosen = np.zeros(kind.size, bool)
    chosen[order] = True
    chosen = chosen.reshape(kind.shape) & free
    kind[chosen] = CONST
    const = (np.zeros(layer.out_shape, np.int64) if layer.const is None
             else np.asarray(layer.const).copy())
    const[chosen] = np.clip(np.round(mean[chosen]), 0, layer.out_max).astype(np.int64)
    return dataclasses.replace(layer, kind=kind, const=const)


def mnist_workload(images: int, g: int, progress: bool):
    """Part (a): ``[(name, configured layer, x)]`` for the lenet conv layers."""
    import numpy as np

    from skipconv.sw import data, export, golden, zoo
    from skipconv.sw.methods import perforation, snapea, zero_pred

    model = zoo.get_model("lenet", progress=progress)
    calib = data.mnist_split("train").x[:64]
    net = export.export(model, calib, spec={"zoo": "lenet"})
    test = data.mnist_split("test").x[:images]
    items = []
    cal_inputs = net.layer_inputs(calib)
    for i, L in enumerate(list(net.layers)):
        ho, wo = L.out_hw
        if L.act_signed:
            t = L.taps
            n = np.full(L.cout, max(g, (t // 4) // g * g), np.int64)
            C = snapea.predictive(L, n, np.zeros(L.cout, np.int64))
            C = perforation.apply(C, perforation.uniform_mask(ho, wo, 0.25, seed=i))
        else:
            C = zero_pred.diagonal(snapea.exact(L), 2)
        outs = np.stack([golden.run(C, x, g).out for x in cal_inputs[i]])
        C = _velcro(C, outs)
        C.name = L.name or f"lenet.conv{i}"
        net.layers[i] = C
    inputs = net.layer_inputs(test)       # the configured network's own integer flow
    for i, C in enumerate(net.layers):
        for k in range(images):
            items.append((f"a/{C.name}/img{k}", C, inputs[i][k]))
    return items


def resnet_workload(count: int, seed: int, g: int):
    """Part (b): ``[(name, configured layer, x)]`` for ResNet-18's 3x3 shapes at 32x32."""
    import numpy as np

    from skipconv.sw import randlayer
    from skipconv.sw.layer import Layer
    from skipconv.sw.methods import snapea, zero_pred

    rng = np.random.default_rng(seed)
    items = []
    for cin, h, cout, s in RESNET18_3X3[:count]:
        t = cin * 9
        w = rng.integers(-128, 128, size=(cout, cin, 3, 3))
        w[rng.random(w.shape) < 0.1] = 0
        typical = np.sqrt(t) * 255 * 128 / 4
        b = np.round(rng.normal(-typical / 4, typical / 2, cout)).astype(np.int64)
        M, sh = randlayer.requant_for(typical, 8, cout, rng)
        L = Layer(in_shape=(cin, h, h), w=w, b=b, stride=s, pad=1, M=M, sh=sh,
                  name=f"resnet18.{cin}x{h}x{h}->{cout}/s{s}")
        x = randlayer.random_input(rng, L.in_shape, signed=False, zero_frac=0.5)
        if cin == 3:
            L.act_signed = True
            x = randlayer.random_input(rng, L.in_shape, signed=True, zero_frac=0.0)
            C = snapea.predictive(L, np.full(cout, 8, np.int64), np.zeros(cout, np.int64))
        else:
            C = zero_pred.diagonal(snapea.exact(L), 2)
        items.append((f"b/{L.name}", C, x))
    return items


# -- running on the simulator ------------------------------------------------------------------

def run_on_engine(config, items, *, sim="verilator", progress=True, label="",
                  verilog_from=None, responder=True):
    """Run ``[(name, layer, x)]`` on the simulated engine (tiled as needed), one simulation.

    Returns ``(results, sim_info)``: one assembled :class:`~skipconv.sw.golden.Result` per
    item (cycles summed over tiles) and the simulation's cycles, wall time and errors.
    """
    from skipconv.sim import runner
    from skipconv.sim.bench import jobs
    from skipconv.sw.driver.tiling import assemble, plan_tiles

    say = (lambda s: print(s, file=sys.stderr)) if progress else (lambda s: None)
    verilog = None
    if verilog_from:
        from pathlib import Path
        verilog = Path(verilog_from) / config.key / "skipconv_engine.v"
        if not verilog.exists():
            raise SystemExit(f"skipconv bench engine: {verilog} does not exist")
    build = runner.build(config, sim, log=say, verilog=verilog, opt=runner.BENCH_OPT, pgo=True)
    steps, plan = [], []
    for name, layer, x in items:
        tiles = plan_tiles(layer, config)
        plan.append((layer, tiles))
        for k, tile in enumerate(tiles):
            steps.append(jobs.layer_step(tile.layer, tile.input(x, layer), config,
                                         tag=f"{name}#{k}"))
    say(f"{label}: {len(items)} layers, {len(steps)} engine passes on {sim}")
    t0 = time.monotonic()
    out = runner.run_bench(build, "skipconv.sim.bench.tb_engine",
                           jobs.job(steps, responder=responder),
                           progress=label if progress else None)
    say(f"{label}: {out['sim_cycles']:,} cycles simulated in {time.monotonic() - t0:.0f} s")
    results, i = [], 0
    for layer, tiles in plan:
        parts = []
        for tile in tiles:
            parts.append(jobs.run_result(out["steps"][i], tile.layer, trace=config.trace))
            i += 1
        results.append(assemble(layer, tiles, parts))
    return results, out


def run(args) -> dict:
    import numpy as np

    from skipconv.sw import golden

    progress = not args.no_progress
    skip_cfg, dense_cfg = engine_configs(args.lanes, args.g)
    items = []
    if "a" in args.parts:
        items += mnist_workload(args.images, args.g, progress)
    if "b" in args.parts:
        items += resnet_workload(args.resnet_layers, args.seed, args.g)
    if not items:
        raise SystemExit("skipconv bench engine: --parts must name a and/or b")

    dense_items = [(n, dense_version(L), x) for n, L, x in items]
    responder = getattr(args, "check", "sim") == "sim"
    skip_res, skip_sim = run_on_engine(skip_cfg, items, sim=args.sim, progress=progress,
                                       label="skip engine", verilog_from=args.verilog_from,
                                       responder=responder)
    dense_res, dense_sim = run_on_engine(dense_cfg, dense_items, sim=args.sim,
                                         progress=progress, label="dense engine",
                                         verilog_from=args.verilog_from, responder=responder)

    mismatches = []
    for (name, L, x), r in zip(items, skip_res):
        mismatches += [f"{name}: {p}" for p in golden.run(L, x, args.g).mismatches(r)]
    for (name, L, x), r in zip(dense_items, dense_res):
        mismatches += [f"{name} (dense): {p}" for p in golden.run(L, x, args.g).mismatches(r)]
    mismatches += skip_sim["errors"] + dense_sim["errors"]

    def figures(sel):
        dense_macs = sum(dense_res[i].dense for i in sel)
        performed = sum(skip_res[i].performed for i in sel)
        dcyc = sum(dense_res[i].cycles for i in sel)
        scyc = sum(skip_res[i].cycles for i in sel)
        util = dense_macs / (dcyc * args.lanes * args.g)
        ideal = dense_macs / max(performed, 1)
        return {"dense_utilization": round(util, 4),
                "skip_efficiency": round((dcyc / scyc) / ideal, 4),
                "speedup": round(dcyc / scyc, 3), "ideal_speedup": round(ideal, 3),
                "dense_macs": int(dense_macs), "performed_macs": int(performed),
                "dense_cycles": int(dcyc), "skip_cycles": int(scyc)}

    every = list(range(len(items)))
    out = figures(every)
    for part in "ab":
        sel = [i for i, (n, _, _) in enumerate(items) if n.startswith(part + "/")]
        if sel:
            out.update({f"{part}_{k}": v for k, v in figures(sel).items()
                        if k in ("dense_utilization", "skip_efficiency", "speedup",
                                 "ideal_speedup")})
    cycles = skip_sim["sim_cycles"] + dense_sim["sim_cycles"]
    wall = skip_sim["wall_s"] + dense_sim["wall_s"]
    cpu = skip_sim.get("cpu_s", 0) + dense_sim.get("cpu_s", 0)
    out.update({
        # Per CPU second of the simulator process: the machine is shared, so wall time
        # depends on the other jobs; both are reported.
        "sim_cycles_per_s": round(cycles / cpu) if cpu else None,
        "sim_cycles_per_wall_s": round(cycles / wall),
        "sim_cycles": int(cycles), "sim_wall_s": round(wall, 1), "sim_cpu_s": round(cpu, 1),
        "lanes": args.lanes, "g": args.g, "layers": len(items),
        "check": "sim" if responder else "host",
        "mismatches": len(mismatches),
        "per_layer": [
            {"name": n, "dense_macs": int(d.dense), "performed": int(s.performed),
             "dense_cycles": int(d.cycles), "skip_cycles": int(s.cycles),
             "utilization": round(d.dense / (d.cycles * args.lanes * args.g), 4)}
            for (n, _, _), d, s in zip(items, dense_res, skip_res)],
    })
    if mismatches:
        print("MISMATCHES against the golden model:\n  " + "\n  ".join(mismatches[:20]),
              file=sys.stderr)
    np.seterr(all="ignore")
    return out
