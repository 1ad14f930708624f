"""benchmarks/ab.py, the A/B timing harness of the benchmark scripts: one process, fake sides."""
import argparse
import json
import os
import statistics
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import ab  # noqa: E402


def recorder():
    """Sides that append their name to one shared log (and return a call count)."""
    log = []

    def side(name):
        def fn(*args):
            log.append((name, args))
            return len(log)
        return fn
    return log, side


def test_two_sides_flip_every_round_and_warmup_is_not_recorded():
    log, side = recorder()
    res = ab.run_ab({"a": side("a"), "b": side("b")}, repeats=4, warmup=2)
    names = [n for n, _ in log]
    assert names[:4] == ["a", "b", "a", "b"]  # warm-up: each side `warmup` times, in the order given
    assert names[4:] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(res.times[s]) for s in "ab"] == [4, 4]  # the warm-up calls are not in the result
    assert [len(res.cpu_times[s]) for s in "ab"] == [4, 4]
    assert res.repeats == 4 and res.warmup == 2


def test_rotation_with_three_sides_and_calls_per_repeat():
    log, side = recorder()
    res = ab.run_ab({n: side(n) for n in "xyz"}, repeats=3, warmup=0, calls_per_repeat=2)
    assert "".join(n for n, _ in log) == "xxyyzz" + "yyzzxx" + "zzxxyy"
    assert all(len(res.times[n]) == 6 for n in "xyz")


def test_other_orders():
    assert ab.round_order(["a", "b", "c"], 1, "alternate") == ["c", "b", "a"]
    assert ab.round_order(["a", "b", "c"], 2, "alternate") == ["a", "b", "c"]
    assert ab.round_order(["a", "b", "c"], 1, "fixed") == ["a", "b", "c"]
    assert ab.round_order(["a", "b", "c"], 4, "rotate") == ["b", "c", "a"]
    with pytest.raises(ValueError):
        ab.run_ab({"a": lambda: None}, 1, 0, order="shuffle")


def test_inputs_hooks_and_values():
    log, side = recorder()
    events = []
    res = ab.run_ab({"a": side("a"), "b": side("b")}, repeats=2, warmup=1, inputs=lambda i: (i,),
                    before=lambda n: events.append(("before", n)), after=lambda n, t: events.append(("after", n)),
                    keep_values=True)
    assert [args for _, args in log] == [(-1,), (-1,), (0,), (0,), (1,), (1,)]  # warm-up rounds are negative
    assert events.count(("before", "a")) == 3 and events.count(("after", "a")) == 2  # after: timed calls only
    assert events[-2:] == [("before", "a"), ("after", "a")]  # round 1: b then a
    assert res.warmup_values == {"a": [1], "b": [2]}
    assert res.values == {"a": [3, 6], "b": [4, 5]}


def test_times_measure_the_call():
    res = ab.run_ab({"slow": lambda: time.sleep(0.02), "fast": lambda: time.sleep(0.002)}, repeats=3, warmup=1)
    assert res.median("slow") >= 0.02 and res.median("fast") >= 0.002
    assert res.median("slow") > res.median("fast")
    assert ab.timed(lambda: time.sleep(0.01))[0] >= 0.01
    assert ab.timed(lambda: 42)[1] == 42
    ab.sync()  # no-op on the CPU
    ab.sync("cpu")


def fixed_result():
    return ab.ABResult({"a": [2.0, 4.0, 6.0, 8.0, 10.0], "b": [1.0, 1.0, 2.0, 2.0, 4.0]},
                       {"a": [1.0] * 5, "b": [0.5] * 5}, repeats=5, warmup=1)


def test_ratio_median_and_quartiles():
    res = fixed_result()
    assert res.ratios("a", "b") == [2.0, 4.0, 3.0, 4.0, 2.5]
    summary = res.ratio_summary("a", "b")
    q1, med, q3 = statistics.quantiles([2.0, 4.0, 3.0, 4.0, 2.5], n=4)
    assert summary == {"median": 3.0, "q1": q1, "q3": q3, "pairs": 5}
    assert med == 3.0 and q1 == pytest.approx(2.25) and q3 == pytest.approx(4.0)
    assert res.median("a") == 6.0 and res.quartiles("a") == [3.0, 6.0, 9.0] and res.best("b") == 1.0
    assert res.ratio_summary("a", "b", cpu=True)["median"] == 2.0
    assert ab.quartiles([7.0]) == [7.0, 7.0, 7.0]


def test_split_and_round_means():
    res = ab.ABResult({"a": [1.0, 3.0, 5.0, 7.0], "b": [1.0, 1.0, 1.0, 1.0]}, {"a": [0.0] * 4, "b": [0.0] * 4},
                      repeats=2, calls_per_repeat=2)
    assert res.round_means("a") == [2.0, 6.0]
    first, second = res.split(2)
    assert first.times == {"a": [1.0, 3.0], "b": [1.0, 1.0]} and second.times["a"] == [5.0, 7.0]
    with pytest.raises(ValueError):
        res.split(3)


def test_to_dict_round_trips_through_json():
    res = fixed_result()
    d = res.to_dict()
    back = json.loads(json.dumps(d))
    assert back == d
    assert ab.ABResult.from_dict(back).to_dict() == d
    assert d["summary_s"]["a"]["median"] == 6.0


def test_markdown_table_has_every_side():
    res = fixed_result()
    table = ab.markdown_table(res, "b")
    lines = table.splitlines()
    assert len(lines) == 4 and "| a | 6000 |" in table and lines[-1].startswith("| b |")
    assert "3.000" in lines[2]  # the median per-pair ratio a / b
    text, rows = ab.repeat_table(res, "a", "b", 5, labels=("A", "B"))
    assert [r["ratio"] for r in rows] == [2.0, 4.0, 3.0, 4.0, 2.5] and "**3.000**" in text and "| min |" in text


def test_arguments_json_and_profile(tmp_path):
    p = argparse.ArgumentParser()
    ab.add_timing_args(p, repeats=5, warmup=1)
    args = p.parse_args(["--json", str(tmp_path / "r.json"), "--profile", str(tmp_path / "prof")])
    assert (args.repeats, args.warmup) == (5, 1)
    ab.write_json(args.json, {"x": 1})
    ab.write_json(None, {"x": 2})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1}
    p = argparse.ArgumentParser()
    ab.add_timing_args(p, with_json=False, with_profile=False)
    assert vars(p.parse_args([])) == {"repeats": 10, "warmup": 2}

    calls = []
    trace = ab.profile(lambda: calls.append(sum(range(100))), 3, args.profile, "side_rank0")
    assert len(calls) == 3 and os.path.exists(trace) and trace.endswith(".trace.json")
    assert isinstance(ab.profile_table(trace), str)
