"""benchmarks/report.py: cost ratios and the 25% regression check, on fake pytest-benchmark JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPORT_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "report.py"


def _load_report():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report()

BASE_S = 2e-3  # above report.MIN_BASELINE_S, so the group is checked


def bench(group: str, name: str, median: float, role: str | None = None) -> dict:
    """One entry of pytest-benchmark's ``benchmarks`` list."""
    return {
        "group": group,
        "name": name,
        "fullname": f"benchmarks/test_fake.py::{name}",
        "stats": {"median": median, "mean": median, "stddev": 0.0, "rounds": 5},
        "extra_info": {"role": role} if role else {},
    }


def run(slow_factor: float = 1.0, base: float = BASE_S) -> list[dict]:
    """Two groups; ``slow_factor`` scales the non-baseline medians of group ``search``."""
    return [
        bench("search", "test_torch", base, "baseline"),
        bench("search", "test_faiss", 3 * base * slow_factor, "candidate"),
        bench("search", "test_ivf", 0.5 * base * slow_factor, "candidate"),
        bench("mmr", "test_loop", 4 * base, "baseline"),
        bench("mmr", "test_batched", base, "candidate"),
        bench("mmr", "test_unlabelled", base),  # no role: not a ratio
        bench("orphan", "test_alone", base, "candidate"),  # no baseline in its group
    ]


EXPECTED = {"search :: test_faiss": 3.0, "search :: test_ivf": 0.5, "mmr :: test_batched": 0.25}


def write_raw(tmp_path: Path, benchmarks: list[dict], name: str = "raw.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return path


class TestRatios:
    def test_median_over_group_baseline(self):
        ratios = report.cost_ratios(run())
        assert ratios.keys() == EXPECTED.keys()
        for key, want in EXPECTED.items():
            assert ratios[key] == pytest.approx(want)

    def test_short_baselines_are_not_checked(self):
        short = report.MIN_BASELINE_S / 2
        tiny = [bench("tiny", "test_base", short, "baseline"), bench("tiny", "test_x", short, "c")]
        benchmarks = run() + tiny
        assert "tiny :: test_x" in report.cost_ratios(benchmarks)
        assert report.checked_ratios(benchmarks) == pytest.approx(EXPECTED)


class TestCheck:
    def baseline(self) -> dict[str, float]:
        return report.checked_ratios(run())

    def test_unchanged_run_passes(self):
        assert report.check(report.checked_ratios(run()), self.baseline()) == []

    @pytest.mark.parametrize("factor", [0.5, 1.0, 1.2])
    def test_up_to_20_percent_worse_passes(self, factor):
        assert report.check(report.checked_ratios(run(factor)), self.baseline()) == []

    def test_30_percent_worse_fails(self):
        failures = report.check(report.checked_ratios(run(1.3)), self.baseline())
        assert len(failures) == 2
        assert failures[0].startswith("search :: test_faiss: cost ratio 3.900 vs baseline 3.000")
        assert failures[1].startswith("search :: test_ivf:")

    def test_missing_benchmark_fails(self):
        ratios = report.cost_ratios([b for b in run() if b["name"] != "test_faiss"])
        failures = report.check(ratios, self.baseline())
        assert failures == ["search :: test_faiss: not measured in this run (renamed or removed? rewrite the baseline)"]


class TestMain:
    """``--check`` and ``--write-baseline`` end to end; results go to tmp_path."""

    MACHINE = {"device": "cpu", "cpu_model": "Fake CPU 1"}

    @pytest.fixture(autouse=True)
    def _results_in_tmp(self, tmp_path, monkeypatch):
        monkeypatch.setattr(report, "RESULTS", tmp_path / "results")
        monkeypatch.setattr(report, "machine_info", lambda device: dict(self.MACHINE))

    def write_baseline(self, tmp_path, machine=None) -> Path:
        baseline = tmp_path / "baseline.json"
        body = {"machine": report.comparable(machine or self.MACHINE), "ratios": report.checked_ratios(run())}
        baseline.write_text(json.dumps(body))
        return baseline

    @pytest.mark.parametrize(("factor", "rc"), [(1.0, 0), (1.2, 0), (1.3, 1)])
    def test_check_exit_code(self, tmp_path, capsys, factor, rc):
        baseline = self.write_baseline(tmp_path)
        raw = write_raw(tmp_path, run(factor))
        assert report.main([str(raw), "--machine", "fake", "--check", str(baseline)]) == rc
        assert ("FAILED" in capsys.readouterr().out) == bool(rc)
        assert not (tmp_path / "results" / "fake.json").exists()  # --check writes no results

    def test_check_counts_each_ratio_by_its_best_run(self, tmp_path):
        """A burst in one run is outvoted by a clean run; a regression in every run still fails."""
        baseline = self.write_baseline(tmp_path)
        noisy, clean, slow = (write_raw(tmp_path, run(f), f"run-{f}.json") for f in (1.5, 1.0, 1.4))
        args = ["--machine", "fake", "--check", str(baseline)]
        assert report.main([str(noisy), str(clean), *args]) == 0
        assert report.main([str(noisy), str(slow), *args]) == 1

    @pytest.mark.parametrize("recorded", [{"device": "cpu", "cpu_model": "Fake CPU 2"}, None])
    def test_check_refuses_another_machine(self, tmp_path, capsys, recorded):
        if recorded is None:  # a flat file of ratios, from before machines were recorded
            baseline = tmp_path / "baseline.json"
            baseline.write_text(json.dumps(report.checked_ratios(run())))
        else:
            baseline = self.write_baseline(tmp_path, recorded)
        raw = write_raw(tmp_path, run())
        assert report.main([str(raw), "--machine", "fake", "--check", str(baseline)]) == 2
        out = capsys.readouterr().out
        assert "regression check NOT RUN" in out and "Fake CPU 1" in out

    def test_write_baseline_keeps_the_worst(self, tmp_path):
        baseline = tmp_path / "baseline.json"
        for factor in (1.0, 1.1, 0.9):
            raw = write_raw(tmp_path, run(factor))
            args = [str(raw), "--machine", "fake", "--no-plots", "--write-baseline", str(baseline)]
            assert report.main(args) == 0
        merged = json.loads(baseline.read_text())
        assert merged["machine"] == report.comparable(self.MACHINE)
        worst = {"search :: test_faiss": 3.3, "search :: test_ivf": 0.55}  # from the 1.1x run
        assert merged["ratios"] == pytest.approx({**EXPECTED, **worst})
        results = json.loads((tmp_path / "results" / "fake.json").read_text())
        last = {"search :: test_faiss": 2.7, "search :: test_ivf": 0.45}  # results file: last run
        assert results["ratios"] == pytest.approx({**EXPECTED, **last})

    def test_write_baseline_from_another_machine_starts_afresh(self, tmp_path):
        baseline = self.write_baseline(tmp_path, {"device": "cpu", "cpu_model": "Fake CPU 2"})
        body = json.loads(baseline.read_text())
        body["ratios"] = {key: 100.0 for key in body["ratios"]}
        baseline.write_text(json.dumps(body))
        raw = write_raw(tmp_path, run())
        assert report.main([str(raw), "--machine", "fake", "--no-plots", "--write-baseline", str(baseline)]) == 0
        assert json.loads(baseline.read_text())["ratios"] == pytest.approx(EXPECTED)
