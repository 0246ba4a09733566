"""cvarch.quadrants: the lecture's transfer-learning 2×2, measured from a sweep folder; its Hydra callback.

Every test builds a fake sweep the way Hydra writes one: ``<sweep>/<job>/.hydra/overrides.yaml`` and
``<sweep>/<job>/metrics.json``, plus the source run in ``<sweep>/source``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

import cvarch
from cvarch import quadrants
from cvarch.quadrants import (
    LECTURE,
    QuadrantsCallback,
    collect,
    job_accuracy,
    markdown,
    report,
    run,
    summarize,
)
from cvarch.transfer import STRATEGIES
from tests import wandb_log
from tests.conftest import ROOT, run_main, tmp_overrides

DEFAULT_SOURCE = "${hydra:sweep.dir}/source.ckpt"  # the experiment's transfer.source
SIMILAR, DIFFERENT = "cifar10_last5", "digits_rgb32"
# a stage-probe job whose best val stage (stage1) is not its best test stage (stage2)
STAGE_METRICS = {
    "val/acc_stage1": 0.9,
    "val/acc_stage2": 0.5,
    "val/acc_stage3": 0.6,
    "test/acc_stage1": 0.2,
    "test/acc_stage2": 0.95,
    "test/acc_stage3": 0.3,
    "test/acc": 0.25,  # the head trained on the last stage, not what the table reports
}


def write_job(sweep: Path, job: str, overrides: list[str], metrics: dict | None) -> Path:
    """One job folder as Hydra writes it; ``metrics=None`` leaves it unfinished (no metrics.json)."""
    folder = sweep / job
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def cell_job(sweep: Path, job: int, data: str, per_class: str, strategy: str, seed: int, metrics) -> None:
    overrides = [f"data={data}", f"data.train_per_class={per_class}", f"transfer={strategy}", f"seed={seed}"]
    write_job(sweep, str(job), overrides, metrics)


def make_sweep(sweep: Path) -> Path:
    """A partial quadrant sweep with known numbers:

    - little/similar: linear_probe 0.5, 0.6, 0.7 (mean 0.6, std 0.1) beats scratch 0.3, 0.4, 0.5: agrees;
    - little/different: stage_probes (stage1 chosen on val: 0.2, and 0.4) loses to scratch 0.8: disagrees;
    - more/similar: finetune_top 0.9 beats finetune_all 0.85: agrees;
    - more/different: no finished job (job 11 never wrote metrics.json): "—".
    """
    jobs = [
        *[(SIMILAR, "10", "linear_probe", s, {"test/acc": a}) for s, a in enumerate((0.5, 0.6, 0.7))],
        *[(SIMILAR, "10", "scratch", s, {"test/acc": a}) for s, a in enumerate((0.3, 0.4, 0.5))],
        (DIFFERENT, "10", "stage_probes", 0, STAGE_METRICS),
        (DIFFERENT, "10", "stage_probes", 1, {**STAGE_METRICS, "test/acc_stage1": 0.4}),
        (DIFFERENT, "10", "scratch", 0, {"test/acc": 0.8}),
        (SIMILAR, "null", "finetune_top", 0, {"test/acc": 0.9}),
        (SIMILAR, "null", "finetune_all", 0, {"test/acc": 0.85}),
        (DIFFERENT, "null", "finetune_all", 0, None),
    ]
    for num, (data, per_class, strategy, seed, metrics) in enumerate(jobs):
        cell_job(sweep, num, data, per_class, strategy, seed, metrics)
    # the source run trained by the callback: not a job of the table, although it has metrics
    write_job(sweep, "source", ["experiment=transfer_source"], {"test/acc": 0.99, "best_ckpt": "x.ckpt"})
    return sweep


@pytest.fixture
def sweep(tmp_path) -> Path:
    return make_sweep(tmp_path / "sweep")


def table_rows(text: str) -> dict[str, list[str]]:
    """The markdown table as ``{row title: [similar cell, different cell]}`` (header row under "")."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            title, *cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[title] = cells
    return rows


def test_the_experiment_config_matches_the_callback():
    """The YAML's sweep, callback and default source are what the module recognizes."""
    node = yaml.safe_load((ROOT / "conf" / "experiment" / "transfer_quadrants.yaml").read_text())
    assert node["transfer"]["source"] == DEFAULT_SOURCE  # the string on_multirun_start compares against
    params = node["hydra"]["sweeper"]["params"]
    assert set(params["data"].split(",")) == set(quadrants.DATASETS)
    assert params["data.train_per_class"].split(",") == ["10", "null"]  # little, more
    assert tuple(params["transfer"].split(",")) == STRATEGIES
    assert set(LECTURE.values()) <= set(STRATEGIES)
    callback = instantiate(node["hydra"]["callbacks"]["transfer_quadrants"])
    assert isinstance(callback, QuadrantsCallback) and callback.source == ["experiment=transfer_source"]


def test_job_accuracy_of_a_plain_job_is_its_test_accuracy():
    assert job_accuracy({"test/acc": 0.75, "val/acc": 0.8}) == (0.75, None)


def test_job_accuracy_of_stage_probes_picks_the_stage_on_val_and_reports_its_test():
    # stage2 has the best test accuracy, stage1 the best val: picking on test would give 0.95
    assert job_accuracy(STAGE_METRICS) == (0.2, "stage1")
    assert job_accuracy({**STAGE_METRICS, "val/acc_stage3": 0.95}) == (0.3, "stage3")


def test_collect_parses_finished_jobs_lists_unfinished_and_skips_the_source(sweep):
    jobs, unfinished = collect(sweep)
    assert unfinished == ["11"]
    assert len(jobs) == 11 and "source" not in {j["job"] for j in jobs}
    by_job = {j["job"]: j for j in jobs}
    assert by_job["0"] == {
        "job": "0",
        "dataset": "similar",
        "amount": "little",
        "train_per_class": "10",
        "strategy": "linear_probe",
        "seed": 0,
        "test_acc": 0.5,
        "stage": None,
        "wall_s": None,
    }
    assert (by_job["7"]["dataset"], by_job["7"]["amount"]) == ("different", "little")
    assert (by_job["6"]["test_acc"], by_job["6"]["stage"]) == (0.2, "stage1")
    assert (by_job["7"]["seed"], by_job["7"]["test_acc"]) == (1, 0.4)
    assert (by_job["9"]["dataset"], by_job["9"]["amount"], by_job["9"]["strategy"]) == (
        "similar",
        "more",
        "finetune_top",
    )


def test_summarize_gives_mean_sample_std_best_and_the_lectures_choice(sweep):
    summary = summarize(collect(sweep)[0])
    assert summary["jobs"] == 11
    cells = summary["cells"]
    assert set(cells) == {"little/similar", "little/different", "more/similar"}
    probe = cells["little/similar"]["strategies"]["linear_probe"]
    assert probe["mean"] == pytest.approx(0.6) and probe["std"] == pytest.approx(0.1)  # n−1, not n (0.0816)
    assert (probe["n"], probe["accs"]) == (3, [0.5, 0.6, 0.7])
    stages = cells["little/different"]["strategies"]["stage_probes"]
    assert stages["mean"] == pytest.approx(0.3) and stages["stages"] == ["stage1", "stage1"]
    assert cells["more/similar"]["strategies"]["finetune_top"]["std"] == 0.0  # one seed
    assert {name: (c["best"], c["lecture"]) for name, c in cells.items()} == {
        "little/similar": ("linear_probe", "linear_probe"),
        "little/different": ("scratch", "stage_probes"),
        "more/similar": ("finetune_top", "finetune_top"),
    }


def test_summarize_names_the_lectures_choice_in_every_cell():
    jobs = [
        {"amount": a, "dataset": d, "strategy": "scratch", "test_acc": 0.5, "stage": None}
        for a in ("little", "more")
        for d in ("similar", "different")
    ]
    lecture = {name: cell["lecture"] for name, cell in summarize(jobs)["cells"].items()}
    assert lecture == {
        "little/similar": "linear_probe",
        "little/different": "stage_probes",
        "more/similar": "finetune_top",
        "more/different": "finetune_all",
    }


def test_markdown_lays_out_the_2x2_with_best_and_lecture_marked(sweep):
    jobs, unfinished = collect(sweep)
    text = markdown(summarize(jobs), unfinished)
    lines = text.splitlines()
    assert lines[0] == "| | very similar dataset | very different dataset |"
    assert lines[2].startswith("| very little data |") and lines[3].startswith("| quite a lot of data |")
    rows = table_rows(text)
    similar, different = rows["very little data"]
    assert similar.split("<br>") == ["scratch 40.0 ± 10.0", "**linear_probe 60.0 ± 10.0 ◆ ★**"]
    assert different.split("<br>") == ["**scratch 80.0 ± 0.0 ★**", "stage_probes 30.0 ± 14.1 ◆"]
    assert rows["quite a lot of data"] == ["**finetune_top 90.0 ± 0.0 ◆ ★**<br>finetune_all 85.0 ± 0.0", "—"]
    assert "mean ± std over 1/2/3 seeds" in text
    verdicts = [line for line in lines if line.startswith("- ")]
    assert verdicts == [
        "- very little data, very similar dataset: best `linear_probe`; the lecture says `linear_probe` "
        "(agrees).",
        "- very little data, very different dataset: best `scratch`; the lecture says `stage_probes` "
        "(disagrees).",
        "- quite a lot of data, very similar dataset: best `finetune_top`; the lecture says `finetune_top` "
        "(agrees).",
        "- unfinished jobs (no metrics.json): 11",
    ]


def test_report_writes_json_and_markdown_into_the_sweep(sweep):
    summary = report(sweep)
    assert json.loads((sweep / "quadrants.json").read_text()) == summary
    assert summary["failed"] == ["11"] and len(summary["runs"]) == 11
    assert (sweep / "quadrants.md").read_text() == markdown(summary, ["11"])


def test_report_works_on_a_partial_sweep(tmp_path):
    cell_job(tmp_path, 0, DIFFERENT, "null", "finetune_all", 0, {"test/acc": 0.97})
    cell_job(tmp_path, 1, DIFFERENT, "null", "scratch", 0, None)
    summary = report(tmp_path)
    assert set(summary["cells"]) == {"more/different"} and summary["failed"] == ["1"]
    rows = table_rows((tmp_path / "quadrants.md").read_text())
    assert rows["very little data"] == ["—", "—"]
    assert rows["quite a lot of data"] == ["—", "**finetune_all 97.0 ± 0.0 ◆ ★**"]


def test_report_of_a_sweep_without_finished_jobs_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        report(tmp_path)
    write_job(tmp_path, "source", ["experiment=transfer_source"], {"test/acc": 0.99})  # the source alone
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        report(tmp_path)


def compose_quadrants(*overrides: str):
    return cvarch.compose(*overrides, config_name="quadrants")


def test_run_prints_the_table_and_needs_a_sweep_dir(sweep, capsys):
    summary = run(compose_quadrants(f"sweep_dir={sweep}"))
    out = capsys.readouterr().out
    assert "| | very similar dataset | very different dataset |" in out
    assert (sweep / "quadrants.md").read_text() in out and summary["failed"] == ["11"]
    with pytest.raises(MissingMandatoryValue, match="Missing mandatory value: sweep_dir"):
        run(compose_quadrants())


@pytest.mark.slow  # a fresh interpreter importing torch and Lightning: ~7 s on 2 cores
def test_python_m_cvarch_quadrants_prints_the_table_and_the_sweep_last(sweep, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    command = [sys.executable, "-m", "cvarch.quadrants"]
    proc = subprocess.run(
        [*command, f"sweep_dir={sweep}"], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| | very similar dataset | very different dataset |" in proc.stdout
    assert "**linear_probe 60.0 ± 10.0 ◆ ★**" in proc.stdout
    assert (sweep / "quadrants.md").read_text() in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == str(sweep)
    assert not list(cwd.iterdir()) and not (sweep / ".hydra").exists()  # Hydra wrote nothing of its own
    proc = run_main("python -m cvarch.quadrants")  # in this process: the same exit status and message
    assert proc.returncode != 0 and "Missing mandatory value: sweep_dir" in proc.stderr


def callback_config(sweep: Path, source: str = DEFAULT_SOURCE, logger: dict | None = None):
    """The parts of a multirun's config the callback reads."""
    return OmegaConf.create(
        {
            "hydra": {"sweep": {"dir": str(sweep)}},
            "transfer": {"source": source},
            "task_name": "transfer_quadrants",
            "logger": logger,
        }
    )


def no_subprocess(*args, **kwargs):
    pytest.fail(f"subprocess.run called: {args}")


def test_on_multirun_start_keeps_a_source_already_in_the_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(quadrants.subprocess, "run", no_subprocess)
    (tmp_path / "source.ckpt").write_bytes(b"trained before")
    QuadrantsCallback().on_multirun_start(callback_config(tmp_path))
    assert (tmp_path / "source.ckpt").read_bytes() == b"trained before"
    assert not (tmp_path / "source").exists()


def test_on_multirun_start_trains_the_source_and_copies_its_best_checkpoint(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    best = tmp_path / "elsewhere" / "epoch014-acc0.9000.ckpt"
    best.parent.mkdir()
    best.write_bytes(b"best weights")
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        (sweep / "source").mkdir(parents=True)
        (sweep / "source" / "metrics.json").write_text(json.dumps({"best_ckpt": str(best)}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(quadrants.subprocess, "run", fake_run)
    source = ["experiment=transfer_source", "trainer=gpu"]
    QuadrantsCallback(source=source).on_multirun_start(callback_config(sweep))
    command = [sys.executable, "-m", "cvarch.train", *source, f"hydra.run.dir={sweep / 'source'}"]
    assert commands == [command]
    assert (sweep / "source.ckpt").read_bytes() == b"best weights"


def test_on_multirun_start_checks_a_user_given_source(tmp_path, monkeypatch):
    monkeypatch.setattr(quadrants.subprocess, "run", no_subprocess)
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        QuadrantsCallback().on_multirun_start(callback_config(tmp_path, source=str(missing)))
    given = tmp_path / "mine.ckpt"
    given.write_bytes(b"mine")
    QuadrantsCallback().on_multirun_start(callback_config(tmp_path, source=str(given)))
    assert not (tmp_path / "source.ckpt").exists()  # the user's file is used where it is


def test_on_multirun_end_writes_the_report_and_prints_the_sweep_last(sweep, capsys):
    QuadrantsCallback().on_multirun_end(callback_config(sweep))
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(sweep) and out[0] == "| | very similar dataset | very different dataset |"
    assert (sweep / "quadrants.json").is_file() and (sweep / "quadrants.md").is_file()
    assert not (sweep / "wandb").exists()  # no wandb logger, no W&B run


def test_on_multirun_end_logs_the_table_to_an_offline_wandb_run(sweep, tmp_path, monkeypatch):
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }.items():
        monkeypatch.setenv(name, value)
    # the logger node as conf/logger/wandb.yaml has it: its interpolations must not need resolving here
    wandb_node = {
        "project": "cvarch",
        "mode": "offline",
        "save_dir": "${paths.output_dir}",
        "tags": "${tags}",
    }
    QuadrantsCallback().on_multirun_end(callback_config(sweep, logger={"wandb": wandb_node}))
    summary = json.loads((sweep / "quadrants.json").read_text())
    runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("run-*.wandb"))
    # the Table's history item, its nested keys flattened by the reader:
    # transfer_quadrants/{_type,path,nrows,…}
    rows = [r for r in wandb_log.history(log) if "transfer_quadrants/_type" in r]
    assert len(rows) == 1 and rows[0]["transfer_quadrants/_type"] == "table-file"
    assert rows[0]["transfer_quadrants/nrows"] == 6  # 2 + 2 + 2 strategies in the three finished cells
    table = json.loads((runs[0] / "files" / rows[0]["transfer_quadrants/path"]).read_text())
    assert table["columns"] == [
        "cell",
        "strategy",
        "test_acc_mean",
        "test_acc_std",
        "seeds",
        "best",
        "lecture",
    ]
    assert len(table["data"]) == 6
    by_row = {(r[0], r[1]): r[2:] for r in table["data"]}
    cell = summary["cells"]["little/similar"]["strategies"]["linear_probe"]
    assert by_row["little/similar", "linear_probe"] == [cell["mean"], cell["std"], 3, True, True]
    assert by_row["little/different", "stage_probes"][-2:] == [False, True]  # the lecture's, not the best


@pytest.mark.slow
def test_the_experiment_runs_end_to_end_on_real_cifar10_and_digits(cifar_root, cifar_cache, tmp_path):
    """The whole pipeline, shortened: source training, the four cells, two strategies, the report."""
    sweep = tmp_path / "sweep"
    cache_dir = cifar_cache.split("=", 1)[1]
    result = run_main(
        "cvarch-train",
        "experiment=transfer_quadrants",
        *tmp_overrides(tmp_path),
        cifar_cache,
        f"paths.data_dir={cifar_root.parent}",
        "logger=none",
        "trainer.max_steps=2",
        "trainer.val_check_interval=1",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "hydra.sweeper.params.seed=0",
        "hydra.sweeper.params.transfer='linear_probe,stage_probes'",
        'hydra.callbacks.transfer_quadrants.source=["experiment=transfer_source","trainer.max_epochs=1",'
        f'"data.max_per_class=100","paths.cache_dir={cache_dir}","logger=none"]',
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    source = json.loads((sweep / "source" / "metrics.json").read_text())
    assert (sweep / "source.ckpt").read_bytes() == Path(source["best_ckpt"]).read_bytes()
    summary = json.loads((sweep / "quadrants.json").read_text())
    assert summary["jobs"] == 8 and not summary["failed"]
    assert set(summary["cells"]) == {"little/similar", "little/different", "more/similar", "more/different"}
    for cell in summary["cells"].values():
        assert set(cell["strategies"]) == {"linear_probe", "stage_probes"}
    assert "| very little data |" in (sweep / "quadrants.md").read_text()


def test_the_table_goes_between_the_readme_markers(sweep, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- quadrants:begin -->\nold table\n<!-- quadrants:end -->\nafter\n")
    run(compose_quadrants(f"sweep_dir={sweep}", f"readme={readme}"))
    text = readme.read_text()
    table = (sweep / "quadrants.md").read_text()
    assert text == f"# x\n\nbefore\n<!-- quadrants:begin -->\n{table}<!-- quadrants:end -->\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match=r"README\.md has no '<!-- quadrants:begin -->'"):
        quadrants.write_readme(table, readme)
