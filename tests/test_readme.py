"""The README's code example runs as written."""

import re
from pathlib import Path


def test_readme_python_example_runs(capsys, tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    # the examples write their runs (e.g. runs/readme_unet) where a user would: the working
    # directory, here a fresh one, so that a second run of the test starts from nothing too
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
