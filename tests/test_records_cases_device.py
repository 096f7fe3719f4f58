import json
import os

import pytest

from harness.errors import UserError
from harness.measure.device import arch_family, device_class
from harness.records import Record, RecordWriter, load_many, read_records, recorded_case_ids
from harness.selection.cases import Case, Matrix, load_matrix, matrix_from_toml_text, parse_size


def _record(case_id="tiny-sd/diffusers/fp32/b1/64x64/s4", **kw):
    return Record.for_case(Case.from_id(case_id), "run1", **kw)


def test_case_id_is_stable_and_round_trips():
    c = Case("tiny-sd", "torch_compile", "max-autotune", "bf16", 2, 64, 96, 4)
    assert c.id == "tiny-sd/torch_compile+max-autotune/bf16/b2/64x96/s4"
    assert Case.from_id(c.id) == c
    assert Case("tiny-sd", "diffusers").id == "tiny-sd/diffusers/fp32/b1/64x64/s4"
    p = Case("path:/models/my sd", "onnxruntime")
    assert Case.from_id(p.id) == p


def test_matrix_expansion_and_validation():
    cases = Matrix(models=["tiny-sd"], backends=["diffusers", "onnxruntime"], dtypes=["fp32", "bf16"]).expand()
    assert len(cases) == 4 and len({c.id for c in cases}) == 4
    with pytest.raises(UserError, match="not divisible by the VAE factor"):
        Matrix(sizes=[(60, 64)]).expand()
    with pytest.raises(UserError, match="unknown dtype"):
        Matrix(dtypes=["fp8x"]).expand()
    assert parse_size("1024") == (1024, 1024) and parse_size("64x96") == (64, 96)


def test_embedded_default_and_toml():
    default = load_matrix(None)
    assert "tiny-sd" in default.models and "diffusers" in default.backends
    m = matrix_from_toml_text('[matrix]\nmodels=["tiny-sd3"]\nsizes=["128x64"]\nsteps=[2]\n', "t")
    assert [c.id for c in m.expand()][0] == "tiny-sd3/diffusers/fp32/b1/128x64/s2"
    with pytest.raises(UserError, match="malformed TOML"):
        matrix_from_toml_text("[matrix\nmodels=", "bad.toml")
    with pytest.raises(UserError, match="unknown key"):
        matrix_from_toml_text("[matrix]\nmodel=['x']", "bad.toml")


def test_record_round_trip(tmp_path):
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as w:
        w.write(_record(stages={"denoise": {"p50": 0.1, "n": 3}}))
        w.write(_record("tiny-sd3/diffusers/fp32/b1/64x64/s4", status="failed", reason="x"))
    records = read_records(path)
    assert [r["case_id"] for r in records] == ["tiny-sd/diffusers/fp32/b1/64x64/s4",
                                                "tiny-sd3/diffusers/fp32/b1/64x64/s4"]
    assert records[0]["stages"]["denoise"]["p50"] == 0.1 and records[1]["status"] == "failed"
    assert recorded_case_ids(path) == {r["case_id"] for r in records}


def test_truncated_last_line_is_dropped_with_warning(tmp_path):
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as w:
        w.write(_record())
    with open(path, "a") as fh:
        fh.write(json.dumps(_record("tiny-sd3/diffusers/fp32/b1/64x64/s4").to_dict())[:57])
    with pytest.warns(UserWarning, match="truncated"):
        records = read_records(path)
    assert len(records) == 1


def test_bad_records_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="holds no records"):
        read_records(empty)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({**_record().to_dict(), "schema": 99}) + "\n")
    with pytest.raises(UserError, match="schema version 99"):
        read_records(other)
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text("{oops\n" + json.dumps(_record().to_dict()) + "\n")
    with pytest.raises(UserError, match="not a JSON record"):
        read_records(corrupt)


def test_load_many_merges(tmp_path):
    for i in range(2):
        with RecordWriter(tmp_path / f"r{i}.jsonl") as w:
            w.write(_record())
    assert len(load_many([tmp_path / "r0.jsonl", tmp_path / "r1.jsonl"])) == 2


@pytest.mark.parametrize("cap, family", [((10, 0), "Blackwell (datacenter)"), ((10, 3), "Blackwell (datacenter)"),
                                         ((12, 0), "Blackwell (workstation/consumer)"), ((9, 0), "Hopper"),
                                         ((8, 9), "Ada"), ((8, 0), "Ampere"), ((8, 6), "Ampere"),
                                         ((7, 5), "Turing")])
def test_arch_mapping(cap, family):
    assert arch_family(*cap) == family


def test_device_class():
    assert device_class({"gpu": {"name": "NVIDIA H100", "capability": "9.0"}}) == "NVIDIA H100 (sm 9.0)"
    assert device_class({"gpu": None, "cpu": {"model": "Xeon"}}) == "CPU Xeon"


def test_schema_1_records_still_load_and_gate():
    """A records file written by the schema-1 release (a real tiny run, images dropped) stays readable: users keep
    baselines for months."""
    from pathlib import Path

    from harness.verdict import gate
    from harness.records import SCHEMA_VERSION
    v1 = Path(__file__).parent / "fixtures" / "records-v1.jsonl"
    records = read_records(v1)
    assert {r["schema_written"] for r in records} == {1}
    assert all(r["schema"] == SCHEMA_VERSION and r["synthetic"] is False for r in records)
    result = gate.compare(records, records)
    assert not result.regressed and result.counts()["PASS"] > 0


def test_schema_2_records_still_load_and_gate_with_memory_not_compared_across_scopes():
    """A records file written by the schema-2 release (a real tiny run of 2026-12-02, images dropped) loads as today's
    schema: `weights` at its default, and its memory judged by how it was measured then (one shared process)."""
    from pathlib import Path

    from harness.verdict import gate
    from harness.measure.memory import isolated
    from harness.records import SCHEMA_VERSION
    v2 = Path(__file__).parent / "fixtures" / "records-v2.jsonl"
    records = read_records(v2)
    assert SCHEMA_VERSION == 3 and {r["schema_written"] for r in records} == {2}
    assert all(r["schema"] == SCHEMA_VERSION and r["weights"] == {} for r in records)
    assert not any(isolated(r) for r in records if r["status"] == "passed")
    result = gate.compare(records, records)
    assert not result.regressed and result.counts()["PASS"] > 0


def test_variant_options_have_one_canonical_order():
    """a+b and b+a name one case everywhere (gate, merge, resume)."""
    from harness.selection.options import select_cases
    one = select_cases(["tiny-sd"], ["torch_compile+fused-qkv+max-autotune"])
    other = select_cases(["tiny-sd"], ["torch_compile+max-autotune+fused-qkv", "torch_compile+fused-qkv+max-autotune"])
    assert [c.id for c in one] == [c.id for c in other] == ["tiny-sd/torch_compile+max-autotune+fused-qkv/fp32/b1/64x64/s4"]
    with pytest.raises(UserError, match="conflicting options max-autotune and reduce-overhead"):
        select_cases(["tiny-sd"], ["torch_compile+reduce-overhead+max-autotune"])
    with pytest.raises(UserError, match="unknown variant option 'nope'"):
        select_cases(["tiny-sd"], ["onnxruntime+dynamo+nope"])


def test_each_session_points_server_logs_at_its_own_run_folder_unless_the_user_named_one(tmp_path, monkeypatch):
    from harness.measure.session import TRITON_LOG_ENV, set_server_log_dir
    monkeypatch.delenv(TRITON_LOG_ENV, raising=False)
    set_server_log_dir(tmp_path / "run1" / "triton")
    set_server_log_dir(tmp_path / "run2" / "triton")           # a second session in the same process
    assert os.environ[TRITON_LOG_ENV] == str(tmp_path / "run2" / "triton")
    monkeypatch.setenv(TRITON_LOG_ENV, str(tmp_path / "mine"))
    set_server_log_dir(tmp_path / "run3" / "triton")
    assert os.environ[TRITON_LOG_ENV] == str(tmp_path / "mine")
