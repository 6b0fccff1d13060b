import subprocess
import sys

import pytest

import lensmat
from lensmat import cli


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert lensmat.__version__ in capsys.readouterr().out
    assert cli.main([]) == 0
    assert "info" in capsys.readouterr().out


def test_bad_corpus_is_a_clean_cli_error(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    assert cli.main(["info", "--dataset", str(missing), "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_info_on_bundled_defaults():
    out = subprocess.run([sys.executable, "-m", "lensmat", "info"], capture_output=True, text=True, check=True).stdout
    assert "layers" in out and "heldout" in out and "3000 lines" in out


def test_unknown_submodule_kind_on_cli(capsys):
    assert cli.main(["submodules", "--kinds", "attn,ffn"]) == 2
    assert "valid kinds: attn, mlp, ln" in capsys.readouterr().err


def test_device_map_is_a_directive_or_json(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["info", "--device-map", "auto"]).device_map == "auto"
    assert parser.parse_args(["info", "--device-map", '{"": "cpu"}']).device_map == {"": "cpu"}
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["info", "--device-map", "{bad"])
    assert exc.value.code == 2
    assert "--device-map is not valid JSON" in capsys.readouterr().err
