"""tools/benchmark_fresh_memory.py on a few MiB: it writes what it times."""

import json
import sys

import numpy as np

from tests.scripts import ROOT
from tests.scripts import load_script

TOOL = ROOT / "tools" / "benchmark_fresh_memory.py"
tool = load_script(TOOL, "benchmark_fresh_memory")


def test_fill_writes_every_byte_of_every_array_and_times_each():
    arrays = [np.zeros(3 * 2**20 + 5, np.uint8) for _ in range(2)]
    seconds = tool.fill(arrays, threads=3, value=7)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert all((a == 7).all() for a in arrays)


def test_report_has_a_rate_per_array_for_both_writes(monkeypatch, capsys):
    argv = ["benchmark_fresh_memory.py", "--gib", "0.01", "--chunk-gib", "0.005"]
    monkeypatch.setattr(sys, "argv", argv)
    tool.main()
    report = json.loads(capsys.readouterr().out)
    assert report["threads"] == 2
    assert len(report["first_write_gbps"]) == len(report["second_write_gbps"]) == 2
    assert all(r > 0 for r in report["first_write_gbps"] + report["second_write_gbps"])
