"""`molf report` over real runs of every kind: figures, tables and the data behind them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from molf.cli import main
from molf.errors import MolfError
from molf.report import heatmap_rows, load_run, routing_matrix, share_series, write_report
from molf.report.page import choosing
from molf.report.plots import _rolling, plot_training
from molf.report.routing import bin_columns, first_expert_share
from molf.report.runs import series
from molf.report.tables import comparison_table, single_run_table, to_markdown
from molf.routing_log import NONE, SEVERAL
from molf.routing_stats import TYPE_ORDER, group_modules, layer_index, module_type
from molf.train import checkpoint as checkpoint_module

METHODS = ("fft", "lora", "molf", "molf-e")
STEPS = 6
QUICK = [
    "--task", "jsonl", "--batch-size", "4", "--eval-batch-size", "8", "--max-new-tokens", "4",
    "--lora-ranks", "4,8", "--lora-alphas", "8,8", "--lr", "1e-3", "--max-steps", str(STEPS),
    "--eval-on-train",  # 8 rows: too few to hold some out reliably
]  # fmt: skip


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data) -> dict[str, Path]:
    """Real runs on stories260k: one per method (molf with --eval-steps 2), and one
    killed after step 3."""
    root = tmp_path_factory.mktemp("report")
    data = root / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Tom has {i} cats. Tom has", "completion": f" {i} cats."}) + "\n"
            for i in range(8)
        )
    )
    base = ["train", "--model", str(shared_data / "models" / "stories260k"), "--data", str(data)]
    out = {}
    for method in METHODS:
        out[method] = root / "runs" / method
        argv = [*base, *QUICK, "--method", method, "--output-dir", str(out[method])]
        assert main([*argv, *(["--eval-steps", "2"] if method == "molf" else [])]) == 0
    # a run killed right after its checkpoint at step 3: logs up to 3, no "after"
    out["killed"] = root / "runs" / "killed"
    argv = [*base, *QUICK, "--method", "molf", "--output-dir", str(out["killed"])]
    real_save = checkpoint_module.save_checkpoint

    def save_then_crash(*a, **kw):
        real_save(*a, **kw)
        raise Crash

    checkpoint_module.save_checkpoint = save_then_crash
    try:
        with pytest.raises(Crash):
            main([*argv, "--save-steps", "3"])
    finally:
        checkpoint_module.save_checkpoint = real_save
    return out


def _copy(run: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("final", "checkpoint-*"))
    return dst


# -- modules: types and layers -------------------------------------------------------------


def test_module_names_group_by_type_then_layer():
    names = [
        "model.layers.10.mlp.down_proj",
        "model.layers.2.self_attn.q_proj",
        "model.layers.10.self_attn.q_proj",
        "model.layers.2.mlp.down_proj",
        "lm_head",
        "model.layers.1.self_attn.q_proj",
    ]
    assert module_type(names[0]) == "down_proj" and layer_index(names[0]) == 10
    assert layer_index("lm_head") is None
    assert group_modules(names) == {"q_proj": [5, 1, 2], "down_proj": [3, 0], "lm_head": [4]}


# -- routing data equals routing.jsonl ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["molf", "molf-e"])
def test_routing_matrix_equals_routing_jsonl(runs, method):
    lines = _jsonl(runs[method] / "routing.jsonl")
    head, steps = lines[0], lines[1:]
    m = routing_matrix(runs[method])
    assert m.modules == head["modules"] and m.experts == head["experts"]
    assert m.steps.tolist() == [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert m.selected.shape == (len(head["modules"]), STEPS, len(head["experts"]))
    for s, line in enumerate(steps):
        for i, won in enumerate(line["winners"]):
            assert np.flatnonzero(m.selected[i, s]).tolist() == won
            assert m.winners[i, s] == won[0]  # top-1: exactly one winner
        np.testing.assert_array_equal(m.scores[:, s], np.array(line["scores"]))
    # heatmap rows: stories260k's 5 layers, grouped q, k, v, o, gate, up, down
    order, groups = heatmap_rows(m)
    assert [g[0] for g in groups] == list(TYPE_ORDER)
    assert [m.modules[i] for i in order[:5]] == [
        f"model.layers.{k}.self_attn.q_proj" for k in range(5)
    ]
    assert [(start, end) for _, start, end in groups] == [(5 * i, 5 * i + 5) for i in range(7)]
    # share of down_proj layers choosing each expert at each step, counted by hand
    down = [i for i, name in enumerate(head["modules"]) if name.endswith("down_proj")]
    expected = [
        [sum(e in line["winners"][i] for i in down) / len(down) for e in range(len(m.experts))]
        for line in steps
    ]
    np.testing.assert_allclose(share_series(m)["down_proj"], expected)
    # share of all layers that decided (some score not 0) choosing expert 0, by hand
    first = []
    for line in steps:
        made = [i for i, scores in enumerate(line["scores"]) if any(x != 0 for x in scores)]
        first.append(sum(0 in line["winners"][i] for i in made) / len(made))
    np.testing.assert_allclose(first_expert_share(m), first)


def test_winner_codes_and_binning_of_long_runs():
    codes = np.array([[0, 0, 1, 1, 1, NONE, 0], [SEVERAL, 1, 1, 0, 0, 0, 0]])
    binned, width = bin_columns(codes, 3)
    assert width == 3
    assert binned.tolist() == [[0, 1, 0], [1, 0, 0]]
    assert bin_columns(codes, 7) == (codes, 1)
    np.testing.assert_allclose(_rolling(np.array([1.0, 0, 0, 1, 1]), 2), [1, 0.5, 0, 0.5, 1])


# -- the report of every method together ------------------------------------------------------


@pytest.mark.slow
def test_report_of_every_method_writes_pngs_html_and_markdown(runs, tmp_path):
    dirs = [runs[m] for m in METHODS]
    out = tmp_path / "rep"
    assert main(["report", *map(str, dirs), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert set(images) == {p.name for p in out.glob("*.png")}
    assert set(images) == {
        "training.png",
        "routing-molf.png",
        "shares-molf.png",
        "routing-molf-e.png",
        "shares-molf-e.png",
        "routing-across-runs.png",  # two routed runs: their first expert's share together
    }  # no routing figures for fft and lora
    for name in images:
        with Image.open(out / name) as img:
            img.verify()
        assert (out / name).stat().st_size < 150_000, name
    summary = (out / "summary.md").read_text()
    assert all(f"]({name})" in summary for name in images)
    # rows = runs, columns = metrics after; the best of each column is marked, none when
    # every run ties
    table = comparison_table([load_run(d) for d in dirs])
    afters = [json.loads((d / "eval.json").read_text())["after"] for d in dirs]
    for col, name in enumerate(table.header):
        if name in afters[0]:
            best = max(a[name] for a in afters)
            marked = {r for r, c in table.best if c == col}
            tied = len({a[name] for a in afters}) == 1
            want = set() if tied else {r for r, a in enumerate(afters) if a[name] == best}
            assert marked == want, name
            assert [row[col] for row in table.rows] == [a[name] for a in afters]
    assert "**" in to_markdown(table) and "class='best'" in page


@pytest.mark.slow
def test_the_figure_across_runs_leaves_out_runs_that_update_every_expert(
    runs, tmp_path, shared_data
):
    """MoLF-E at top-2 of 2 experts updates both every step: nothing is chosen, so its
    first expert's share (1 throughout) stays out of the figure across runs."""
    every = tmp_path / "runs" / "molf-e-top2"
    base = ["train", "--model", str(shared_data / "models" / "stories260k")]
    data = runs["lora"].parent.parent / "pairs.jsonl"
    argv = [*base, "--data", str(data), *QUICK, "--method", "molf-e", "--top-k", "2"]
    assert main([*argv, "--output-dir", str(every)]) == 0
    matrix = routing_matrix(every)
    assert (first_expert_share(matrix) == 1).all()  # both experts every step
    routed = [
        (load_run(d), d.name, routing_matrix(d)) for d in (runs["molf"], runs["molf-e"], every)
    ]
    assert [slug for _, slug, _ in choosing(routed)] == ["molf", "molf-e"]
    out = tmp_path / "rep"
    write_report([runs["molf"], every], out)
    assert not (out / "routing-across-runs.png").exists()  # one run that chooses
    assert (out / "routing-molf-e-top2.png").is_file()  # its own figures stay
    write_report([runs["molf"], runs["molf-e"], every], out)
    assert (out / "routing-across-runs.png").is_file()


def test_the_training_figure_draws_the_eval_loss(runs, tmp_path):
    run = load_run(runs["molf"])
    assert series(run, "eval_loss")[0] == [2, 4, 6]
    bare = _copy(runs["molf"], tmp_path, "bare")
    log = [
        {k: v for k, v in r.items() if k != "eval_loss"}
        for r in _jsonl(run.path / "train_log.jsonl")
    ]
    (bare / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    with Image.open(plot_training([run], tmp_path / "eval.png")) as drawn:
        with Image.open(plot_training([load_run(bare, "molf")], tmp_path / "bare.png")) as plain:
            assert np.asarray(drawn).shape == np.asarray(plain).shape
            assert (np.asarray(drawn) != np.asarray(plain)).any()


@pytest.mark.slow
def test_one_run_report_goes_into_the_run_and_shows_deltas(runs, tmp_path):
    run = _copy(runs["molf"], tmp_path, "molf")
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "index.html").is_file()
    evals = json.loads((run / "eval.json").read_text())
    table = single_run_table(load_run(run))
    for name, before, after, delta in table.rows:
        assert before == evals["before"][name] and after == evals["after"][name]
        assert float(delta) == pytest.approx(after - before, abs=1e-4)
    assert f"| {table.rows[0][0]} |" in (run / "report" / "summary.md").read_text()


@pytest.mark.slow
def test_a_killed_run_is_shown_up_to_its_last_step(runs, tmp_path):
    killed = runs["killed"]
    assert "after" not in json.loads((killed / "eval.json").read_text())
    run = load_run(killed)
    assert not run.finished and list(run.train_log) == [1, 2, 3]
    assert routing_matrix(killed).steps.tolist() == [1, 2, 3]
    index = write_report([killed], tmp_path / "rep")
    assert "in progress or stopped" in index.read_text()
    assert (tmp_path / "rep" / "routing-killed.png").is_file()


@pytest.mark.slow
def test_a_repeated_step_shows_once_with_its_last_record(runs, tmp_path):
    run = _copy(runs["molf"], tmp_path, "resumed")
    log, routing = _jsonl(run / "train_log.jsonl"), _jsonl(run / "routing.jsonl")
    relogged = [{**r, "loss": 100.0 + r["step"]} for r in log[3:]]
    n = len(routing[0]["experts"])
    flipped = [{**r, "winners": [[(w[0] + 1) % n] for w in r["winners"]]} for r in routing[4:]]
    with open(run / "train_log.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in relogged)
    with open(run / "routing.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in flipped)
    loaded = load_run(run)
    assert list(loaded.train_log) == list(range(1, STEPS + 1))
    assert [loaded.train_log[s]["loss"] for s in (4, 5, 6)] == [104.0, 105.0, 106.0]
    m = routing_matrix(run)
    assert m.steps.tolist() == list(range(1, STEPS + 1))
    for s, line in enumerate(routing[1:4] + flipped):
        assert m.winners[:, s].tolist() == [w[0] for w in line["winners"]]
    write_report([run], tmp_path / "rep")


@pytest.mark.slow
def test_a_torn_last_line_is_skipped_with_a_warning(runs, tmp_path, caplog):
    run = _copy(runs["molf-e"], tmp_path, "torn")
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2')
    with open(run / "routing.jsonl", "a") as f:
        f.write('{"step": 7, "winn')
    with caplog.at_level("WARNING", logger="molf.report"):
        write_report([run], tmp_path / "rep")
    assert list(load_run(run).train_log) == list(range(1, STEPS + 1))
    assert routing_matrix(run).steps.tolist() == list(range(1, STEPS + 1))
    assert f"{run / 'train_log.jsonl'}:{STEPS + 1}: skipped a torn last line" in caplog.text
    assert f"{run / 'routing.jsonl'}:{STEPS + 2}: skipped a torn last line" in caplog.text


# -- bad input: one line naming the file (and line), exit 2 ------------------------------------


def _fails(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("molf: error: ") and needle in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_bad_input_names_the_file_and_line(runs, tmp_path, capsys):
    _fails(capsys, ["report", str(tmp_path / "nope")], f"{tmp_path / 'nope'}: no such run")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["report", str(tmp_path / "empty")], "not a molf run directory")
    run = _copy(runs["molf"], tmp_path, "bad")
    lines = (run / "train_log.jsonl").read_text().splitlines(keepends=True)
    (run / "train_log.jsonl").write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    _fails(capsys, ["report", str(run)], f"{run / 'train_log.jsonl'}:2: not valid JSON")
    (run / "train_log.jsonl").write_text("".join(lines))
    routing = (run / "routing.jsonl").read_text().splitlines(keepends=True)
    routing[2] = json.dumps({"step": 2, "winners": [[0]]}) + "\n"
    (run / "routing.jsonl").write_text("".join(routing))
    _fails(capsys, ["report", str(run)], f"{run / 'routing.jsonl'}:3: 'winners' must list")
    (run / "routing.jsonl").unlink()
    (run / "eval.json").write_text('{"before": {}, \n "after": }')
    _fails(capsys, ["report", str(run)], f"{run / 'eval.json'}:2: not valid JSON")
    with pytest.raises(MolfError, match="2 labels for 1 runs"):
        write_report([run], tmp_path / "rep", labels=["a", "b"])
