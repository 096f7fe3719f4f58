"""The text-embedding workload: the pipeline against sentence-transformers itself, case ids and the matrix, a real
run through the adapters (eager, ONNX Runtime fp32 and int8, Triton), and the service's targets as gate bounds."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import models
from harness.measure.run_options import RunOptions
from harness.measure.session import Session
from harness.models.embedding import embed, minilm_folder
from harness.models.sentences import LONG, SHORT, paraphrase_of, texts_for
from harness.selection import workloads
from harness.selection.cases import Case, load_matrix

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def minilm():
    if minilm_folder() is None:
        pytest.fail(models.spec("minilm-l6").missing(), pytrace=False)
    return models.load("minilm-l6", "fp32")


def test_our_pipeline_is_sentence_transformers_own(minilm):
    """Tokenizer -> encoder -> mean pooling -> L2 normalisation, as sentence-transformers runs all-MiniLM-L6-v2
    (Transformer, Pooling(mean), Normalize): same embeddings when nothing is truncated."""
    from sentence_transformers import SentenceTransformer
    theirs = SentenceTransformer(str(minilm_folder()), device="cpu").encode(list(SHORT), normalize_embeddings=True)
    ours = embed(minilm.pipeline, SHORT, 64)
    assert np.abs(ours - theirs).max() < 1e-5


def test_the_fixed_set_has_real_neighbours(minilm):
    """Every paraphrase's nearest neighbour is its pair, in both sets: the ranking check has something to find."""
    for texts, seq in ((SHORT, 16), (LONG, 128)):
        e = embed(minilm.pipeline, texts, seq)
        similarity = e @ e.T
        np.fill_diagonal(similarity, -1)
        for i in range(len(texts)):
            if paraphrase_of(i, texts) is not None:
                assert similarity[i].argmax() == paraphrase_of(i, texts), (seq, i)
    assert texts_for(16) is SHORT and texts_for(128) is LONG


def test_case_ids_and_the_embedding_matrix():
    case = Case.embedding("minilm-l6", "onnxruntime", "int8", batch=8, seq=128)
    assert case.id == "minilm-l6/onnxruntime+int8/fp32/b8/seq128" and case.workload == workloads.TEXT_EMBEDDING
    assert Case.from_id(case.id) == case
    assert Case("tiny-sd", "diffusers").workload == workloads.TEXT_TO_IMAGE
    matrix = load_matrix(None)
    matrix.models = ["minilm-l6"]
    cases = matrix.expand()
    assert {c.seq for c in cases} == {16, 128} and {c.batch for c in cases} == {1, 8, 32, 128}
    assert {c.backend_spec for c in cases} == {"torch", "torch_compile", "onnxruntime", "onnxruntime+int8",
                                              "tensorrt", "triton"}


def test_a_bert_style_folder_is_an_embedding_model(tmp_path):
    folder = tmp_path / "my-encoder"
    folder.symlink_to(minilm_folder(), target_is_directory=True)
    spec = models.spec(f"path:{folder}")
    assert spec.workload == workloads.TEXT_EMBEDDING and spec.kind == "embedding"
    model = models.load(f"path:{folder}", "fp32")
    assert model.encoder == "encoder" and model.workload == workloads.TEXT_EMBEDDING


@pytest.fixture(scope="module")
def measured(minilm, tmp_path_factory):
    """One lean run of the adapters on real weights: batch 1 (a request's latency) and 8 (throughput), 16 tokens."""
    session = Session(tmp_path_factory.mktemp("results"), RunOptions(warmup=1, repeats=3, save_images=False))
    cases = [Case.embedding("minilm-l6", backend, variant, batch=b, seq=16)
             for backend, variant in (("torch", ""), ("onnxruntime", ""), ("onnxruntime", "int8"), ("triton", "grpc"))
             for b in (1, 8)]
    try:
        records = {c.id: session.result(c) for c in cases}
    finally:
        session.close()
    return session, records


def test_every_adapter_passes_parity_and_reports_throughput(measured):
    _, records = measured
    for case_id, record in records.items():
        assert record.status == "passed", (case_id, record.reason, record.info.get("traceback"))
        parity = record.parity
        assert parity["ranking"]["passed"] and parity["ranking"]["ranked"] >= 24   # every paraphrase is ranked
        assert parity["embedding"]["passed"] and parity["embedding_last"]["passed"]
        floor = 0.98 if "int8" in case_id else 0.9999
        assert parity["embedding"]["tolerance"]["min_cosine"] == floor
        assert record.throughput["per_s"] == pytest.approx(record.batch / record.e2e["p50"])
        assert record.stages["encode"]["alone"]["p50"] > 0
    int8 = records["minilm-l6/onnxruntime+int8/fp32/b8/seq16"]
    assert int8.info["quantization"]["weights"] == "QInt8" and "quantize" in int8.build
    assert int8.parity["embedding"]["min_cosine"] < 0.99999      # int8 really changed the numbers


def test_the_service_targets_are_gate_bounds(measured, tmp_path):
    """throughput:>N/s passes or fails on the measured number, exit 0 or 1; e2e.p50:<10ms likewise."""
    session, records = measured
    records_file = str(session.records_path)
    slowest = min(r.throughput["per_s"] for r in records.values())

    def gate(*thresholds):
        args = [sys.executable, "-m", "harness.cli", "gate", "--baseline", records_file, "--current", records_file]
        for t in thresholds:
            args += ["--threshold", t]
        return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    below, above = gate(f"throughput:>{slowest / 2:.3f}/s"), gate(f"throughput:>{slowest * 1000:.0f}/s")
    assert below.returncode == 0, below.stdout
    assert above.returncode == 1 and "REGRESSED" in above.stdout
    slow = gate("e2e.p50:<0.001ms")
    assert slow.returncode == 1 and "e2e.p50" in slow.stdout
