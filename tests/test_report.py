"""Bench results files: each created new, never over an earlier run's, never through a planted link."""

import json
import os
import threading

from bench import report

RESULTS = {"summary": [{"label": "full", "ttft_s": {"median": 1.0, "min": 0.9, "max": 1.1}}]}


def test_results_take_the_next_free_name(tmp_path):
    (tmp_path / "bench.json").write_text("earlier")
    (tmp_path / "bench-2.csv").write_text("earlier")  # the json name is free, the csv name is not
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    (tmp_path / "bench-3.json").symlink_to(victim)
    (tmp_path / "bench-4.csv").symlink_to(tmp_path / "nowhere")  # dangling: still taken
    json_path, csv_path = report.write_results(RESULTS, tmp_path, "bench")
    assert (json_path.name, csv_path.name) == ("bench-5.json", "bench-5.csv")
    assert json.loads(json_path.read_text()) == RESULTS and "ttft_s_min" in csv_path.read_text()
    assert (tmp_path / "bench.json").read_text() == "earlier" and (tmp_path / "bench-2.csv").read_text() == "earlier"
    assert victim.read_text() == "not yours" and not os.path.lexists(tmp_path / "nowhere")
    assert not (tmp_path / "bench-2.json").exists() and not (tmp_path / "bench-4.json").exists()


def test_concurrent_runs_get_distinct_names(tmp_path):
    barrier, paths = threading.Barrier(6), []

    def write():
        barrier.wait()
        paths.append(report.write_results(RESULTS, tmp_path, "bench"))

    threads = [threading.Thread(target=write) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({p for pair in paths for p in pair}) == 12 and len(os.listdir(tmp_path)) == 12
