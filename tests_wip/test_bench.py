"""bench.py: the figures come out positive, labelled, and as parseable JSON (tiny --quick sizes, CPU)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "clip.py").exists())  # repo root (tests_wip or not)
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402


def test_quick_gpt_stages_figures_and_json(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    # one thread: on a shared 2-core machine tiny ops are far faster without OpenMP hand-offs
    args = bench.get_parser().parse_args(["gpt-train", "gpt-sample", "--device", "cpu", "--quick", "--threads", "1",
                                          "--json", str(out_file)])
    result = bench.main(args)
    printed = capsys.readouterr().out
    saved = json.loads(out_file.read_text())
    assert saved == json.loads(json.dumps(result))  # the file holds exactly what main returned
    rows = saved["figures"]
    assert {r["stage"] for r in rows} == {"gpt-train", "gpt-sample"}
    speed = [r for r in rows if r["unit"] in ("tok/s", "x")]
    assert len(speed) >= 4 and all(r["median"] > 0 and r["min"] <= r["median"] <= r["max"] for r in speed)
    mem = [r for r in rows if r["unit"] == "MiB"]
    assert len(mem) == 2 and all(r["median"] > 0 for r in mem)
    mfu = next(r for r in rows if r["what"] == "MFU")
    assert mfu["median"] is None and "n/a" in mfu["note"]  # no CPU peak: MFU is n/a, never a made-up number
    assert all(r["note"].startswith("tokens identical: True") for r in rows if r["what"] == "KV-cache speed-up")
    for r in speed:  # one aligned table line per figure
        assert any(line.startswith(r["stage"]) and r["unit"] in line for line in printed.splitlines())
    assert saved["meta"]["device"] == "cpu" and saved["meta"]["threads"] == 1


def test_json_to_stdout_and_bad_stage(capsys):
    result = bench.main(bench.get_parser().parse_args(["vqgan", "--device", "cpu", "--quick", "--threads", "1",
                                                       "--json"]))
    parsed = json.loads(capsys.readouterr().out)  # only JSON on stdout, no table
    assert [r["what"] for r in parsed["figures"]] == ["encode", "decode", "peak memory (RSS)"]
    assert all(r["median"] > 0 for r in result["figures"])
    with pytest.raises(SystemExit, match="unknown stage"):
        bench.main(bench.get_parser().parse_args(["gpt", "--quick"]))
