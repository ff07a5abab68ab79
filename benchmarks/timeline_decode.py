"""Where the time of a decode step goes once kernels overlap (programmatic dependent launch): each kernel's
*exposed* time, the part of the step it alone adds (its end minus the latest end of the kernels before it), from
the CUDA timeline of graph-replayed decode steps (torch.profiler, chrome trace).

A kernel's own duration (what profile_decode.py sums) includes its wait for the kernel before it under PDL, so
durations add up to more than the step; exposed times add up to the step exactly.

    python benchmarks/timeline_decode.py --quantization int4 --batch 1 --steps 40
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import FRAG_LAUNCH_FORMS, set_frag_launch_form  # noqa: E402
from benchmarks.profile_decode import profiled_generate  # noqa: E402


def label(event: dict) -> str:
    """A kernel's short name, its template arguments (flux kernels) and grid: one label per distinct launch."""
    name = event["name"]
    short = re.sub(r"^void |\(anonymous namespace\)::|flux::|at::native::|c10::", "", name)
    short = re.sub(r"\(.*$", "", short)[:70]
    grid = event.get("args", {}).get("grid", "")
    return f"{short} grid={grid}"


def kernels_of(trace: dict) -> list[dict]:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"]
    return sorted(events, key=lambda e: e["ts"])


def summarize(events: list[dict], steps: int) -> str:
    """The exposed time per distinct kernel over the whole decode steps of a generate call of ``steps`` tokens
    (its prefill and first token excluded). The steps are found by their lm_head, the longest kernel that runs
    once per token: ``steps`` must differ from the model's layer count, or a prefill kernel that runs once per layer
    passes for it (main checks)."""
    labels = [label(e) for e in events]
    counts = collections.Counter(labels)
    durations = collections.defaultdict(list)
    for lab, e in zip(labels, events):
        durations[lab].append(e["dur"])
    # lm_head: the longest kernel on average among those that run once per generated token
    common = [lab for lab, c in counts.items() if steps - 1 <= c <= steps + 1]
    lm_head = max(common, key=lambda lab: sum(durations[lab]) / len(durations[lab]))
    marks = [i for i, lab in enumerate(labels) if lab == lm_head]
    first, last = marks[1] + 1, marks[-1] + 1  # whole decode steps: after the 2nd lm_head through the last
    decode_steps = len(marks) - 2
    start = latest = max(e["ts"] + e["dur"] for e in events[:first])
    rows = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])  # calls, duration, exposed, overlap with the previous
    for lab, e in zip(labels[first:last], events[first:last]):
        end = e["ts"] + e["dur"]
        r = rows[lab]
        r[0] += 1
        r[1] += e["dur"]
        r[2] += max(0.0, end - latest)  # exposed: its end minus the latest end before it
        r[3] += max(0.0, latest - e["ts"])
        latest = max(latest, end)
    step_us = (latest - start) / decode_steps
    lines = [f"decode steps: {decode_steps}, step {step_us:.1f} us (from one lm_head's end to the next one's)",
             f"{'kernel':<95} {'calls/step':>10} {'dur us':>8} {'exposed us':>10} {'overlap us':>10} "
             f"{'exposed/step':>12} {'share':>6}"]
    total = sum(r[2] for r in rows.values())
    for lab, (calls, dur, exp, ovl) in sorted(rows.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"{lab[:95]:<95} {calls / decode_steps:>10.1f} {dur / calls:>8.2f} {exp / calls:>10.2f} "
                     f"{ovl / calls:>10.2f} {exp / decode_steps:>12.1f} {exp / total:>6.1%}")
    lines.append(f"sum of exposed per step: {total / decode_steps:.1f} us")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="tokens generated (not within 1 of --layers)")
    parser.add_argument("--quantization", default=None, choices=["int8", "int4"])
    parser.add_argument("--trace", type=Path, default=None, help="also keep the chrome trace here")
    parser.add_argument("--fuse-norms", action=argparse.BooleanOptionalAction, default=True,
                        help="INT4 decode steps with the norms inside the quantized layers (DecoderRunner.fuse_norms)")
    parser.add_argument("--plugins", default="", help="plugins to add by name, comma-separated")
    parser.add_argument("--exclude", default="",
                        help="plugins to leave out by name, comma-separated (int4_fragments: INT4 in the checkpoint "
                             "layout)")
    parser.add_argument("--fragment-roles", default=None,
                        help="int4_fragments' layers, comma-separated (flux_infer.plugins.int4_fragments.ROLES)")
    parser.add_argument("--frag-launch", choices=list(FRAG_LAUNCH_FORMS), default="default",
                        help="fragment-layout calls above one row (flux_infer.kernels.cuda.set_frag_launch): the "
                             "default, all plain, small layers triggering late, all programmatic")
    parser.add_argument("--norm-rows", type=int, default=None,
                        help="steps of up to this many tokens run the norms inside the INT4 layers "
                             "(flux_infer.generation.norm_fusion.MAX_ROWS and FRAGMENT_MAX_ROWS)")
    args = parser.parse_args()
    if args.norm_rows is not None:
        from flux_infer.generation import norm_fusion

        norm_fusion.MAX_ROWS = norm_fusion.FRAGMENT_MAX_ROWS = args.norm_rows
    set_frag_launch_form(args.frag_launch)
    if args.fragment_roles is not None:
        from flux_infer.plugins import int4_fragments

        int4_fragments.ROLES = tuple(r for r in args.fragment_roles.split(",") if r)
    if not args.fuse_norms:
        from flux_infer.generation.runner import DecoderRunner

        DecoderRunner.fuse_norms = False
    if args.batch < 1 or args.steps < 4:
        parser.error("--batch >= 1 and --steps >= 4")
    if abs(args.steps - args.layers) <= 1:  # (at batch 16 the prefill's per-layer matmuls outlast the lm_head)
        parser.error("--steps must differ from --layers by more than 1: the prefill runs each of its per-layer "
                     "kernels --layers times, and the step detection would take one of them for the lm_head")
    prof = profiled_generate(args.layers, args.batch, args.steps, args.quantization, graphs=True,
                             plugins=tuple(p for p in args.plugins.split(",") if p),
                             exclude=tuple(p for p in args.exclude.split(",") if p))
    path = args.trace or Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))
    print(f"quantization {args.quantization}, batch {args.batch}, {args.layers} layers, norms fused "
          f"{args.fuse_norms}, plugins [{args.plugins}], excluded [{args.exclude}], {torch.cuda.get_device_name()}")
    print(summarize(kernels_of(json.loads(path.read_text())), args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
