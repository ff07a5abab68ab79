"""``flux-infer``: list plugins, show the plan for a model, generate (optionally side by side with the baseline)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from flux_infer.config import FROM_LEVEL, InferenceConfig, OptimizationLevel
from flux_infer.errors import FluxInferError

DEFAULT_PROMPT = "Explain the difference between TCP and UDP in two sentences."


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--level", default="O1", help="optimization level O0..O3 (default O1)")
    parser.add_argument("--flash-attention", dest="use_flash_attention", action=argparse.BooleanOptionalAction,
                        default=None, help="override the level's attention plugin switch")
    parser.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--fast-generate", action=argparse.BooleanOptionalAction, default=None,
                        help="model.generate on flux's decode loop")
    parser.add_argument("--quantization", choices=["none", "int8", "int4", "int4-awq"], default=None)
    parser.add_argument("--group-size", dest="quantization_group_size", type=int, default=128)
    parser.add_argument("--paged-kv-cache", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--quantize-kv-cache", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--speculative", choices=["none", "draft", "prompt_lookup", "self"], default=None)
    parser.add_argument("--draft-model", default=None)
    parser.add_argument("--gamma", dest="speculative_gamma", type=int, default=5)
    parser.add_argument("--adaptive-moe", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--plugin", dest="plugins", action="append", default=[], help="enable a plugin by name")
    parser.add_argument("--exclude", action="append", default=[], help="leave a plugin out")
    parser.add_argument("--strict", action="store_true", help="fail instead of skipping unsupported plugins")


def _config_from(args: argparse.Namespace) -> InferenceConfig:
    def switch(value: Any) -> Any:
        if value is None:
            return FROM_LEVEL
        return None if value == "none" else value

    return InferenceConfig(
        optimization_level=args.level,
        use_flash_attention=switch(args.use_flash_attention),
        fused_kernels=switch(args.fused_kernels),
        fast_generate=switch(args.fast_generate),
        quantization=switch(args.quantization),
        quantization_group_size=args.quantization_group_size,
        paged_kv_cache=switch(args.paged_kv_cache),
        quantize_kv_cache=switch(args.quantize_kv_cache),
        speculative=switch(args.speculative),
        draft_model=args.draft_model,
        speculative_gamma=args.speculative_gamma,
        adaptive_moe=switch(args.adaptive_moe),
        plugins=tuple(args.plugins),
        exclude=tuple(args.exclude),
    )


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="smollm2-135m",
                        help="hub id, local directory, .gguf file, or smollm2-135m (default)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: bf16 on CUDA, fp32 on CPU)")


# ---- plugins -----------------------------------------------------------------------------------------------------
def cmd_plugins(args: argparse.Namespace) -> int:
    from flux_infer.plugins.manager import get_plugin_manager

    manager = get_plugin_manager()
    if args.markdown:
        sys.stdout.write(levels_markdown())
        return 0
    rows = []
    for plugin in manager.plugins.values():
        source = manager.source_of(plugin.name)
        rows.append({
            "name": plugin.name, "version": manager.version_of(plugin), "package": source.package,
            "levels": [str(lvl) for lvl in plugin.enabled_levels()], "lossless": plugin.lossless,
            "provides": sorted(plugin.provides), "requires": sorted(plugin.requires),
            "conflicts": sorted(plugin.conflicts), "description": plugin.description,
        })
    if args.json:
        print(json.dumps({"plugins": rows, "load_errors": [str(e) for e in manager.load_errors]}, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']} {row['version']}  (package {row['package']}; levels: {', '.join(row['levels']) or '-'}; "
              f"{'lossless' if row['lossless'] else 'lossy'})")
        print(f"    {row['description']}")
        for key in ("provides", "requires", "conflicts"):
            if row[key]:
                print(f"    {key}: {', '.join(row[key])}")
    for error in manager.load_errors:
        print(f"failed to load: {error}")
    return 0


def levels_markdown() -> str:
    """The table of which plugin each level enables, generated from plugin metadata (docs/levels.md)."""
    from flux_infer.plugins.manager import PluginManager

    manager = PluginManager(autoload=False)  # built-ins only: the docs describe flux-infer itself
    levels = list(OptimizationLevel)
    lines = [
        "# Optimization levels",
        "",
        "Generated by `flux-infer plugins --markdown` from the built-in plugins' metadata; do not edit by hand.",
        "A switch given explicitly in `InferenceConfig` overrides the level's preset.",
        "",
        "| plugin | " + " | ".join(str(lvl) for lvl in levels) + " | InferenceConfig switch | lossless | provides | "
        "requires |",
        "| --- | " + " | ".join("---" for _ in levels) + " | --- | --- | --- | --- |",
    ]
    for plugin in manager.plugins.values():
        enabled = plugin.enabled_levels()
        marks = " | ".join("yes" if lvl in enabled else "" for lvl in levels)
        lines.append(
            f"| `{plugin.name}` | {marks} | `{plugin.config_field or '-'}` | {'yes' if plugin.lossless else 'no'} | "
            f"{', '.join(sorted(plugin.provides)) or '-'} | {', '.join(sorted(plugin.requires)) or '-'} |"
        )
    lines += ["", "## Plugins", ""]
    lines += [f"- `{p.name}`: {p.description}" for p in manager.plugins.values()]
    return "\n".join(lines) + "\n"


# ---- check -------------------------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    import flux_infer

    config = _config_from(args)
    model, _ = flux_infer.load(args.model, device=args.device, dtype=args.dtype)
    print(flux_infer.check(model, config=config, strict=args.strict))
    return 0


# ---- generate ----------------------------------------------------------------------------------------------------
def _encode(tokenizer: Any, prompt: str, raw: bool, device: Any) -> dict[str, Any]:
    if not raw and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def _timed_generate(model: Any, inputs: dict[str, Any], kwargs: dict[str, Any]) -> tuple[Any, float]:
    import torch

    model.generate(**inputs, **{**kwargs, "max_new_tokens": 2})  # warm-up: first-call costs are not the model's
    if inputs["input_ids"].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(**inputs, **kwargs)
    if inputs["input_ids"].is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import flux_infer

    config = _config_from(args)
    model, tokenizer = flux_infer.load(args.model, device=args.device, dtype=args.dtype)
    inputs = _encode(tokenizer, args.prompt, args.raw, model.device)
    n_prompt = inputs["input_ids"].shape[1]
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        torch.manual_seed(args.seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    def show(label: str, out: Any, seconds: float) -> list[int]:
        new = out[0, n_prompt:].tolist()
        print(f"--- {label}: {len(new)} tokens in {seconds * 1e3:.0f} ms ({len(new) / seconds:.1f} tok/s)")
        print(tokenizer.decode(new, skip_special_tokens=True).strip())
        return new

    baseline = None
    if args.compare:
        if args.temperature > 0:
            torch.manual_seed(args.seed)
        baseline = show("baseline (transformers)", *_timed_generate(model, inputs, kwargs))
    flux_infer.optimize(model, config=config, strict=args.strict)
    print(f"--- {model.flux_report}")
    if args.temperature > 0:
        torch.manual_seed(args.seed)
    out, seconds = _timed_generate(model, inputs, kwargs)
    optimized = show(f"flux_infer {config.optimization_level}", out, seconds)
    if baseline is not None:
        same = "identical" if baseline == optimized else "different"
        print(f"--- tokens: {same} to the baseline ({'lossless' if model.flux_report.lossless else 'lossy'} plan)")
        if model.device.type == "cpu":
            print("--- on the CPU flux runs its PyTorch reference kernels, so expect about the baseline's speed; the "
                  "speed-ups are on CUDA GPUs (docs/benchmarks.md)")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="flux-infer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}

    p = sub.add_parser("plugins", help="list installed optimization plugins")
    p.add_argument("--json", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print the level table (docs/levels.md)")
    p.set_defaults(func=cmd_plugins)
    commands["plugins"] = p

    p = sub.add_parser("check", help="show the plan for a model without changing it")
    _model_options(p)
    _config_options(p)
    p.set_defaults(func=cmd_check)
    commands["check"] = p

    p = sub.add_parser("generate", help="optimize a model and generate text")
    _model_options(p)
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    _config_options(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--compare", action="store_true", help="run the unoptimized model first and compare")
    p.set_defaults(func=cmd_generate)
    commands["generate"] = p
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if argv and argv[0] in commands:
        # intermixed: `generate MODEL --level O1 "prompt"` puts options between the two positionals
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FluxInferError as exc:
        print(f"flux-infer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
