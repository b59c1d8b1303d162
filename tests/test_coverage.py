"""scripts/coverage.py on a fast subset: one small model per family at 32x32, a user factory,
a bogus factory and a --skip; the script runs once (each model in its own process)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PASSING = ["resnet18", "mobilenet_v3_small", "qatdist.models:tiny_vit"]
BOGUS = "qatdist.no_such_module:model"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("coverage")
    only = ",".join(["resnet18", "mobilenet_v3_small", "squeezenet1_1", BOGUS])
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "coverage.py"),
        "qatdist.models:tiny_vit",
        BOGUS,
        f"--only={only},qatdist.models:tiny_vit",
        "--skip=squeezenet1_1",
        "--jobs=2",  # one model per core: pytest itself waits meanwhile
        "--steps=2",
        "--latency-iters=2",
        "--timeout=600",
        f"--json={out / 'rows.json'}",
        f"--out={out / 'coverage.md'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "rows.json").read_text())["rows"]
    return {
        "rows": {row["model"]: row for row in rows},
        "markdown": (out / "coverage.md").read_text(),
        "stdout": proc.stdout,
    }


def test_each_model_passes_end_to_end_with_every_layer_int8(sweep):
    for name in PASSING:
        row = sweep["rows"][name]
        assert row["status"] == "passed", (name, row.get("stage"), row.get("error"))
        assert row["quantized"] == row["layers"], name  # every conv / linear is an int8 kernel
        assert row["layers"]["conv"] > 0 and row["layers"]["linear"] > 0
        assert row["fp32_ms"] > 0 and row["int8_ms"] > 0
        assert 0 <= row["agree"] <= row["comparable"] <= 8 * 5  # the demo's 40 val samples
        for stage in ("capture", "prepare", "train", "sync", "convert", "compile"):
            assert stage in row["seconds"], (name, stage)


def test_attention_projections_count_as_linears(sweep):
    # tiny_vit: 2 layers x (packed in-projection + out-projection + 2 MLP linears) + head
    assert sweep["rows"]["qatdist.models:tiny_vit"]["layers"]["linear"] == 9


def test_bogus_factory_is_a_failed_row_naming_its_error(sweep):
    row = sweep["rows"][BOGUS]
    assert row["status"] == "failed"
    assert row["stage"] == "build"
    assert "no_such_module" in row["error"]
    assert f"{BOGUS} (32 px): failed at build" in sweep["stdout"]


def test_skip_lists_the_model_as_skipped(sweep):
    row = sweep["rows"]["squeezenet1_1"]
    assert row["status"] == "skipped" and row["error"] == "skipped by --skip"
    assert "seconds" not in row  # never run


def test_table_lists_every_row_and_the_totals(sweep):
    md = sweep["markdown"]
    for name in [*PASSING, BOGUS, "squeezenet1_1"]:
        assert f"| {name} |" in md, name
    assert (
        "**Totals: 3 passed end to end (3 with every conv/linear int8), 1 failed, 1 skipped" in md
    )
    assert "- Machine: " in md and "ISA: " in md
    assert "torchao 0." in md and "Command: `python scripts/coverage.py" in md
