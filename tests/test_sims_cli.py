"""`airan sim generate/info/sites`: options reach the simulator, mistakes are reported, not raised."""
from __future__ import annotations

import yaml
from typer.testing import CliRunner

from airan.cli import app
from airan.config import DEFAULT_CONFIG, parse_config
from sims.events import EVENT_KINDS
from sims.trace import read_trace

runner = CliRunner()


def test_generate_with_explicit_events_from_a_config_then_info_and_sites(tmp_path):
    out = tmp_path / "t"
    result = runner.invoke(app, [
        "sim", "generate", str(out), "--config", str(DEFAULT_CONFIG), "--duration", "20m", "--interval", "10s",
        "--start", "2025-06-07T21:00:00Z", "--seed", "4", "--events", "0", "--flash-per-cell-day", "0",
        "--event", "cell_outage:bs-02/c1@5m+4m:0.9", "--event", "interference:bs-01/c1@10m+5m",
        "--summary-every", "5m", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert "3 sites" in result.output
    tr = read_trace(out)
    assert [EVENT_KINDS[k] for k in tr.events.kind] == ["cell_outage", "interference"]
    assert tr.events.start_s.tolist() == [300.0, 600.0] and tr.events.severity.tolist()[1] == 1.0
    assert list(tr.topology.site_ids) == ["bs-01", "bs-02", "bs-03"]
    assert tr.start.weekday() == 5 and tr.interval_s == 10
    info = runner.invoke(app, ["sim", "info", str(out)])
    assert info.exit_code == 0 and "cell_outage" in info.output and "kpi_summary" in info.output
    sites = runner.invoke(app, ["sim", "sites", str(out)])
    assert sites.exit_code == 0
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.pop("catalog")  # a file name that only load_config resolves; not needed here
    raw["sites"] = yaml.safe_load(sites.output)["sites"]
    assert [s.id for s in parse_config(raw).sites] == ["bs-01", "bs-02", "bs-03"]


def test_mistakes_exit_1_with_a_message(tmp_path):
    for args, words in (
        (["--interval", "2s", "--duration", "bad"], "not a duration"),
        (["--interval", "0.5s"], "1 s .. 15 min"),
        (["--event", "meteor:bs-01/c1@1m+1m"], "kind must be one of"),
        (["--event", "cell_outage:bs-99/c1@1m+1m"], "no cell"),
    ):
        result = runner.invoke(app, ["sim", "generate", str(tmp_path / "x"), "--no-progress", *args])
        assert result.exit_code == 1 and words in result.output, (args, result.output)
    result = runner.invoke(app, ["sim", "info", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "not a trace" in result.output
