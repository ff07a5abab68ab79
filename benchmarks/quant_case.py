"""One quantized linear layer for Nsight Compute, and the SASS instruction mix of quant_mma's instantiations.

    # a layer of N x K (INT4 group 128, bf16) on ROWS rows of x, called 6 times; the launch overrides are quant_mma's
    # (0 / -1: the launcher's own choice)
    ncu --set full -k regex:quant_mma --launch-skip 5 --launch-count 1 -o rep \
        python benchmarks/quant_case.py 28672 4096 16 --int4-mode 2 --warps 8 --row-tiles 4 --launch-shape 2
    ncu --import rep.ncu-rep --page source --csv --print-source sass > stalls.csv

    # instructions per opcode of every quant_mma instantiation whose mangled name matches a regex (cuobjdump)
    python benchmarks/quant_case.py --sass 'BFloat16ELi1ELi2ELi4'
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_infer.kernels import cuda  # noqa: E402


def run_case(args: argparse.Namespace) -> None:
    from flux_infer.quantization.modules import QuantizedLinear

    w = torch.randn(args.n, args.k, device="cuda", dtype=torch.bfloat16) / args.k**0.5
    layer = QuantizedLinear.from_weight(w, None, bits=4, group_size=128)
    x = torch.randn(args.rows, args.k, device="cuda", dtype=torch.bfloat16)
    module = cuda._state["module"]
    for _ in range(6):
        module.quant_mma(x, layer.qweight, layer.scales, layer.mins, 128, None, args.warps, args.row_tiles,
                         args.int4_mode, args.launch_shape, -1)
    torch.cuda.synchronize()


def sass_mix(pattern: str) -> None:
    """Static opcode counts of the quant_mma kernels in the built extension (their template arguments: dtype,
    format, 8-row tiles, row tiles, loads in flight, launch shape, gated)."""
    tool = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    library = cuda._state["module"].__file__
    sass = subprocess.run([tool, "-sass", library], check=True, capture_output=True, text=True).stdout
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0]
        if "quant_mma_kernel" not in name or not re.search(pattern, name):
            continue
        ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", part))
        print(f"{name}\n  {sum(ops.values())} instructions: "
              + ", ".join(f"{op} {count}" for op, count in ops.most_common(30)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, nargs="?", help="output features")
    parser.add_argument("k", type=int, nargs="?", help="input features")
    parser.add_argument("rows", type=int, nargs="?", help="rows of x (1-32)")
    parser.add_argument("--int4-mode", type=int, default=0, help="0 chosen, 1 biased codes, 2 per-weight scales")
    parser.add_argument("--warps", type=int, default=0)
    parser.add_argument("--row-tiles", type=int, default=0)
    parser.add_argument("--launch-shape", type=int, default=-1)
    parser.add_argument("--sass", metavar="REGEX", help="print the SASS opcode mix of matching instantiations")
    args = parser.parse_args()
    given = [v is not None for v in (args.n, args.k, args.rows)]
    if (args.sass is None and not all(given)) or (args.sass is not None and any(given)):
        parser.error("give N K ROWS, or --sass REGEX")
    if args.sass is None and not (1 <= args.rows <= 32 and args.k % 128 == 0 and args.n > 0):
        parser.error("ROWS 1 to 32 (quant_mma's range), K a multiple of 128 (the INT4 group), N positive")
    if not cuda.load():
        print(f"flux's CUDA kernels are not available: {cuda.status()}", file=sys.stderr)
        return 1
    if args.sass is not None:
        sass_mix(args.sass)
    else:
        run_case(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
