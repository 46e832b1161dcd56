"""Every results table in README.md is what its committed result file gives (benchmarks/readme_figures.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "benchmarks" / "readme_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_tables_match_their_result_files():
    mod = _module()
    readme = (ROOT / "README.md").read_text()
    assert len(mod.BLOCK.findall(readme)) >= 5
    assert mod.render(readme, ROOT) == readme, "run `python benchmarks/readme_figures.py --write`"


def test_a_changed_result_file_is_caught(tmp_path):
    mod = _module()
    src = tmp_path / "r.json"
    src.write_text(json.dumps({"import_s": 1.0, "first_call_s": 2.0, "second_call_s": 0.5, "extension": "x"}))
    text = "a\n<!-- figures: first_call r.json -->\nold\n<!-- /figures -->\n"
    fresh = mod.render(text, tmp_path)
    assert "2.00 s" in fresh and "old" not in fresh
    src.write_text(json.dumps({"import_s": 1.0, "first_call_s": 3.0, "second_call_s": 0.5, "extension": "x"}))
    assert mod.render(fresh, tmp_path) != fresh
