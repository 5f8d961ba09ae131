"""README's promises that CI and new users rely on: the set-up commands, CI running them verbatim, CPU torch."""
from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SERVE = "pip install -e . && asyncserve"
TEST = 'pip install -e ".[test]" && python -m pytest'


def test_the_two_set_up_commands_are_in_readme():
    assert f"```bash\n{SERVE}\n```" in README
    assert f"```bash\n{TEST}\n```" in README


def test_ci_runs_readmes_test_command_verbatim_after_getting_chromium():
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert lines[-1] == TEST
    setup = "\n".join(lines[:-1])
    assert "apt-get install" in setup and "chromium chromium-driver" in setup
    assert "|| true" in setup  # a machine where apt cannot run still runs the tests (the browser test skips)


def test_ci_makes_a_fresh_virtual_environment_with_cpu_torch_and_no_pip_cache():
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    setup = "\n".join(lines[:-1])
    assert 'venv=$(mktemp -d)' in setup and 'python3 -m venv "$venv"' in setup and '. "$venv/bin/activate"' in setup
    assert "PIP_NO_CACHE_DIR=1" in setup
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup
    assert not any(word in setup for word in ("--system-site-packages", "pip install -e"))


def test_readme_says_how_to_avoid_cuda_wheels_on_a_cpu_machine_and_where_the_chat_page_is():
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in README
    assert "http://localhost:8000/" in README
