import json

from qscope_plugins import GROUPS
from qscope_plugins.cli import main


def test_catalog_json(capsys):
    assert main(["catalog", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 14
    for key in ("repo_id", "release", "model", "n_layers", "d_model", "d_sae", "k", "moe"):
        assert all(key in row for row in rows)
    moe = {row["repo_id"] for row in rows if row["moe"]}
    assert moe == {g.repo_id for g in GROUPS if "A3B" in g.repo_id} and len(moe) == 4
    assert {(r["d_sae"], r["k"]) for r in rows if r["moe"]} == {(32768, 50), (131072, 100)}
    assert [r for r in rows if r["repo_id"] == "Qwen/SAE-Res-Qwen3.5-27B-W80K-L0_100"][0]["trained_on"] == "instruct"


def test_catalog_table(capsys):
    assert main(["catalog"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["release", "repo_id", "model"] and len(lines) == 15


def test_selfcheck(capsys):
    assert main(["selfcheck", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["all_recovered"] is True
