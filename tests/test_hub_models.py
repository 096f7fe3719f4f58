"""Hugging Face hub ids (ORG/NAME[@REVISION]) from a real cache layout, offline: resolution, the case id, the
record's commit, the one-line error of a model that is not cached, the gate's note on a moved revision."""
import json
import os

import huggingface_hub
import pytest

from harness import cli, models
from harness.errors import UserError
from harness.models import hub
from harness.records import load_many
from harness.selection import options
from harness.selection.cases import Case
from harness.verdict import gate
from tests.hf_cache import add_to_cache
from tests.synthetic_runs import write_synthetic_run


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """A cache holding org/tiny-sd twice: main and tag v1 (a second commit of the same files, as a re-tag would
    be), plus org/tiny-sd3 at main."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    tiny_sd = models.ensure_tiny("tiny-sd")[0]
    main = add_to_cache(cache, "org/tiny-sd", tiny_sd)
    v1 = add_to_cache(cache, "org/tiny-sd", tiny_sd, revision="v1", commit="1" * 40)
    return {"cache": cache, "main": main, "v1": v1, "tiny_sd": tiny_sd}


@pytest.fixture
def in_cache(hf_cache, monkeypatch):
    # huggingface_hub reads HF_HOME / HF_HUB_CACHE once, at import: in-process tests set its resolved constant
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache["cache"]))
    monkeypatch.setenv(hub.REVISIONS_ENV, "{}")
    return hf_cache


def test_the_cache_layout_is_huggingface_hubs_own(hf_cache):
    """The fixture's layout is what huggingface_hub itself reads: blobs, symlinked snapshots, refs."""
    info = huggingface_hub.scan_cache_dir(hf_cache["cache"])
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "org/tiny-sd"
    refs = {rev.commit_hash: set(rev.refs) for rev in repo.revisions}
    assert refs == {hf_cache["main"]: {"main"}, hf_cache["v1"]: {"v1"}}
    weights = next(f for rev in repo.revisions for f in rev.files if f.file_name.endswith(".safetensors"))
    assert weights.file_path.is_symlink() and weights.blob_path.parent.name == "blobs"


def test_hub_id_resolves_in_the_cache_and_keeps_the_case_id_shape(in_cache):
    spec = models.spec("org/tiny-sd")
    assert (spec.name, spec.kind, spec.source) == ("org--tiny-sd", "sd", "hub")
    (case,) = options.select_cases(["org/tiny-sd@v1"], ["diffusers"])
    assert case.id == "org--tiny-sd/diffusers/fp32/b1/64x64/s4"      # the revision is not in the id
    assert Case.from_id(case.id) == case
    # a worker process gets only the case id: the run's revision travels in the environment
    assert json.loads(os.environ[hub.REVISIONS_ENV]) == {"org/tiny-sd": "v1"}
    assert hub.resolve(case.model).commit == in_cache["v1"]
    with pytest.raises(UserError, match="conflicting revisions of org/tiny-sd: v1 and main"):
        options.select_cases(["org/tiny-sd@main"], ["diffusers"])


def test_hub_model_loads_from_its_snapshot_and_names_its_commit(in_cache):
    loaded = models.load("org--tiny-sd", "fp32")
    assert loaded.weights == {"source": "hub", "repo": "org/tiny-sd", "revision": "main",
                              "commit": in_cache["main"]}
    assert loaded.source.endswith(f"snapshots/{in_cache['main']}") and loaded.denoiser == "unet"
    assert models.load("org/tiny-sd@v1", "fp32").weights["commit"] == in_cache["v1"]


def test_a_model_not_in_the_cache_is_one_line_and_exit_2_naming_the_download(in_cache, capsys):
    assert cli.main(["list", "--model", "org/missing", "--backend", "diffusers"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "`hf download org/missing --revision main`" in err
    assert str(in_cache["cache"]) in err
    assert cli.main(["list", "--model", "org/tiny-sd@v9"]) == 2
    assert "`hf download org/tiny-sd --revision v9`" in capsys.readouterr().err


def test_gate_says_when_baseline_and_current_ran_different_commits(tmp_path):
    run = write_synthetic_run(tmp_path / "run", seed=1, images=False)
    base, cur = load_many([run]), load_many([run])
    for record, commit in [(r, "a" * 40) for r in base] + [(r, "b" * 40) for r in cur]:
        record["weights"] = {"source": "hub", "repo": "org/tiny-sd", "revision": "main", "commit": commit}
    result = gate.compare(base, cur)
    rows = [r for r in result.rows if r.metric == "weights.commit"]
    assert rows and all("org/tiny-sd resolved to commit aaaaaaaaaaaa in the baseline and bbbbbbbbbbbb now" in r.note
                        for r in rows)
    assert not result.regressed and "weights.commit" in result.table() and "different weights" in result.markdown()
    assert not [r for r in gate.compare(base, base).rows if r.metric == "weights.commit"]
    # a LoRA from the hub cache counts too
    for record in cur:
        record["weights"] = {**base[0]["weights"], "lora": [{"repo": "org/style", "commit": "d" * 40}]}
    for record in base:
        record["weights"]["lora"] = [{"repo": "org/style", "commit": "c" * 40}]
    note = next(r.note for r in gate.compare(base, cur).rows if r.metric == "weights.commit")
    assert note == "different weights: org/style resolved to commit cccccccccccc in the baseline and dddddddddddd now"
