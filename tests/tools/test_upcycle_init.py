"""The init-perplexity tool on the smoke config: one row per variant, the layer-wise step applied
when asked, and bad variants refused before any model is loaded."""
import json

import pytest

from research.core.config import ConfigError
from tools import upcycle_init


def test_rows_per_variant_and_files(tmp_path):
    rows = upcycle_init.main(["--config", "configs/x_ecomla.py:smoke", "--out", str(tmp_path),
                              "--variant", "rope_key=shared reconstruct.steps=0",
                              "--variant", "rope_key=shared_fit reconstruct.steps=4"])
    assert [r["variant"] for r in rows] == ["rope_key=shared reconstruct.steps=0", "rope_key=shared_fit reconstruct.steps=4"]
    assert rows[0]["kv_values_per_token"] == rows[1]["kv_values_per_token"]   # same cache, other weights
    assert rows[0]["ppl"] != rows[1]["ppl"] and all(0 <= r["top1_agreement"] <= 1 for r in rows)
    assert json.loads((tmp_path / "upcycle_init.json").read_text()) == rows
    assert (tmp_path / "upcycle_init.md").read_text().count("\n") == 2 + len(rows)


@pytest.mark.parametrize("variant,match", [("rope_key", "key=value"), ("rope_kee=shared", r"upcycle\.rope_kee"),
                                           ("reconstruct.inputs=model", r"reconstruct\.inputs")])
def test_bad_variants_name_the_key(variant, match):
    with pytest.raises(ConfigError, match=match):
        upcycle_init.main(["--config", "configs/x_ecomla.py:smoke", "--variant", variant])
