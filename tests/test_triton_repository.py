"""Model repository writer and support rules: text only, no server. Every config is parsed with Triton's own
ModelConfig protobuf (from tritonclient), so a syntax slip fails here, not at server start."""
import json
import os

import pytest

from backends.triton import repository as repo
from backends.triton.backend import TritonBackend
from harness.selection.cases import Case



@pytest.fixture(scope="module")
def interfaces():
    """The real interfaces (backends.onnx) of the tiny models' components: what a served component takes and
    returns."""
    from backends.onnx.components import component_specs
    from harness import models
    out = {}
    for name in ("tiny-sd", "tiny-sd3"):
        model = models.load(name, "fp32")
        out[name] = {spec.component: spec for spec in component_specs(model, Case(name, "triton"))}
        out[name]["source"] = model.source
    return out


def parse(text):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_python_denoiser_config(interfaces):
    m = repo.interface_model("tiny-sd_fp32_unet", interfaces["tiny-sd"]["unet"], "fp32", source="/models/tiny sd",
                             subfolder="unet")
    cfg = parse(repo.config_text(m))
    assert cfg.backend == "python" and cfg.max_batch_size == 8
    assert [i.name for i in cfg.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert list(cfg.input[0].dims) == [4, -1, -1] and list(cfg.input[2].dims) == [-1, 32]
    assert list(cfg.input[1].dims) == [1] and not cfg.input[1].HasField("reshape")   # python flattens [batch, 1]
    assert cfg.output[0].name == "out_sample" and list(cfg.output[0].dims) == [4, -1, -1]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["source"] == "/models/tiny sd" and params["role"] == "denoiser" and params["dtype"] == "fp32"
    interface = json.loads(params["interface"])
    assert interface["inputs"] == ["sample", "timestep", "encoder_hidden_states"]
    assert interface["scalars"] == ["timestep"]
    # one instance with every core of the process: the client waits while the server computes
    assert params["torch_threads"] == str(len(os.sched_getaffinity(0))) and cfg.instance_group[0].count == 1


def test_thread_settings_of_served_models(interfaces, tmp_path):
    cores = str(len(os.sched_getaffinity(0)))
    assert repo.model_threads(None) == int(cores) and repo.model_threads(3) == 3
    pipe = parse(repo.config_text(repo.pipeline_model("p", "/m", "fp32")))
    assert pipe.parameters["torch_threads"].string_value == cores
    explicit = repo.interface_model("u", interfaces["tiny-sd"]["unet"], "fp32", source="/m", threads=0)
    assert explicit.parameters["torch_threads"] == "0"                 # 0: torch's own default
    from backends.onnx import export as ox
    from backends.onnx.components import ComponentSpec
    import torch
    spec = ComponentSpec("vae", "vae", torch.nn.Conv2d(4, 3, 1), {"latent": torch.randn(2, 4, 8, 8)}, ["image"],
                         {"latent": {0: "batch", 2: "latent_height", 3: "latent_width"},
                          "image": {0: "batch", 2: "height", 3: "width"}}, {"image": [2, 3, 8, 8]})
    (tmp_path / "e").mkdir()
    ox._export_to(spec, tmp_path / "e", "legacy", 17)
    quiet = parse(repo.config_text(repo.onnx_model("o", tmp_path / "e" / ox.ONNX_FILE, mode="python")))
    params = {k: v.string_value for k, v in quiet.parameters.items()}
    assert params == {"threads": cores, "allow_spinning": "0"} and quiet.instance_group[0].count == 1
    spinning = repo.onnx_model("o", tmp_path / "e" / ox.ONNX_FILE, mode="python", threads=1, spinning=True)
    assert spinning.parameters == {"threads": "1", "allow_spinning": "1"}
    assert repo.onnx_model("o", tmp_path / "e" / ox.ONNX_FILE).parameters == {}     # GPU server: its own config


@pytest.mark.parametrize("mode,platform,backend,filename", [
    ("onnxruntime", "onnxruntime_onnx", "onnxruntime", "model.onnx"),
    ("tensorrt_plan", "tensorrt_plan", "tensorrt", "model.plan")])
def test_gpu_backend_configs(interfaces, mode, platform, backend, filename):
    m = repo.interface_model("sd3_fp16_transformer", interfaces["tiny-sd3"]["transformer"], "fp16", mode=mode)
    cfg = parse(repo.config_text(m))
    assert (cfg.platform, cfg.backend, cfg.default_model_filename) == (platform, backend, filename)
    assert m.model_file == filename
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    from tritonclient.grpc import model_config_pb2
    assert {i.data_type for i in cfg.input if i.name != "timestep"} == {model_config_pb2.TYPE_FP16}
    timestep = next(i for i in cfg.input if i.name == "timestep")
    assert timestep.HasField("reshape") and list(timestep.reshape.shape) == []   # (batch,) into the engine
    assert "source" not in cfg.parameters and "interface" not in cfg.parameters  # no python-only parameters


def test_bf16_travels_as_fp32_to_the_python_backend_but_is_bf16_for_tensorrt(interfaces):
    unet = interfaces["tiny-sd"]["unet"]
    py = repo.interface_model("m", unet, "bf16", source="/m", subfolder="unet")
    trt = repo.interface_model("m", unet, "bf16", mode="tensorrt_plan")
    assert py.inputs[0].dtype == "FP32" and trt.inputs[0].dtype == "BF16"
    assert json.loads(py.parameters["interface"])["input_dtypes"]["sample"] == "bfloat16"   # cast in the server
    parse(repo.config_text(trt))


def test_pipeline_model_config():
    cfg = parse(repo.config_text(repo.pipeline_model("tiny-sd_pipeline", "/m", "fp32")))
    names = {i.name: i for i in cfg.input}
    from tritonclient.grpc import model_config_pb2
    assert names["PROMPT"].data_type == model_config_pb2.TYPE_STRING and names["NEGATIVE_PROMPT"].optional
    assert cfg.output[0].name == "IMAGE" and list(cfg.output[0].dims) == [-1, -1, 3]


def test_every_role_of_both_tiny_models(interfaces):
    clip = repo.interface_model("te", interfaces["tiny-sd"]["text_encoder"], "fp32")
    assert clip.inputs[0].dtype == "INT64" and list(clip.inputs[0].dims) == [-1]
    names = [o.name for o in clip.outputs]
    assert names[:2] == ["last_hidden_state", "pooler_output"] and names[2:] == [f"hidden_states.{i}"
                                                                                 for i in range(6)]
    vae = repo.interface_model("vae", interfaces["tiny-sd"]["vae"], "fp32")
    assert list(vae.inputs[0].dims) == [4, -1, -1] and list(vae.outputs[0].dims) == [3, -1, -1]
    t5 = repo.interface_model("t5", interfaces["tiny-sd3"]["text_encoder_3"], "fp32")
    assert [o.name for o in t5.outputs] == ["last_hidden_state"]
    for name, spec in interfaces["tiny-sd3"].items():
        if name != "source":
            parse(repo.config_text(repo.interface_model(name, spec, "fp32")))
    with pytest.raises(ValueError, match="mode"):
        repo.config_text(repo.ServedModel("x", [], [], mode="pytorch_libtorch"))


def test_strings_are_escaped_and_names_safe(interfaces):
    m = repo.interface_model("m", interfaces["tiny-sd"]["unet"], "fp32", source='/tmp/a "quoted"\\path\nnext')
    cfg = parse(repo.config_text(m))
    assert cfg.parameters["source"].string_value == '/tmp/a "quoted"\\path\nnext'
    assert repo.safe_name("path:/x/y my model") == "path_x_y_my_model"
    assert repo.safe_name("../..") == "model"


def test_write_model(tmp_path, interfaces):
    m = repo.interface_model("tiny", interfaces["tiny-sd"]["unet"], "fp32", source="/m", subfolder="unet")
    folder = repo.write_model(tmp_path, m)
    assert (folder / "config.pbtxt").read_text() == repo.config_text(m)
    assert (folder / "1" / "model.py").read_text() == (repo.TEMPLATES / "component.py").read_text()
    mtime = (folder / "config.pbtxt").stat().st_mtime_ns
    repo.write_model(tmp_path, m)   # unchanged: not rewritten
    assert (folder / "config.pbtxt").stat().st_mtime_ns == mtime
    onnx = tmp_path / "export.onnx"
    onnx.write_bytes(b"onnx")
    (tmp_path / "export.onnx.data").write_bytes(b"weights")
    g = repo.interface_model("g", interfaces["tiny-sd"]["unet"], "fp16", mode="onnxruntime")
    gfolder = repo.write_model(tmp_path / "gpu", g, onnx)
    assert (gfolder / "1" / "model.onnx").read_bytes() == b"onnx"
    assert (gfolder / "1" / "export.onnx.data").is_file()   # external data keeps its referenced name


def test_templates_compile():
    for template in repo.TEMPLATES.glob("*.py"):
        compile(template.read_text(), str(template), "exec")


@pytest.mark.parametrize("model,variant,reason", [
    ("sd15", "", "full-size"), ("flux-dev", "", "full-size"), ("tiny-sd", "pytorch", "unknown variant")])
def test_support_reasons(model, variant, reason):
    s = TritonBackend().support(Case(model, "triton", variant), {"device": "cpu"})
    assert not s and reason in s.reason


def test_support_without_binary(monkeypatch):
    monkeypatch.setenv("DIFFBENCH_TRITONSERVER", "/nonexistent/tritonserver")
    monkeypatch.delenv("DIFFBENCH_TRITON_URL", raising=False)
    s = TritonBackend().support(Case("tiny-sd", "triton"), {"device": "cpu"})
    assert not s and "tritonserver binary not found" in s.reason
    monkeypatch.setenv("DIFFBENCH_TRITON_URL", "127.0.0.1:8000")   # an external server needs no binary
    assert TritonBackend().support(Case("tiny-sd", "triton", "grpc"), {"device": "cpu"})


def test_registry_entry():
    from backends import base
    assert base._REGISTRY["triton"] == "backends.triton:TritonBackend"
    import backends.triton
    assert backends.triton.TritonBackend.name == "triton"


def test_gpu_repository_from_real_onnx_export(tmp_path):
    """The tiny UNet exported by backends/onnx -> an onnxruntime repository whose config matches the graph."""
    from harness import models
    model = models.load("tiny-sd", "fp32")
    case = Case("tiny-sd", "triton")
    folders = repo.export_repository(model, case, tmp_path / "repo", tmp_path / "cache", components=["unet"])
    (folder,) = folders
    cfg = parse((folder / "config.pbtxt").read_text())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert (folder / "1" / "model.onnx").is_file()
    import onnx
    graph = onnx.load(str(folder / "1" / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in cfg.input] == [i.name for i in graph.input if i.name not in
                                           {x.name for x in graph.initializer}]
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input}
    for i in cfg.input:   # batch axis left out; a (batch,) input is dims [1] reshaped to []
        assert len(i.dims) == max(ranks[i.name] - 1, 1)
        assert i.HasField("reshape") == (ranks[i.name] == 1)
    trt = repo.export_repository(model, case, tmp_path / "trt", tmp_path / "cache", mode="tensorrt_plan",
                                 components=["unet"])[0]
    assert parse((trt / "config.pbtxt").read_text()).platform == "tensorrt_plan"
    assert (trt / "model.onnx").is_file()   # the engine is built on the target GPU


def test_onnx_variant_support():
    s = TritonBackend().support(Case("tiny-sd", "triton", "onnx", dtype="bf16"), {"device": "cpu"})
    assert not s and "bfloat16" in s.reason
    assert TritonBackend().support(Case("tiny-sd3", "triton", "grpc-onnx"), {"device": "cpu"})
