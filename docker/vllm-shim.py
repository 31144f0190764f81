#!/usr/bin/env python3
"""`vllm` on the engine-sim image: `vllm serve MODEL [options]` runs `ebbtide engine-sim`.

The operator renders model-server pods with command ["vllm", "serve"] and vLLM's options.
This shim keeps the options the simulator understands, drops the ones it does not (for
example --tensor-parallel-size or --gpu-memory-utilization), and appends the words of
$EBBTIDE_ENGINE_SIM_ARGS (for example "--preset tiny --startup-delay 5": the port binds after
5 s, as vLLM's binds after the weights are loaded).
"""

import os
import shlex
import sys

# engine-sim options with the number of values each takes (-1: one or more, as argparse "+").
PASSED = {
    "--host": 1, "--port": 1, "--served-model-name": -1, "--enable-sleep-mode": 0,
    "--max-num-seqs": 1, "--max-model-len": 1, "--max-num-batched-tokens": 1, "--block-size": 1,
}


def translate(argv: list[str]) -> list[str]:
    if not argv or argv[0] != "serve" or len(argv) < 2 or argv[1].startswith("-"):
        raise SystemExit("usage: vllm serve MODEL [options]  (engine simulator shim)")
    out, dropped = ["ebbtide", "engine-sim", "--model", argv[1]], []
    rest = argv[2:]
    i = 0
    while i < len(rest):
        name, eq, value = rest[i].partition("=")
        i += 1
        takes = PASSED.get(name)
        values = [value] if eq else []
        if not eq:  # the values follow as separate words, up to the next option
            while i < len(rest) and not rest[i].startswith("--") and (takes is None or takes < 0 or len(values) < takes):
                values.append(rest[i])
                i += 1
        if takes is None:
            dropped.append(name)
        else:
            out += [name, *values]
    if "--host" not in out:
        out += ["--host", "0.0.0.0"]  # vLLM listens on all interfaces; the simulator defaults to loopback
    if dropped:
        print(f"vllm shim: ignoring options the simulator does not have: {' '.join(dropped)}", file=sys.stderr)
    return out + shlex.split(os.environ.get("EBBTIDE_ENGINE_SIM_ARGS", ""))


if __name__ == "__main__":
    args = translate(sys.argv[1:])
    os.execvp(args[0], args)
