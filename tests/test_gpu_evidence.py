"""tools/gpu_evidence.py's plumbing on the CPU in seconds, with tiny python children in place of the
benchmarks: the parts and their limits fit the budget of one device call, a child that writes only
'\\r' progress forever is killed at its deadline, rows land in the markdown file while the child still
runs, a part waits for its background job inside its own limit, the budget cuts the last part.
(tests/test_offload.py runs the real parts at tiny shapes.)"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import gpu_evidence  # noqa: E402
import paper_metric  # noqa: E402

DEVICE_CALL_S = 600  # one device command's limit


def child(tmp_path: Path, name: str, body: str) -> str:
    script = tmp_path / f"{name}.py"
    script.write_text("import os, sys, time\n" + body)
    return str(script)


def args_for(out: Path, *extra: str):
    return gpu_evidence.parse_args(["--out", str(out), "--device", "cpu", *extra])


def test_the_parts_and_their_limits_fit_one_device_call():
    parts = gpu_evidence.plan(gpu_evidence.parse_args(["--plan"]))
    assert parts[0].name == "check"  # correctness before anything is measured
    limits = sum(b.limit_s for b in parts)
    assert limits <= gpu_evidence.GPU_TOTAL_S <= DEVICE_CALL_S - 100, limits
    for b in parts:
        assert 0 < b.expected_s < b.limit_s and b.what, b
    for b in parts:  # a whole-process part stops its own variants before the part's limit
        if b.script == "paper_metric.py":
            gpu = list(b.gpu_args)
            assert int(gpu[gpu.index("--total-s") + 1]) < b.limit_s
            assert int(gpu[gpu.index("--limit-s") + 1]) < int(gpu[gpu.index("--total-s") + 1])
            assert int(gpu[gpu.index("--steps") + 1]) <= 4 and b.needs
    with_dynamic = gpu_evidence.plan(gpu_evidence.parse_args(["--plan", "--dynamic-vram"]))
    assert [b.limit_s for b in with_dynamic] == [b.limit_s for b in parts]
    metric = next(b for b in with_dynamic if b.name == "paper_metric")
    assert " ".join(metric.gpu_args).endswith("--dynamic-vram off on")
    assert not {b.name for b in gpu_evidence.OPTIONAL} & {b.name for b in parts}


def test_the_plan_prints_expected_times_and_limits_without_a_gpu():
    done = subprocess.run([sys.executable, str(TOOLS / "gpu_evidence.py"), "--device", "cpu", "--dry-run"],
                          capture_output=True, text=True, timeout=60, check=True)
    parts = gpu_evidence.plan(gpu_evidence.parse_args(["--plan"]))
    for b in parts:
        assert f"| {b.name} | {b.expected_s} | {b.limit_s} |" in done.stdout
    assert (f"| all | {sum(b.expected_s for b in parts)} | {sum(b.limit_s for b in parts)} | budget "
            f"{gpu_evidence.GPU_TOTAL_S} s |") in done.stdout


def test_a_child_writing_only_carriage_returns_is_killed_at_its_deadline(tmp_path):
    script = child(tmp_path, "spin", """
print("| row | before the bar |", flush=True)
pid = os.fork()  # a grandchild in the same process group goes too
while True:
    sys.stderr.write(f"\\r 50%|#####     | 5/10 [{time.time():.2f}]"); sys.stderr.flush()
    sys.stdout.write("\\rworking"); sys.stdout.flush()
    time.sleep(0.02)
""")
    out = tmp_path / "e.md"
    start = time.monotonic()
    status = gpu_evidence.run_benchmark(gpu_evidence.Benchmark("spin", script, (), (), 2), args_for(out), out)
    elapsed = time.monotonic() - start
    assert status == "stopped at its limit (2 s)" and 2 <= elapsed < 5, (status, elapsed)
    text = out.read_text()
    assert "| row | before the bar |" in text and "spin: stopped at its limit (2 s)" in text
    assert "its standard error ended:" in text and "5/10" in text  # where the bar stood
    log = Path(str(out) + ".log").read_text()
    assert " 50%|#####" in log and "[unfinished line]" in log and log.count("5/10") == 1  # the bar's last state


def test_rows_are_appended_while_the_child_still_runs(tmp_path):
    go = tmp_path / "go"
    script = child(tmp_path, "rows", f"""
print("| 64x64x4 | first | 1.0 |", flush=True)
while not os.path.exists({str(go)!r}):
    time.sleep(0.02)
print("| 64x64x4 | second | 2.0 |", flush=True)
""")
    out = tmp_path / "e.md"
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("status", gpu_evidence.run_benchmark(
        gpu_evidence.Benchmark("rows", script, (), (), 20), args_for(out), out)))
    runner.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (out.exists() and "| first |" in out.read_text()):
        time.sleep(0.02)
    assert "| 64x64x4 | first | 1.0 |" in out.read_text() and runner.is_alive()  # there before the child ends
    go.touch()
    runner.join(timeout=15)
    text = out.read_text()
    assert result["status"] == "ok" and text.index("| first |") < text.index("| second |")
    assert "```" not in text  # a markdown part's rows are not fenced


def test_a_failing_part_says_why(tmp_path):
    script = child(tmp_path, "boom", "print('| a | 1 |', flush=True)\nraise SystemExit('boom: no CUDA here')\n")
    out = tmp_path / "e.md"
    status = gpu_evidence.run_benchmark(gpu_evidence.Benchmark("boom", script, (), (), 20, markdown=False),
                                        args_for(out), out)
    text = out.read_text()
    assert status == "failed (exit 1)" and "boom: no CUDA here" in text and "```\n| a | 1 |" in text


def test_a_part_waits_for_its_background_job_inside_its_limit(tmp_path):
    script = child(tmp_path, "after", "print('| files | there |', flush=True)\n")
    out = tmp_path / "e.md"
    bench = gpu_evidence.Benchmark("after", script, (), (), 3, needs="files")
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    start = time.monotonic()
    assert gpu_evidence.run_benchmark(bench, args_for(out), out, background={"files": job}) == "ok"
    assert time.monotonic() - start >= 1 and "| files | there |" in out.read_text()
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        status = gpu_evidence.run_benchmark(bench, args_for(out), out, limit=1, background={"files": slow})
    finally:
        slow.kill()
        slow.wait()
    assert status == "stopped at its limit (1 s) waiting for files"


def test_the_budget_cuts_the_last_part_and_the_run_ends_in_it(tmp_path, monkeypatch):
    quick = child(tmp_path, "quick", "print('| quick | done |', flush=True)\n")
    spin = child(tmp_path, "spin", "while True:\n    sys.stderr.write('\\r...'); sys.stderr.flush(); time.sleep(0.05)\n")
    never = child(tmp_path, "never", "print('| never ran |', flush=True)\n")
    monkeypatch.setattr(gpu_evidence, "BENCHMARKS", [
        gpu_evidence.Benchmark("quick", quick, (), (), 20, 1, "prints a row"),
        gpu_evidence.Benchmark("spin", spin, (), (), 60, 1, "never ends"),
        gpu_evidence.Benchmark("never", never, (), (), 20, 1, "no time left for it"),
    ])
    monkeypatch.setattr(gpu_evidence, "OPTIONAL", [])
    monkeypatch.setattr(gpu_evidence, "MIN_PART_S", 1)
    out = tmp_path / "e.md"
    start = time.monotonic()
    gpu_evidence.main(["--out", str(out), "--device", "cpu", "--budget-s", "4"])
    elapsed = time.monotonic() - start
    text = out.read_text()
    assert elapsed < 6, elapsed
    assert "| quick | done |" in text and "quick: ok" in text
    assert "spin: stopped at its limit (3 s)" in text or "spin: stopped at its limit (4 s)" in text, text
    assert "## never\n\nnot started: the budget (4 s) is spent" in text and "| never ran |" not in text
    assert "all done" in text
    assert "| quick | 1 | 20 |" in text  # the plan heads the file


def test_the_whole_process_meter_estimates_steps_from_the_median_step():
    from comfyui_streamline.core.meter import Peak

    meter = paper_metric.CallMeter()
    start = paper_metric.STARTED
    # four steps, CFG batched (one call each); the first is slow (kernel warm-up)
    for i, (t, begin, end, bytes_) in enumerate([(999.0, 10.0, 13.0, 900), (749.0, 13.2, 14.0, 900),
                                                 (499.0, 14.2, 15.1, 900), (249.0, 15.3, 16.0, 900)]):
        meter.calls.append((t, start + begin, start + end, Peak(bytes_, i == 0, "CUDA active bytes", upper=900)))
    summary = meter.summary()
    assert summary["calls"] == 4 and summary["call_peak"] == 900 and summary["call_exact"] == 1
    assert summary["step_seconds"] == pytest.approx(1.0)  # steps 2-4: 1.0, 1.1, 0.7
    assert summary["first_step_at"] == pytest.approx(10.0)


def test_output_is_read_as_a_terminal_shows_it():
    lines = gpu_evidence._Lines()
    assert lines.feed(b"row one\r\nrow two\n\r 10%|#") == ["row one\n", "row two\n"]
    assert lines.feed(b"\r 20%|##") == [] and lines.rest() == " 20%|##"  # a bar: its latest state only
    assert lines.feed(b"\r100%|##########\nnext") == ["100%|##########\n"] and lines.rest() == "next"
    split = "é\n".encode()
    assert lines.feed(split[:1]) == [] and lines.feed(split[1:]) == ["nextté\n".replace("t", "", 1)]
