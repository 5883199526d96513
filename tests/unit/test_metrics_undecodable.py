"""metrics.jsonl lines that are not UTF-8 count as malformed instead of stopping the read."""

import json

from megatron_ibxl.training.metrics import read_metrics, truncate_after


def test_undecodable_lines_are_skipped_and_counted(tmp_path, caplog):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}).encode() for s in (1, 2, 3)]
    noise = [b"\xff\xfe garbage", b'{"step": 4, "note": "\x80"}']  # invalid UTF-8 bytes
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"\n".join([lines[0], noise[0], lines[1], noise[1], lines[2]]) + b"\n")

    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipped 2 malformed line(s) (first: line 2)" in warnings[0]

    # Resuming from step 2 keeps the good lines up to it and drops the undecodable ones.
    truncate_after(tmp_path, 2)
    assert path.read_bytes() == lines[0] + b"\n" + lines[1] + b"\n"


def test_utf8_text_in_a_line_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 7, "note": "température"}, ensure_ascii=False) + "\n")
    assert read_metrics(tmp_path) == [{"step": 7, "note": "température"}]
