"""`orchardist` in its own process: the installed script, and what a fresh interpreter imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tests" / "data" / "model-configs"
EXE = Path(sys.executable).parent / "orchardist"


def test_installed_command_prints_json() -> None:
    done = subprocess.run(
        [
            str(EXE),
            "plan",
            "--model-config",
            str(CONFIGS / "llama-3.1-8b.json"),
            "--weights-bytes",
            "16060556376",
            "--chip",
            "m2-pro-32gb",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    budget = int(26_800_000_000 * 0.92) - 16_060_556_376 - 2 * 2**30
    assert out["num_blocks"] == budget // (16 * 131_072)
    assert out["max_model_len"] == (budget // (16 * 131_072)) * 16
    assert out["predicted_decode_tokens_per_s"] == round(
        200e9 / (16_060_556_376 + out["max_model_len"] // 2 * 131_072), 1
    )


def test_agent_run_help_in_a_fresh_interpreter_loads_no_controller() -> None:
    """`orchardist agent run --help` in a fresh interpreter; the modules it loaded, listed at exit."""
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('kopf', 'orchardist', 'orchardist_agent')), file=sys.stderr))\n"
        "from orchardist.cli import main\n"
        "sys.exit(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "agent", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--simulate PROFILE" in done.stdout
    loaded = done.stderr.strip().splitlines()[-1]
    assert "'orchardist_agent.cli'" in loaded
    for heavy in ("'kopf'", "'orchardist.controller", "'orchardist.dev", "'orchardist.oci"):
        assert heavy not in loaded
