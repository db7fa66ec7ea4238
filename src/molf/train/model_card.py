"""``final/README.md``: the model card a hub page shows, written from the run's own records.

Front matter (``base_model``, ``library_name``, ``tags``) in the Hugging Face card
format, then what was trained and how: method, ranks, learning rates, steps, the
routing the optimizer chose (MoLF methods), metrics before and after, and the command.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from molf.train.args import TrainArgs
from molf.train.methods import method_of


def routing_summary(run_dir: Path) -> str | None:
    """One sentence: each expert's share of the decided layer-steps, and where the
    minority experts won most (module types), from ``routing.jsonl``; None without
    routing. Module-steps without a decision (all scores 0) are left out and counted."""
    from molf.routing_log import routing_matrix

    if not (run_dir / "routing.jsonl").is_file():
        return None
    matrix = routing_matrix(run_dir)
    if not matrix.steps.size:
        return None
    counts = matrix.counts()
    wins, shares = counts.expert_shares(), counts.type_shares()
    order = np.argsort(-wins)
    parts = [f"{matrix.experts[e]} {wins[e]:.0%}" for e in order]
    where = []
    for e in order[1:]:
        if wins[e] == 0:  # never won: nowhere to name
            continue
        top = sorted(((t, float(v[e])) for t, v in shares.items()), key=lambda kv: -kv[1])[:3]
        where.append(f"{matrix.experts[e]} mostly in " + ", ".join(f"{t} {v:.0%}" for t, v in top))
    ties = f" ({counts.ties} module-steps without a decision left out)" if counts.ties else ""
    return (
        f"share of layer-steps won over {matrix.steps.size} steps: {', '.join(parts)}"
        + (f"; {'; '.join(where)}" if where else "")
        + ties
    )


def _metrics_table(results: dict[str, Any]) -> list[str]:
    before, after = results.get("before", {}), results.get("after", {})
    rows = ["| metric | before | after |", "|---|---|---|"]
    for name in after:
        b = before.get(name)
        rows.append(f"| {name} | {'' if b is None else f'{b:.4f}'} | {after[name]:.4f} |")
    for name, value in results.get("baselines", {}).items():
        rows.append(f"| {name} (baseline) | | {value:.4f} |")
    return rows


def gguf_line(ref: Any) -> str | None:
    """The card's line on weights dequantized from a GGUF file (``ref``: the run's
    :class:`~molf.train.modeling.ModelRef`), None for other models."""
    if ref is None or not ref.gguf_file:
        return None
    origin = f", a quantized export of {ref.hub_id}" if ref.hub_id else ""
    return (
        f"- base weights: dequantized to float from the GGUF file {ref.gguf_file} "
        f"(in {ref.name}){origin}; training started from those weights, which differ "
        "from the original model's by its quantization"
    )


def model_card(
    args: TrainArgs, base_model: str, results: dict[str, Any], run_dir: Path, ref: Any = None
) -> str:
    """The card's text (markdown with YAML front matter); ``ref`` (the run's
    :class:`~molf.train.modeling.ModelRef`) says when the weights came from a GGUF file."""
    method = method_of(args)
    adapter = method.adapter
    front = {
        "base_model": base_model,
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["molf", args.method, args.task],
    }
    what = method.describe(args)
    lora_lr = method.lora_lr(args)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {base_model} fine-tuned with molf ({args.method}, task {args.task})",
        "",
        f"Trained with {what}.",
        "",
        f"- learning rate {args.lr:g}"
        + ("" if lora_lr is None else f", LoRA learning rate {lora_lr:g}")
        + f"; {results.get('steps', '?')} steps of {args.batch_size * args.grad_accum} "
        f"examples per process; seed {args.seed}",
        f"- data: {args.data or 'the hub dataset'}; evaluated on "
        + results.get("evaluated", f"its {args.eval_split} split"),
    ]
    routing = routing_summary(run_dir)
    lines += [line for line in (gguf_line(ref), routing and f"- routing: {routing}") if line]
    lines += ["", "## Metrics", "", *_metrics_table(results), "", "## Load it", "", "```python"]
    if adapter:
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            'model = AutoPeftModelForCausalLM.from_pretrained("path/to/final")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("path/to/final")',
        ]
    command = shlex.join(["molf", *sys.argv[1:]]) if sys.argv[1:] else "molf train"
    lines += ["```", "", "## Command", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def point_adapter_at(final: Path, base_model: str) -> None:
    """Make an adapter's ``base_model_name_or_path`` ``base_model`` (the hub id or an
    absolute path: :func:`molf.train.export.adapter_base`)."""
    config = final / "adapter_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = base_model
        config.write_text(json.dumps(data, indent=2))
