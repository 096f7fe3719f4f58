"""backends.onnx export: export once per model x dtype, cache verified on load, odd latent sizes, dynamo shapes."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from backends.onnx import components as oc, export as ox
from harness.models import load
from harness.selection.cases import Case


@pytest.fixture(scope="module")
def tiny_sd():
    return load("tiny-sd", "fp32")


@pytest.fixture(scope="module")
def exported(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-cache")
    result = ox.export_model(tiny_sd, Case("tiny-sd", "onnxruntime"), root)
    return root, result


def test_every_component_exported_with_external_data_and_manifest(exported):
    _, result = exported
    assert set(result.components) == {"text_encoder", "unet", "vae"}
    assert result.exporter == "legacy" and not result.notes
    for export in result.components.values():
        assert not export.reused
        assert (export.folder / ox.ONNX_FILE).is_file() and (export.folder / ox.DATA_FILE).is_file()
        manifest = json.loads((export.folder / ox.MANIFEST).read_text())
        assert manifest["key"] == export.key and set(manifest["files"]) == {ox.ONNX_FILE, ox.DATA_FILE}
    unet = result.components["unet"]
    assert unet.inputs == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.dynamic_axes["sample"] == {0: "batch", 2: "latent_height", 3: "latent_width"}


def test_second_export_reuses_the_cache(tiny_sd, exported):
    root, first = exported
    again = ox.export_model(tiny_sd, Case("tiny-sd", "onnxruntime", height=72, width=72), root)
    assert again.exported == [] and not again.notes
    assert {c: e.folder for c, e in again.components.items()} == {c: e.folder for c, e in first.components.items()}


def test_corrupt_or_partial_entry_is_reexported_with_a_note(tiny_sd, tmp_path):
    case = Case("tiny-sd", "onnxruntime")
    first = ox.export_model(tiny_sd, case, tmp_path, components=["vae"])
    data = first.components["vae"].folder / ox.DATA_FILE
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    second = ox.export_model(tiny_sd, case, tmp_path, components=["vae"])
    assert second.exported == ["vae"]
    assert second.notes == ["onnx export cache vae re-exported: model.onnx.data hash mismatch"]
    data.write_bytes(data.read_bytes()[:1000])
    third = ox.export_model(tiny_sd, case, tmp_path, components=["vae"])
    assert "truncated" in third.notes[0]
    assert ox.verify_entry(third.components["vae"].folder, third.components["vae"].key) is None


def test_missing_manifest_is_detected(tmp_path):
    assert ox.verify_entry(tmp_path, "k") == "manifest missing"
    (tmp_path / ox.MANIFEST).write_text("{trunc")
    assert "unreadable manifest" in ox.verify_entry(tmp_path, "k")


def test_weights_hash_follows_content(tiny_sd):
    vae = tiny_sd.pipeline.vae
    before = ox.weights_hash(vae)
    saved = vae.decoder.conv_out.bias.detach().clone()
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 1.0
    try:
        assert ox.weights_hash(vae) != before
    finally:
        with torch.no_grad():
            vae.decoder.conv_out.bias.copy_(saved)
    assert ox.weights_hash(vae) == before


@pytest.mark.parametrize("latent", [(8, 8), (9, 9), (7, 11), (16, 16)])
def test_unet_graph_runs_at_even_and_odd_latent_sizes(tiny_sd, exported, latent):
    """The legacy exporter bakes 'latent divisible by 2**upsamplers' as a constant; we export from an odd size."""
    _, result = exported
    session = ort.InferenceSession(str(result.components["unet"].path), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    sample, t, ehs = torch.randn(2, 4, *latent), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32)
    out = session.run(None, {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy()})
    with torch.no_grad():
        ref = tiny_sd.pipeline.unet(sample, t, encoder_hidden_states=ehs).sample
    assert np.abs(out[0] - ref.numpy()).max() < 1e-4


def test_dynamo_shapes_follow_the_wrapper_signature(tiny_sd):
    from torch.export import Dim
    spec = oc.vae_spec(tiny_sd, Case("tiny-sd", "onnxruntime"))
    assert ox.dynamo_shapes(spec) == {"latent": {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}}
    wrapper = oc.DenoiserWrapper(torch.nn.Identity(), ["a", "b"], {})
    spec = oc.ComponentSpec("unet", "denoiser", wrapper, {"a": torch.zeros(2, 3), "b": torch.zeros(2)}, ["o"],
                            {"a": {0: "batch"}, "b": {0: "batch"}}, {"o": [2, 3]})
    assert ox.dynamo_shapes(spec) == {"tensors": ({0: Dim.DYNAMIC}, {0: Dim.DYNAMIC})}


def test_graph_inputs_carry_our_axis_names(exported):
    import onnx
    _, result = exported
    proto = onnx.load(str(result.components["vae"].path), load_external_data=False)
    dims = [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
