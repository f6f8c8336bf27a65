"""GPU paths: skipped without CUDA (run them on a GPU machine with: pytest -m gpu)."""

import pytest
import torch

from tests.conftest import TINY_EN, train_tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_training_on_cuda_matches_cpu_for_a_few_steps(tmp_path):
    from training.checkpoint import load_checkpoint

    cpu = train_tiny(str(tmp_path / "cpu"), TINY_EN, "--tokenizer", "char", "--max-steps", "5", "--device", "cpu")
    gpu = train_tiny(str(tmp_path / "gpu"), TINY_EN, "--tokenizer", "char", "--max-steps", "5", "--device", "cuda")
    a, b = load_checkpoint(cpu), load_checkpoint(gpu)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("half", [False, True])
def test_serving_on_cuda_gives_the_cpu_suggestions(tiny_char_model, half):
    from service.api.config import ServerConfig
    from service.model.engine import Engine

    cpu = Engine.load(ServerConfig(model=tiny_char_model, device="cpu"))
    gpu = Engine.load(ServerConfig(model=tiny_char_model, device="cuda", half=half))
    assert gpu.model.device.type == "cuda"
    for text in ("she cook fresh ", "we want gre", "the old man "):
        expected = cpu.suggester.suggest(text, 3).suggestions
        got = gpu.suggester.suggest(text, 3).suggestions
        assert [w for w, _ in got] == [w for w, _ in expected]
        for (_, p), (_, q) in zip(got, expected):
            assert p == pytest.approx(q, rel=2e-2 if half else 1e-3)


@pytest.mark.parametrize("half", [False, True])
def test_a_batch_of_ragged_steps_on_cuda_gives_the_cpu_answers(half):
    """The batcher's path on CUDA: rows of different lengths packed into one forward."""
    from service.model.steps import ScriptedModel
    from tests.service.test_ragged import ragged_steps, scripted

    cpu = scripted("lstm")
    gpu = ScriptedModel(scripted("lstm").module, cpu.vocab_size, device="cuda", half=half)  # the same weights
    assert gpu._packed is not None
    steps = ragged_steps(cpu)
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if half else {"atol": 1e-4, "rtol": 1e-3}
    for (log_probs, state), (expected_log_probs, expected_state) in zip(
        gpu.advance_ragged(steps), cpu.advance_ragged(steps)
    ):
        assert log_probs.device.type == "cpu" and state.dtype == torch.float32
        torch.testing.assert_close(log_probs, expected_log_probs, **tolerance)
        torch.testing.assert_close(state, expected_state, **tolerance)


def test_each_recurrent_layer_on_cuda_reads_its_weights_from_one_buffer(tiny_char_model):
    """cuDNN copies a layer's weights into one buffer at every forward unless they already share one."""
    import warnings

    from service.model.artifact import load_artifact
    from service.model.steps import ScriptedModel

    artifact = load_artifact(tiny_char_model, "cuda")
    network = ScriptedModel(artifact.model, artifact.tokenizer.vocab_size, device="cuda")
    layers = [layer for layer in network.module.modules() if getattr(layer, "_flat_weights", None)]
    assert layers
    for layer in layers:
        assert len({w.untyped_storage().data_ptr() for w in layer._flat_weights}) == 1
        parameters = dict(layer.named_parameters())
        for name, weight in zip(layer._flat_weights_names, layer._flat_weights):
            assert parameters[name].data_ptr() == weight.data_ptr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        network.advance(torch.tensor([[4, 5, 6]]), network.init_state(1))
    assert not [w for w in caught if "contiguous chunk" in str(w.message)]


def test_the_default_worker_count_on_cuda_reads_the_gpus_memory():
    from service.model.hardware import GPU_MEMORY_PER_WORKER, default_workers, gpu_memory, usable_cores

    assert gpu_memory() > GPU_MEMORY_PER_WORKER
    assert 1 <= default_workers("cuda") <= min(usable_cores(), gpu_memory() // GPU_MEMORY_PER_WORKER)


@pytest.mark.parametrize("batching", [True, False])
def test_on_cuda_every_forward_runs_on_the_model_worker_thread(tiny_char_model, batching):
    """Each thread that runs CUDA work gets cuBLAS and cuDNN handles and workspaces of its own (about
    100 MiB): with a forward on every request thread, a loaded server filled the GPU's memory."""
    from tests.service.test_batching import forward_threads

    threads, worker = forward_threads(tiny_char_model, "cuda", batching)
    assert threads == {worker}
