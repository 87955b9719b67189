"""What ``infer`` reads and writes, for every engine: input lists (``--inputs-from``) and the
``.parquet`` output, which keeps every finished row through a kill."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from sfdeploy.cli import cli
from sfdeploy.errors import InputError
from sfdeploy.inputs import read_input_list
from sfdeploy.predictions import Prediction, PredictionWriter


def test_input_lists_in_text_csv_and_parquet(tmp_path) -> None:
    (tmp_path / "l.txt").write_text("# archive part 1\n/data/a.mp4\n\n  b dir/c.mp4  \n")
    (tmp_path / "l.csv").write_text("label,path\njump,/data/a.mp4\nrun,b dir/c.mp4\n,\n")
    pq.write_table(pa.table({"path": ["/data/a.mp4", "b dir/c.mp4"], "label": [1, 2]}), tmp_path / "l.parquet")
    for name in ("l.txt", "l.csv", "l.parquet"):
        assert read_input_list(tmp_path / name) == ["/data/a.mp4", "b dir/c.mp4"], name


def test_input_lists_without_paths_are_refused_by_name(tmp_path) -> None:
    (tmp_path / "l.csv").write_text("video,label\na.mp4,1\n")
    pq.write_table(pa.table({"path": [1, 2]}), tmp_path / "l.parquet")
    (tmp_path / "l.txt").write_bytes(b"\xff\xfe\x00binary")
    for name, words in (("l.csv", "no 'path' column"), ("l.parquet", "no 'path' column of strings"),
                        ("l.txt", "not text"), ("missing.txt", "does not exist")):
        with pytest.raises(InputError, match=words) as caught:
            read_input_list(tmp_path / name)
        assert caught.value.path == str(tmp_path / name) and caught.value.fix


def _prediction(i: int) -> Prediction:
    top = ((f"class{i}", 0.1 + i / 7), ("other", 0.05))
    return Prediction(f"/v/{i}.mp4", "ok", label=top[0][0], score=top[0][1], top_k=top)


def test_parquet_output_keeps_every_row_through_a_kill_and_resumes(tmp_path) -> None:
    out = tmp_path / "p.parquet"
    writer = PredictionWriter(out)
    for i in range(3):
        writer.write(_prediction(i))
    writer.handle.close()  # killed: close() never ran, so no parquet file yet, only the journal
    journal = tmp_path / "p.parquet.partial.jsonl"
    with journal.open("a") as handle:
        handle.write('{"path": "/v/cut')  # the row being written when the kill came
    assert not out.exists()
    with pytest.raises(InputError, match="exists"):
        PredictionWriter(out)  # no --resume: refuses to start over the finished rows

    resumed = PredictionWriter(out, resume=True)
    assert resumed.done == {"/v/0.mp4", "/v/1.mp4", "/v/2.mp4"}
    resumed.write(Prediction("/v/bad.mp4", "error", error="cannot decode"))
    resumed.close()
    assert not journal.exists()
    again = PredictionWriter(out, resume=True)  # a finished parquet file is continued too
    again.write(_prediction(3))
    again.close()
    rows = [Prediction.from_arrow_row(r) for r in pq.read_table(out).to_pylist()]
    (tmp_path / "other.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="not a predictions table"):
        PredictionWriter(tmp_path / "other.parquet", resume=True)
    assert rows == [_prediction(0), _prediction(1), _prediction(2),
                    Prediction("/v/bad.mp4", "error", error="cannot decode"), _prediction(3)]


def test_infer_without_inputs_or_with_two_urls_locally_is_a_usage_error(tmp_path) -> None:
    result = CliRunner().invoke(cli, ["infer", "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and "--inputs-from" in result.output
    result = CliRunner().invoke(cli, ["infer", str(tmp_path), "--url", "a:8000", "--url", "b:8000"])
    assert result.exit_code == 2 and "--engine ray" in result.output
