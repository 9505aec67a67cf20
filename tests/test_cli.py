"""The morphserve command line."""

import json

from morphserve.cli import main


def test_generate_prints_completion(tiny_mha, capsys):
    assert main(["generate", "--model", str(tiny_mha), "--prompt", "hello world", "--max-new-tokens", "5",
                 "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip()


def test_generate_json_has_provenance(tiny_mha, capsys):
    assert main(["generate", "--model", str(tiny_mha), "--prompt", "a", "--prompt", "the quick brown fox",
                 "--max-new-tokens", "4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["outputs"]) == 2 and d["provenance"]["synthetic_weights"] is False
    assert d["provenance"]["git_commit"] and d["provenance"]["config"]["model"] == str(tiny_mha)


def test_parity_exit_status(tiny_mha, capsys, tmp_path):
    out = tmp_path / "parity.json"
    assert main(["parity", "--model", str(tiny_mha), "--prompts", "4", "--max-new-tokens", "8",
                 "--output", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["identical"] == d["prompts"] == 4


def test_errors_exit_2_with_message(capsys):
    assert main(["generate", "--model", "gpt-17", "--prompt", "x"]) == 2
    assert "unknown model 'gpt-17'" in capsys.readouterr().err
    assert main(["generate", "--model", "smollm2-135m", "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature=-1.0" in capsys.readouterr().err
