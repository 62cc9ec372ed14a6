"""Metrics sink: the row contract, resume truncation, half-written lines, the TensorBoard mirror."""

import json

from continual_opd.tracking import MetricsSink, read_rows


def test_rows_follow_the_contract_and_counters_continue(tmp_path):
    sink = MetricsSink(tmp_path)
    sink.set_stage("sft", 1, "sft", global_offset=10)
    sink.tokens, sink.samples = 500, 20
    sink.log(3, "ifeval", {"prompt_level_strict_acc": 0.5, "skipped": None})
    sink.close()
    (row,) = read_rows(tmp_path / "metrics.jsonl")
    assert row["stage"] == "sft" and row["step"] == 3 and row["global_step"] == 13 and row["value"] == 0.5
    assert row["tokens"] == 500 and row["samples"] == 20 and {"time", "wall", "suite", "metric", "kind"} <= set(row)
    again = MetricsSink(tmp_path)  # a resumed run continues the counters and the wall clock
    assert again.tokens == 500 and again.samples == 20 and again.wall >= row["wall"]
    again.close()


def test_truncate_after_drops_rows_past_a_checkpoint(tmp_path):
    sink = MetricsSink(tmp_path)
    sink.set_stage("a", 0, "eval", 0)
    sink.log(0, "x", {"m": 1})
    sink.set_stage("b", 1, "sft", 0)
    for step in (1, 2, 3, 4):
        sink.log(step, "train", {"loss": step})
    assert sink.truncate_after(1, 2) == 2
    sink.log(3, "train", {"loss": 30})
    sink.close()
    assert [(r["stage"], r["step"], r["value"]) for r in read_rows(tmp_path / "metrics.jsonl")] == [
        ("a", 0, 1), ("b", 1, 1), ("b", 2, 2), ("b", 3, 30)]


def test_half_written_last_line_is_skipped(tmp_path):
    import pytest

    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps({"stage": "a", "value": 1}) + "\n" + '{"stage": "a", "val')
    with pytest.warns(UserWarning, match="half-written last line"):
        assert len(read_rows(p)) == 1


def test_tensorboard_mirror_works_offline(tmp_path):
    sink = MetricsSink(tmp_path, report_to=["tensorboard"])
    sink.set_stage("sft", 0, "sft", 0)
    sink.log(1, "train", {"loss": 2.5})
    sink.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5)]
