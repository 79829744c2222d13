"""The NB201 correlation experiment on a few cells (smoke config): its records, resumption, and
config errors."""
import json
import os

import numpy as np
import pytest

from experiments import nas_correlation
from research.core.config import ConfigError, build, load_config
from research.nas.benchmark import NASCorrelation

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(os.environ.get("RESEARCH_DATA_DIR", ""), "nasbench201",
                                    "zc_nasbench201.json")),
    reason="NB201 ground-truth file absent (RESEARCH_DATA_DIR)")


def test_smoke_run_records_every_proxy_and_a_rerun_reuses_the_scores(tmp_path, capsys):
    config = load_config("configs/nas_correlation.py:smoke", {"proxies": ("params", "flops", "naswot")})
    summary = nas_correlation.main(config, str(tmp_path))
    assert summary["n_cells"] == 3
    for table in ("spearman", "kendall", "seconds_per_cell"):
        assert set(summary[table]) == {"params", "flops", "naswot"}
    # params and flops rank cells alike here: both grow with the number of convs
    assert {"results.json", "results.md", "scores.json", "correlation.png"} <= set(os.listdir(tmp_path))
    with open(tmp_path / "scores.json") as f:
        scores = json.load(f)["cells"]
    assert len(scores) == 3 and all(set(v) == {"params", "flops", "naswot"} for v in scores.values())
    for key, row in scores.items():  # the NASLib key's cell, counted in the smoke network's size
        assert np.isfinite(row["naswot"]["value"])
    capsys.readouterr()
    again = nas_correlation.main(config, str(tmp_path))
    assert "3 already scored" in capsys.readouterr().out
    assert again["spearman"] == summary["spearman"]


@pytest.mark.parametrize("key,value,message", [
    ("dataset", "imagenet", "dataset"), ("mode", "fast", "mode"), ("proxies", ("zico", "foo"), "proxies"),
    ("data.num_images", 16, "data.num_images"),
])
def test_bad_config_values_are_rejected(key, value, message):
    config = load_config("configs/nas_correlation.py:smoke", {key: value})
    with pytest.raises(ConfigError, match=message):
        build(NASCorrelation, config)
