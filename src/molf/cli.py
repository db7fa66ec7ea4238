"""``molf train`` / ``molf eval`` (flags and YAML, then ``molf.train.job``), ``molf report``
and ``molf push``.

Every flag comes from a :class:`~molf.train.args.TrainArgs` field (its help text
included), so the YAML keys, the flags and ``config.yaml`` always agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import time
from pathlib import Path

from molf.errors import Interrupted, MolfError

DEMO = {
    "task": "fact",
    "data": "builtin",
    "method": "molf",
    "output_dir": "runs/demo",
    "overwrite": True,
    "max_steps": 24,
    "batch_size": 8,
    "lr": 2e-4,
    "lora_lr": 2e-4,
    "lora_ranks": "16",
    "lora_alphas": "16",
    "max_new_tokens": 8,
    "warmup_ratio": 0.1,
}


def _add_train_args(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One flag per TrainArgs field (``only``: just these), grouped by topic, each with
    its help, its choices and its default shown once."""
    from molf.train.args import FLAG_GROUPS, TrainArgs, choices

    parser.add_argument(
        "--config", help="YAML file with any of the settings below (flags win over it)"
    )
    fields = {f.name: f for f in dataclasses.fields(TrainArgs)}
    allowed = choices()
    for title, names in FLAG_GROUPS.items():
        names = tuple(n for n in names if only is None or n in only)
        group = parser.add_argument_group(title) if names else None
        for name in names:
            f = fields[name]
            flag = "--" + name.replace("_", "-")
            help_text = f.metadata["help"]
            default = f.default
            if isinstance(default, tuple):
                default = ",".join(map(str, default))
            if default is not None and "default:" not in help_text:
                help_text += f" (default: {default})"
            if str(f.type).startswith("bool"):
                group.add_argument(
                    flag,
                    dest=name,
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help=help_text,
                )
            else:
                metavar = "{" + ",".join(allowed[name]) + "}" if name in allowed else None
                group.add_argument(flag, dest=name, default=None, metavar=metavar, help=help_text)


def _add_report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: RUN_DIR/report for one run, ./report for several)",
    )


def _add_push_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR", help="a finished run directory")
    parser.add_argument(
        "--push-to-hub",
        metavar="OWNER/NAME",
        default=None,
        help="Hub repo id (default: the run's own --push-to-hub)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="molf",
        description="Fine-tune causal LMs with MoLF, FFT, LoRA, DoRA or AdaLoRA, "
        "and evaluate them on fact / med / sql / jsonl tasks.",
    )
    from molf import __version__

    parser.add_argument("--version", action="version", version=f"molf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="fine-tune and evaluate before and after; with no arguments, runs the offline demo",
    )
    _add_train_args(train)
    ev = sub.add_parser("eval", help="evaluate a model or a run's final/ directory on a task")
    ev.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="evaluate RUN_DIR/final on the run's own task, data, caps, split and template "
        "(from its config.yaml; flags still win)",
    )
    from molf.train.args import EVAL_FLAGS

    _add_train_args(ev, only=EVAL_FLAGS)
    report = sub.add_parser(
        "report",
        help="plots and tables of one or more runs (loss, routing, metrics): "
        "index.html, summary.md and PNGs",
    )
    _add_report_args(report)
    push = sub.add_parser(
        "push",
        help="upload a finished run's final/ to the Hugging Face Hub (again: after an "
        "upload failed, or to another repo)",
    )
    _add_push_args(push)
    from molf.sweep import add_sweep_parser

    add_sweep_parser(sub)
    return parser


def _train_or_eval(ns: argparse.Namespace, argv: list[str]) -> int:
    """``molf train`` / ``molf eval``: flags over YAML over defaults, then run."""
    started = time.perf_counter()
    command = ns.command
    overrides = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "run")}
    demo = command == "train" and len(argv) == 1
    if demo:
        print(
            "[molf] no arguments: running the offline demo (MoLF on the default model, "
            "learning the built-in counterfactual statements)",
            flush=True,
        )
        overrides.update(DEMO)
    from molf.train.args import expand_path, resolve_args
    from molf.train.job import run_train
    from molf.train.run_commands import run_eval, run_settings
    from molf.train.rundir import holding_run

    run_dir = Path(expand_path(ns.run)) if getattr(ns, "run", None) else None
    with holding_run(run_dir):  # molf eval --run: no training changes the run meanwhile
        args = resolve_args(ns.config, overrides, run_settings(run_dir) if run_dir else None)
        if command == "eval":
            import json

            metrics = run_eval(args, write=ns.output_dir is not None)
            print(json.dumps(metrics, indent=2))
            return 0
    results = run_train(args)
    if demo:
        before, after = results.get("before", {}), results["after"]
        changes = ", ".join(
            f"{name} {before[name]:.2f} -> {after[name]:.2f}"
            for name in ("efficacy", "generalization", "specificity")
        )
        print(
            f"[molf] demo: {changes} (before -> after training; "
            f"{time.perf_counter() - started:.0f} s in all)",
            flush=True,
        )
    return 0


def _report(ns: argparse.Namespace, argv: list[str]) -> int:
    """``molf report RUN_DIR [RUN_DIR ...] [--out DIR]``."""
    from molf.report import write_report
    from molf.train.args import expand_path

    runs = [Path(expand_path(r)) for r in ns.runs]
    out = (
        Path(expand_path(ns.out))
        if ns.out
        else (runs[0] / "report" if len(runs) == 1 else Path("report"))
    )
    try:
        index = write_report(runs, out)
    except UnicodeDecodeError:
        raise _not_utf8(runs) or MolfError("a run's files are not UTF-8 text") from None
    print(f"[molf] report: {index}", flush=True)
    return 0


def _not_utf8(runs: list[Path]) -> MolfError | None:
    """A MolfError naming ``file:line`` of the first bytes that are not UTF-8 among the
    files ``molf report`` reads in ``runs``; None if there are none."""
    for run in runs:
        for name in ("config.yaml", "train_log.jsonl", "routing.jsonl", "eval.json"):
            try:
                data = (run / name).read_bytes()
                data.decode("utf-8")
            except OSError:
                continue
            except UnicodeDecodeError as e:
                line = data[: e.start].count(b"\n") + 1
                return MolfError(
                    f"{run / name}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                    "the file is damaged there: restore or delete that line"
                )
    return None


def _push(ns: argparse.Namespace, argv: list[str]) -> int:
    """``molf push RUN_DIR [--push-to-hub OWNER/NAME]``."""
    from molf.train.args import expand_path
    from molf.train.run_commands import push_run

    url = push_run(Path(expand_path(ns.run)), ns.push_to_hub)
    print(f"[molf] uploaded to the Hub: {url}", flush=True)
    return 0


def _sweep(ns: argparse.Namespace, argv: list[str]) -> int:
    from molf.sweep import run_sweep_command

    return run_sweep_command(ns)


# One handler per subcommand: (parsed flags, raw argv) -> exit code.
COMMANDS = {
    "train": _train_or_eval,
    "eval": _train_or_eval,
    "report": _report,
    "push": _push,
    "sweep": _sweep,
}


def _disk_message(e: OSError) -> tuple[str, int]:
    """One line and the exit code for a full (1) or read-only (2) disk met outside
    ``molf train`` (which names its own way to go on)."""
    where = e.filename or "the output"
    if e.errno == errno.EROFS:
        return f"cannot write {where}: read-only file system; choose a writable location", 2
    return (
        f"{e.strerror} while writing {where}; nothing half-written was kept: free some "
        "space and run the command again",
        1,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = build_parser().parse_args(argv)
    from molf.atomic import DISK_ERRNOS, Terminated

    try:
        return COMMANDS[ns.command](ns, argv)
    except MolfError as e:
        print(f"molf: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2: bad input; 1: e.g. an upload that failed
    except (Interrupted, Terminated) as e:
        print(f"molf: {e}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        message, code = _disk_message(e)
        print(f"molf: error: {message}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(
            "molf: interrupted; continue with --resume (from the latest checkpoint)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
