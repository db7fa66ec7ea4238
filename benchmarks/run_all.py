"""Run B1-B4 and the profiles, each in a fresh process; write one summary of every table.

    python -m benchmarks.run_all [--quick]

Writes ``benchmarks/out/summary.md`` (the tables, the machine, the command) and each
benchmark's own JSON. ``--quick`` uses fewer repetitions (a smoke run, not for the
README). About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.common import OUT_DIR, machine

BENCHMARKS = ("b1_optimizer", "b2_train_step", "b3_memory", "b4_scaling", "profile_gaps")
QUICK = {
    "b1_optimizer": ["--reps", "3", "--warmup", "1"],
    "b2_train_step": ["--reps", "3", "--warmup", "1", "--hiddens", "512", "--more-tokens", "1"],
    "b3_memory": ["--steps", "2"],
    "b4_scaling": ["--reps", "3", "--warmup", "1"],
    "profile_gaps": ["--steps", "2", "--hiddens", "512"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = ap.parse_args(argv)
    info = machine()
    started = time.perf_counter()
    sections, failed = [], []
    for name in args.only:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *(QUICK[name] if args.quick else [])]
        print(f"[run_all] {' '.join(cmd[1:])}", flush=True)
        res = subprocess.run(cmd, check=False)
        seconds = time.perf_counter() - t0
        md = OUT_DIR / f"{name}.md"
        if res.returncode != 0 or not md.exists():
            failed.append(name)
            sections.append(f"### {name}: FAILED (exit {res.returncode})")
            continue
        sections.append(md.read_text().strip() + f"\n\n({seconds:.0f} s)")
    total = time.perf_counter() - started
    header = [
        "## Benchmark results",
        "",
        f"One run of `python -m benchmarks.run_all{' --quick' if args.quick else ''}` "
        f"({total / 60:.1f} min): {info['cpu']}, {info['cores']} cores, "
        f"{info['torch_threads']} torch threads, torch {info['torch']}, "
        f"transformers {info.get('transformers', '?')}, Python {info['python']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in info.get('loadavg_at_start', []))}.",
        "",
    ]
    summary = "\n".join(header) + "\n" + "\n\n".join(sections) + "\n"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "summary.md").write_text(summary)
    (OUT_DIR / "summary.json").write_text(
        json.dumps({"machine": info, "seconds": total, "failed": failed}, indent=2)
    )
    print("\n" + summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
