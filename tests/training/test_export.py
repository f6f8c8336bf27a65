import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from service.model.artifact import FORMAT_VERSION, ArtifactError, load_artifact
from tests.conftest import ROOT, TINY_EN, TINY_ZH, run_cli
from training.checkpoint import load_checkpoint
from training.model import LanguageModel, ModelConfig


def eager_model(run):
    checkpoint = load_checkpoint(os.path.join(run, "checkpoint_best.pt"))
    model = LanguageModel(ModelConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def test_exported_file_gives_the_eager_models_logits(tiny_char_run, tiny_char_model):
    model, checkpoint = eager_model(tiny_char_run)
    artifact = load_artifact(tiny_char_model)
    tokens = torch.randint(0, model.vocab_size, (3, 20))
    with torch.no_grad():
        expected, expected_state = model(tokens, model.init_state(3))
        logits, state = artifact.model(tokens, artifact.model.init_state(3))
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(state, expected_state)


def test_manifest_says_what_the_model_is(tiny_char_run, tiny_char_model):
    manifest = load_artifact(tiny_char_model).manifest
    _, checkpoint = eager_model(tiny_char_run)
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.network == checkpoint["model_config"]
    assert manifest.tokenizer.kind == "char"
    assert manifest.tokenizer.special_ids == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
    assert manifest.provenance.corpus == ["tiny_en.txt"]
    assert len(manifest.provenance.corpus_sha256["tiny_en.txt"]) == 64
    assert manifest.provenance.steps == checkpoint["step"]
    assert manifest.provenance.stream_validation_perplexity > 1
    assert manifest.torch_version == str(torch.__version__) and manifest.created


@pytest.mark.slow
def test_artifact_loads_without_training(tiny_char_model):
    code = (
        "import sys; sys.modules['training'] = None\n"
        "from service.model.artifact import load_artifact\n"
        f"a = load_artifact({tiny_char_model!r})\n"
        "print(a.tokenizer.kind, a.tokenizer.decode(a.tokenizer.encode('the garden')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "char the garden"


def test_service_never_imports_training():
    for folder, _, files in os.walk(os.path.join(ROOT, "service")):
        for name in files:
            if name.endswith(".py"):
                source = open(os.path.join(folder, name), encoding="utf-8").read()
                assert "from training" not in source and "import training" not in source, name


def rewrite(src, dst, change):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, change(item.filename, zin.read(item.filename)))


def test_load_errors_are_clear(tiny_char_model, tmp_path):
    with pytest.raises(ArtifactError, match="model file not found: .*nothing.pt"):
        load_artifact(str(tmp_path / "nothing.pt"))
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(ArtifactError, match="not a nextword model file, or a damaged one"):
        load_artifact(str(text))
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(plain))
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        load_artifact(str(plain))

    def bump_version(name, data):
        if name.endswith("extra/manifest.json"):
            manifest = json.loads(data)
            manifest["format_version"] = 99
            return json.dumps(manifest).encode()
        return data

    rewrite(tiny_char_model, tmp_path / "future.pt", bump_version)
    with pytest.raises(ArtifactError, match="format version 99; this nextword reads version 1"):
        load_artifact(str(tmp_path / "future.pt"))

    def flip_weights(name, data):
        if "/data/" in name and len(data) > 64:
            return data[:32] + bytes([data[32] ^ 0xFF]) + data[33:]
        return data

    rewrite(tiny_char_model, tmp_path / "flipped.pt", flip_weights)
    with pytest.raises(ArtifactError, match="damaged model file: .*weights' checksum"):
        load_artifact(str(tmp_path / "flipped.pt"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(tiny_char_model, "rb").read()[:5000])
    with pytest.raises(ArtifactError, match="not a nextword model file, or a damaged one"):
        load_artifact(str(truncated))


def test_export_that_does_not_match_leaves_no_file(tiny_char_run, tmp_path, monkeypatch):
    import training.export as export_module

    monkeypatch.setattr(export_module, "check_parity", lambda model, path: 1.0)
    out = tmp_path / "model.pt"
    with pytest.raises(export_module.ExportError, match="differs from the trained one"):
        export_module.export(tiny_char_run, str(out))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_export_command(tiny_char_run, tmp_path):
    out = tmp_path / "m.pt"
    result = run_cli("training.export", tiny_char_run, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "it loads and matches the checkpoint" in result.stderr + result.stdout
    result = run_cli("training.export", str(tmp_path / "missing"), "--out", str(out))
    assert result.returncode == 1
    assert result.stderr.strip() == f"nextword-export: error: checkpoint not found: {tmp_path / 'missing'}"


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tiny_word_run", "tiny_zh_run"])
def test_int8_export_serves_close_to_float_and_its_checksum_covers_the_int8_weights(run, request, tmp_path):
    from service.api.config import ServerConfig
    from service.model.engine import Engine
    from service.model.steps import ScriptedModel
    from training.scoring import Scorer
    from training.scoring import metrics as score_metrics

    run_dir = request.getfixturevalue(run)
    paths = {}
    for name, quantize in (("float", None), ("int8", "int8")):
        paths[name] = str(tmp_path / f"{name}.pt")
        result = run_cli(
            "training.export", run_dir, "--out", paths[name], *(["--quantize", quantize] if quantize else [])
        )
        assert result.returncode == 0, result.stderr
    assert load_artifact(paths["int8"]).manifest.quantization == "int8"
    assert os.path.getsize(paths["int8"]) < os.path.getsize(paths["float"])
    corpus = TINY_ZH if run == "tiny_zh_run" else TINY_EN
    lines = open(corpus, encoding="utf-8").read().splitlines()[:30]
    metrics = {}
    for name, path in paths.items():
        artifact = load_artifact(path)
        model = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size)
        metrics[name] = score_metrics(Scorer(name, model, model), artifact.tokenizer, lines)
    assert abs(metrics["int8"]["perplexity"] / metrics["float"]["perplexity"] - 1) < 0.05
    assert abs(metrics["int8"]["top1"] - metrics["float"]["top1"]) < 0.1
    engine = Engine.load(ServerConfig(model=paths["int8"], metrics_port=0))
    assert engine.suggester.suggest("we " if run == "tiny_word_run" else "我", 3).suggestions
    # the checksum covers the int8 weights: change one, the digest changes
    from service.model.artifact import weights_digest

    module = load_artifact(paths["int8"]).model
    before = weights_digest(module)
    assert module.decoder.weight.dtype == torch.int8
    with torch.no_grad():
        module.decoder.weight[0, 0] += 1
    assert weights_digest(module) != before


def test_the_start_state_goes_from_training_into_the_file_and_the_service_starts_there(tiny_char_run, tiny_char_model):
    from service.model.steps import ScriptedModel
    from training.data import encode_lines, read_corpus

    model, checkpoint = eager_model(tiny_char_run)
    start = checkpoint["model"]["start_state"]
    assert start.abs().max() > 0.01  # where the stream is between lines, not zeros
    artifact = load_artifact(tiny_char_model)
    served = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size)
    for state in (artifact.model.init_state(2), served.init_state(2)):
        for b in range(2):
            torch.testing.assert_close(state[:, b], start)
    # Reading each line from the start state scores the line better than reading it from zeros.
    lines = encode_lines(artifact.tokenizer, read_corpus([TINY_EN]).lines)

    def loss(state_for):
        total = count = 0
        with torch.no_grad():
            for line in lines:
                tokens = torch.tensor([list(line)])
                logits, _ = model(tokens[:, :-1], state_for(1))
                total += torch.nn.functional.cross_entropy(logits[0, :4], tokens[0, 1:5], reduction="sum").item()
                count += min(4, tokens.size(1) - 1)
        return total / count

    from_start, from_zeros = loss(model.init_state), loss(model.zero_state)
    print(f"first four tokens of each line: {from_start:.3f} nats from the start state, {from_zeros:.3f} from zeros")
    assert from_start < from_zeros


def test_float16_export_halves_the_network_and_serves_it_as_float32(tiny_char_run, tiny_char_model, tmp_path):
    from service.api.config import ServerConfig
    from service.model.engine import Engine

    out = str(tmp_path / "half.pt")
    result = run_cli("training.export", tiny_char_run, "--out", out, "--quantize", "float16", "--ngram-order", "0")
    assert result.returncode == 0, result.stderr
    float_file = tiny_char_model  # the same run exported with float32 weights
    half, full = load_artifact(out), load_artifact(float_file)
    assert half.manifest.quantization == "float16"
    # in the file: float16, half the bytes of the float export's weights
    with zipfile.ZipFile(out) as z, zipfile.ZipFile(float_file) as f:
        half_bytes = sum(i.file_size for i in z.infolist() if "/data/" in i.filename)
        float_bytes = sum(i.file_size for i in f.infolist() if "/data/" in i.filename)
    assert half_bytes <= float_bytes * 0.51
    # loaded: float32, each weight the float one rounded to float16
    for name, value in half.model.state_dict().items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, full.model.state_dict()[name].half().float(), rtol=0, atol=0)
    tokens = torch.randint(0, half.tokenizer.vocab_size, (2, 12))
    with torch.no_grad():
        logits, _ = half.model(tokens, half.model.init_state(2))
        expected, _ = full.model(tokens, full.model.init_state(2))
    torch.testing.assert_close(logits, expected, rtol=0, atol=0.05)
    # not refused where float weights are served (a CUDA server refuses int8 only)
    engine = Engine.load(ServerConfig(model=out, metrics_port=0))
    assert engine.suggester.suggest("th", 3).suggestions
