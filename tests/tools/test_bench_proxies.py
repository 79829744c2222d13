"""The proxy benchmark on a tiny NB201 network: both exact ways score, and the ratio is reported
(the masked ways run the scoring code that tests/nas covers)."""
import json
import sys

import pytest

from tools.bench import proxies


@pytest.mark.slow  # 82 s on a busy 2-core CPU: each primitive of the op-by-op way compiles first
def test_small_run_reports_both_exact_ways(tmp_path, monkeypatch):
    out = tmp_path / "report.json"
    monkeypatch.setattr(sys, "argv", ["proxies", "--proxy", "grad_norm", "--cells", "2", "--images", "4",
                                      "--width", "4", "--cells-per-stage", "1", "--no-masked",
                                      "--out", str(out)])
    proxies.main()
    report = json.loads(out.read_text())
    assert report["exact_primitives_cells_per_s"] > 0 and report["exact_serial_cells_per_s"] > 0
    assert report["exact_serial_over_primitives"] > 0 and "masked_vmap_cells_per_s" not in report
