"""LoRA (lora.py): adapters beside a frozen base, trained by train.py in every mode a full
fine-tune runs in, saved as the adapter plus a checked reference to the base, loaded merged by
infer.py, and exported for PEFT and llama.cpp."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import export as export_script
import infer
import optim
from checkpoints import base_reference, load_checkpoint, load_trained, save_checkpoint
from conftest import (
    REPO,
    assert_one_error_line,
    file_tree,
    make_model,
    pause_at_snapshot,
    run_main,
    run_script,
    sharded_weights,
    signal_tree,
    tiny_config,
    torchrun_command,
    write_config,
    write_conversations,
)
from export import export
from lora import adapter_weights, attach, count, fingerprint, merged, store_frozen_in
from model import Transformer
from optim import configure_optimizers, training_bytes_per_rank
from utils import (Config, ModelConfig, TrainingConfig, UserError, config_from_dict,
                   config_to_dict)

LORA = {"lora_rank": 4, "max_steps": 30, "eval_every": 15, "save_every": 15, "lr": 1e-2}
SMOLLM2_135M = ModelConfig(vocab_size=49152, embed_dim=576, num_heads=9, num_kv_heads=3,
                           ff_dim=1536, num_layers=30, max_seq_len=2048)


def lora_config(workdir: Path, corpus: Path, base: Path, data: dict | None = None,
                **training) -> Path:
    config = tiny_config(workdir, corpus, data=data or {},
                         training={**LORA, "init_from": str(base), **training})
    return write_config(workdir / "lora.yaml", config)


def train(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    result = run_script("train.py", str(config), cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def randomized(model: Transformer, std: float = 0.3) -> Transformer:
    """Adapters with random, non-zero A and B: they change every adapted product."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


@pytest.fixture(scope="module")
def base(trained_run) -> Path:
    return trained_run / "ckpt" / "best.pth"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, corpus, base) -> Path:
    """A finished 30-step LoRA run over the trained tiny model."""
    workdir = tmp_path_factory.mktemp("lora")
    result = train(lora_config(workdir, corpus, base), workdir)
    (workdir / "stdout.txt").write_text(result.stdout)
    return workdir


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory, base) -> Path:
    """A LoRA checkpoint over the trained tiny model with random, non-zero A and B on every
    target (GQA: k and v are narrower than q), as train.py records one."""
    checkpoint = load_checkpoint(str(base))
    config = config_from_dict({**checkpoint["config"], "training": {
        **checkpoint["config"]["training"], "init_from": str(base), "lora_rank": 4,
        "lora_alpha": 6.0, "checkpoint_path": "adapter.pth"}})
    model = Transformer(config.model)
    model.load_state_dict(checkpoint["model"])
    attach(model, config.training)
    randomized(model)
    record = {**checkpoint, "model": adapter_weights(model.state_dict()),
              "config": config_to_dict(config),
              "base": base_reference(str(base), fingerprint(checkpoint["model"], tied=True))}
    path = tmp_path_factory.mktemp("adapter") / "adapter.pth"
    save_checkpoint(record, str(path))
    return path


# ---- lora.py ---------------------------------------------------------------------------------

def test_a_fresh_adapter_changes_nothing_and_only_adapters_train():
    model = make_model(num_kv_heads=2)
    x = torch.randint(0, 97, (2, 20))
    before = model(x)[0]
    frozen_before = count(model)[0]
    attach(model, TrainingConfig(init_from="base", lora_rank=4))
    assert torch.equal(model(x)[0], before), "B = 0: step 0 is the base exactly, in fp32"
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    # q, k, v, o, gate, up, down in each of 3 layers: A (4, in) and B (out, 4)
    per_layer = 4 * (64 + 64) + 2 * 4 * (64 + 32) + 4 * (64 + 64) + 3 * 4 * (64 + 96)
    assert count(model) == (3 * per_layer, frozen_before)
    model.train()
    model(x, x)[1].backward()
    assert all((param.grad is not None) == param.requires_grad
               for param in model.parameters())
    for optimizer in ("adamw", "muon"):  # AdamW on the adapters whatever training.optimizer is
        optimizers = configure_optimizers(model, TrainingConfig(
            init_from="base", lora_rank=4, optimizer=optimizer), torch.device("cpu"), "fp32")
        assert [type(each) for each in optimizers] == [torch.optim.AdamW]
        optimized = {id(param) for group in optimizers[0].param_groups
                     for param in group["params"]}
        assert optimized == {id(param) for param in model.parameters() if param.requires_grad}


def test_targets_pick_the_adapted_linears():
    model = make_model()
    attach(model, TrainingConfig(init_from="base", lora_rank=2, lora_targets=["q_proj",
                                                                              "down_proj"]))
    adapted = {name.rsplit(".lora_", 1)[0] for name in adapter_weights(model.state_dict())}
    assert adapted == {f"layers.{i}.{module}" for i in range(3)
                       for module in ("self_attn.q_proj", "mlp.down_proj")}


def test_merged_weights_compute_what_the_attached_adapters_do():
    model = make_model(num_kv_heads=2)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    t = TrainingConfig(init_from="base", lora_rank=4, lora_alpha=12)
    attach(model, t)
    randomized(model)
    x = torch.randint(0, 97, (2, 20))
    attached = model(x)[0]
    plain = make_model(num_kv_heads=2)
    plain.load_state_dict(merged(base, adapter_weights(model.state_dict()), t.lora_scale))
    torch.testing.assert_close(plain(x)[0], attached, atol=1e-5, rtol=0)
    assert (attached - make_model(num_kv_heads=2)(x)[0]).abs().max() > 0.1


def test_the_base_fingerprint_sees_any_changed_weight():
    state = make_model().state_dict()
    print_before = fingerprint(state, tied=True)
    assert fingerprint(dict(state), tied=True) == print_before
    state["layers.1.mlp.up_proj.weight"] = state["layers.1.mlp.up_proj.weight"].clone()
    state["layers.1.mlp.up_proj.weight"][3, 5] += 1e-6
    assert fingerprint(state, tied=True) != print_before


def test_a_bf16_run_keeps_the_frozen_block_weights_in_bf16_and_trains_the_adapters():
    model = make_model()
    attach(model, TrainingConfig(init_from="base", lora_rank=4))
    store_frozen_in(model, torch.bfloat16)
    assert model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.embed_tokens.weight.dtype == model.norm.weight.dtype == torch.float32
    assert model.layers[0].mlp.up_proj.lora_A.weight.dtype == torch.float32
    x = torch.randint(0, 97, (2, 20))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, x)[1]
    loss.backward()
    assert model.layers[0].mlp.up_proj.lora_B.weight.grad.abs().sum() > 0


def test_the_memory_check_counts_a_lora_runs_frozen_base_and_adapters():
    """SmolLM2-135M's shape, r = 8 on every target: the frozen base once, in fp32, and the
    adapters' weights, gradients and AdamW moments: well under the full fine-tune's 16 B per
    parameter."""
    full = Config(model=SMOLLM2_135M, training=TrainingConfig(optimizer="adamw"))
    lora = Config(model=SMOLLM2_135M, training=TrainingConfig(optimizer="adamw", lora_rank=8,
                                                              init_from="base"))
    params = 134_515_008
    adapters = 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert training_bytes_per_rank(full, 1) == 16 * params
    assert training_bytes_per_rank(lora, 1) == 4 * params + 16 * adapters
    assert training_bytes_per_rank(lora, 1) < 0.3 * training_bytes_per_rank(full, 1)


# ---- train.py --------------------------------------------------------------------------------

def test_a_lora_run_saves_its_adapter_and_a_checked_reference_to_its_base(lora_run, base):
    stdout = (lora_run / "stdout.txt").read_text()
    assert "LoRA: rank 4, alpha 8 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, " \
           "down_proj" in stdout
    best = torch.load(lora_run / "ckpt" / "best.pth", weights_only=True)
    base_weights = load_checkpoint(str(base))["model"]
    assert best["model"] and all(".lora_" in name for name in best["model"])
    assert best["base"] == {"path": str(base), "absolute": str(base),
                            "fingerprint": fingerprint(base_weights, tied=True)}
    assert os.path.getsize(lora_run / "ckpt" / "best.pth") < 0.1 * os.path.getsize(base)
    snapshot = torch.load(lora_run / "ckpt" / "snapshot.pth", weights_only=True)
    assert all(".lora_" in name for name in snapshot["model"])
    assert snapshot["base"] == best["base"]
    assert any(tensor.abs().sum() > 0 for name, tensor in best["model"].items()
               if ".lora_B." in name), "B moved off zero"
    merged_weights = load_checkpoint(str(lora_run / "ckpt" / "best.pth"))["model"]
    assert merged_weights.keys() == base_weights.keys()
    assert torch.equal(merged_weights["embed_tokens.weight"], base_weights["embed_tokens.weight"])
    assert not torch.equal(merged_weights["layers.0.mlp.up_proj.weight"],
                           base_weights["layers.0.mlp.up_proj.weight"])


def test_infer_runs_a_lora_checkpoint_merged_into_its_base(lora_run, monkeypatch, capsys):
    trained = load_trained(str(lora_run / "ckpt" / "best.pth"))
    assert not any(".lora_" in name for name in trained.model.state_dict())
    code, out, err = run_main(infer.main, [
        "--ckpt_path", str(lora_run / "ckpt" / "best.pth"), "--prompt", "ROMEO:",
        "--max-length", "8", "--no-compile", "--dtype", "fp32"], lora_run, monkeypatch, capsys)
    assert code == 0, err
    assert out.startswith("ROMEO:")


@pytest.mark.parametrize("damage", ["missing", "changed"])
def test_a_missing_or_changed_base_is_refused_in_one_line(
        lora_run, base, tmp_path, monkeypatch, capsys, damage):
    copy = tmp_path / "base.pth"
    shutil.copy(base, copy)
    checkpoint = torch.load(lora_run / "ckpt" / "best.pth", weights_only=True)
    checkpoint["base"].update(path=str(copy), absolute=str(copy))
    save_checkpoint(checkpoint, str(tmp_path / "adapter.pth"))
    if damage == "missing":
        copy.unlink()
    else:
        weights = torch.load(copy, weights_only=True)
        weights["model"]["norm.weight"][0] += 0.5
        save_checkpoint(weights, str(copy))
    code, _, err = run_main(infer.main, ["--ckpt_path", str(tmp_path / "adapter.pth"),
                                         "--max-length", "4", "--no-compile"],
                            tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, err, {"missing": f"over {copy}, which is missing",
                                      "changed": f"{copy} has changed since"}[damage])


def test_sigkill_then_resume_of_a_lora_run_is_bitwise_exact(lora_run, tmp_path, corpus, base):
    config = lora_config(tmp_path, corpus, base, save_every=5)
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), str(config)],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    snapshot = pause_at_snapshot(process, tmp_path / "ckpt" / "snapshot.pth", 10)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    resumed = train(config, tmp_path)
    assert f"step {snapshot['step']}," in resumed.stdout
    final, reference = (torch.load(run / "ckpt" / "snapshot.pth", weights_only=True)
                        for run in (tmp_path, lora_run))
    assert final["model"].keys() == reference["model"].keys()
    assert all(torch.equal(final["model"][name], reference["model"][name])
               for name in final["model"])


def test_a_resume_over_a_changed_base_is_refused_in_one_line(tmp_path, corpus, base):
    copy = tmp_path / "base.pth"
    shutil.copy(base, copy)
    train(lora_config(tmp_path, corpus, copy, max_steps=5, save_every=5), tmp_path)
    weights = torch.load(copy, weights_only=True)
    weights["model"]["layers.0.self_attn.q_proj.weight"][0, 0] += 1.0
    save_checkpoint(weights, str(copy))
    config = lora_config(tmp_path, corpus, copy, max_steps=10)
    before = file_tree(tmp_path / "ckpt")
    result = run_script("train.py", str(config), cwd=tmp_path)
    assert_one_error_line(result.returncode, result.stderr, "has changed since .* was saved")
    assert file_tree(tmp_path / "ckpt") == before


def test_accumulation_and_two_ranks_under_ddp_and_fsdp_train_the_same_adapters(
        tmp_path, corpus, base):
    """One process with batch 8, one with 4 x 2 micro-steps, and two ranks of 4 (DDP, and FSDP
    with the frozen base sharded): the same global batches, the same adapters."""
    steps = {"max_steps": 10, "eval_every": 10, "save_every": 10}
    adapters = {}
    for name, data, training in [
            ("one", {}, {}), ("accumulation", {"batch_size": 4}, {"grad_accum_steps": 2}),
            ("ddp", {"batch_size": 4}, {}),
            ("fsdp", {"batch_size": 4}, {"parallelism": "fsdp"})]:
        workdir = tmp_path / name
        workdir.mkdir()
        snapshot = workdir / "ckpt" / ("snapshot" if name == "fsdp" else "snapshot.pth")
        config = lora_config(workdir, corpus, base, data, **steps, **training,
                             snapshot_path=str(snapshot))
        if name in ("ddp", "fsdp"):
            result = subprocess.run(torchrun_command(config), cwd=workdir, capture_output=True,
                                    text=True, timeout=300)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        else:
            train(config, workdir)
        best = torch.load(workdir / "ckpt" / "best.pth", weights_only=True)
        assert best["model"] and all(".lora_" in key for key in best["model"])
        adapters[name] = best["model"]
        if name == "fsdp":
            assert all(".lora_" in key for key in sharded_weights(snapshot))
    for name in ("accumulation", "ddp", "fsdp"):
        for key, tensor in adapters["one"].items():
            assert torch.allclose(adapters[name][key], tensor, atol=1e-5, rtol=0), (name, key)
    # FSDP killed after its step-5 snapshot resumes to the uninterrupted run's adapters exactly
    workdir = tmp_path / "fsdp-resumed"
    workdir.mkdir()
    snapshot = workdir / "ckpt" / "snapshot"
    config = lora_config(workdir, corpus, base, {"batch_size": 4}, **{**steps, "save_every": 5},
                         parallelism="fsdp", snapshot_path=str(snapshot))
    process = subprocess.Popen(torchrun_command(config), cwd=workdir, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    stopped_at = pause_at_snapshot(process, snapshot, 5)["step"]
    signal_tree(process.pid, signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(torchrun_command(config), cwd=workdir, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {stopped_at}," in resumed.stdout
    final, reference = (sharded_weights(run / "ckpt" / "snapshot")
                        for run in (workdir, tmp_path / "fsdp"))
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[key], reference[key]) for key in final)


def test_a_conversation_run_with_auto_precision_trains_adapters_on_assistant_tokens(
        tmp_path, base):
    corpus = write_conversations(tmp_path / "chat.jsonl", 200)
    config = lora_config(tmp_path, corpus, base, {"batch_size": 4}, precision="auto",
                         max_steps=8, eval_every=8, save_every=8)
    result = train(config, tmp_path)
    assert "(assistant tokens)" in result.stdout
    assert "LoRA: rank 4" in result.stdout and "precision auto" in result.stdout
    best = torch.load(tmp_path / "ckpt" / "best.pth", weights_only=True)
    assert all(".lora_" in name for name in best["model"])


# ---- export.py and training.init_adapter ----------------------------------------------------

def slm_logits(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_trained(str(ckpt), device_name="cpu").model(ids)[0]


def test_peft_loads_the_exported_adapter_over_the_base_and_hf_the_merged_model_with_slms_logits(
        tmp_path, base, random_adapter):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    export(str(base), str(tmp_path / "base"))
    export(str(random_adapter), str(tmp_path / "adapter"), out_format="peft")
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["peft_type"] == "LORA" and settings["r"] == 4 and settings["lora_alpha"] == 6
    assert settings["base_model_name_or_path"] == str(base)
    ids = torch.randint(0, 4096, (2, 24))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        base_logits = hf_base(ids).logits
        adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
        peft_logits = adapted(ids).logits
    expected = slm_logits(random_adapter, ids)
    torch.testing.assert_close(peft_logits, expected, atol=1e-4, rtol=0)
    assert (base_logits - expected).abs().max() > 0.5, "the adapter changes the logits"
    export(str(random_adapter), str(tmp_path / "merged"))  # hf: merged into the base
    with torch.no_grad():
        merged_logits = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "merged")(ids).logits
    torch.testing.assert_close(merged_logits, expected, atol=1e-4, rtol=0)


def test_llama_cpp_applies_the_gguf_adapter_over_slms_base_as_the_merged_model(
        tmp_path, base, random_adapter):
    llama_cpp = pytest.importorskip("llama_cpp")
    export(str(base), str(tmp_path / "base.gguf"), out_format="gguf")
    export(str(random_adapter), str(tmp_path / "adapter.gguf"), out_format="gguf-lora")
    export(str(random_adapter), str(tmp_path / "merged.gguf"), out_format="gguf")
    trained = load_trained(str(random_adapter), device_name="cpu")
    ids = trained.tokenizer.encode("ROMEO:\nBut soft, what light")
    count_new = trained.context_length - len(ids)

    def llama_cpp_run(model: Path, **adapter) -> tuple[np.ndarray, list[int]]:
        llm = llama_cpp.Llama(model_path=str(model), n_ctx=trained.context_length,
                              n_batch=trained.context_length, n_threads=2, logits_all=True,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                              verbose=False, **adapter)
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)]).copy()
        tokens = []
        for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(token)
            if len(tokens) == count_new:
                return scores, tokens
        return scores, tokens

    with_adapter = llama_cpp_run(tmp_path / "base.gguf", lora_path=str(tmp_path / "adapter.gguf"))
    merged_file = llama_cpp_run(tmp_path / "merged.gguf")
    base_alone = llama_cpp_run(tmp_path / "base.gguf")
    with torch.no_grad():
        expected = trained.model(torch.tensor([ids]))[0][0].numpy()
    np.testing.assert_allclose(with_adapter[0], expected, atol=2e-3)
    assert np.abs(base_alone[0] - expected).max() > 0.5, "the adapter changes the logits"
    slm_tokens = [int(token) for token in infer.generate(
        trained.model, torch.tensor([ids]), count_new, trained.context_length, temperature=0)]
    assert with_adapter[1] == merged_file[1] == slm_tokens


def test_a_peft_adapter_continues_training_with_its_rank_alpha_and_targets(
        tmp_path, corpus, base, random_adapter):
    export(str(random_adapter), str(tmp_path / "adapter"), out_format="peft")
    config = lora_config(tmp_path, corpus, base, init_adapter=str(tmp_path / "adapter"),
                         lora_rank=0, lr=1e-9, min_lr=0, warmup_steps=0, max_steps=1, eval_every=1,
                         save_every=1)
    result = train(config, tmp_path)
    assert "LoRA: rank 4, alpha 6" in result.stdout
    best = torch.load(tmp_path / "ckpt" / "best.pth", weights_only=True)
    started = torch.load(random_adapter, weights_only=True)["model"]
    assert best["model"].keys() == started.keys()
    for name, tensor in started.items():
        torch.testing.assert_close(best["model"][name], tensor, atol=1e-6, rtol=0)


@pytest.mark.parametrize("training, message", [
    ({"init_from": "", "lora_rank": 4}, "set training.init_from"),
    ({"lora_targets": ["q_proj", "lm_head"]}, r"training.lora_targets names \['lm_head'\]"),
    ({"lora_rank": 8, "init_adapter": "ADAPTER"}, r"training.lora_rank=8 contradicts"),
    ({"init_adapter": "nowhere"}, "is not a PEFT adapter directory"),
    ({"init_adapter": "ADAPTER", "edit": {"use_dora": True}}, "use_dora=True is an adapter"),
    ({"init_adapter": "ADAPTER", "edit": {"r": 0}}, r"r=0, lora_alpha=6(\.0)? — an adapter"),
])
def test_bad_lora_settings_are_one_line_and_write_nothing(
        tmp_path, corpus, base, random_adapter, training, message):
    training = dict(training)
    edit = training.pop("edit", {})
    if training.get("init_adapter") == "ADAPTER":
        export(str(random_adapter), str(tmp_path / "adapter"), out_format="peft")
        training["init_adapter"] = str(tmp_path / "adapter")
        settings_path = tmp_path / "adapter" / "adapter_config.json"
        settings_path.write_text(json.dumps({**json.loads(settings_path.read_text()), **edit}))
    config = lora_config(tmp_path, corpus, base, **training)
    before = file_tree(tmp_path)
    result = run_script("train.py", str(config), cwd=tmp_path)
    assert_one_error_line(result.returncode, result.stderr, message)
    assert file_tree(tmp_path) == before


def test_exporting_a_whole_model_as_an_adapter_is_one_line(tmp_path, base, monkeypatch,
                                                            capsys):
    code, _, err = run_main(export_script.main, ["--ckpt_path", str(base), "--format", "peft",
                                                 "--out", str(tmp_path / "adapter")],
                            tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, err, "is a whole model, not a LoRA adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("lora_rank, says", [
    (0, r"\(fp32 weights, gradients and adamw state.*training.optimizer=muon.*train LoRA "
        r"adapters \(training.lora_rank=8\)"),
    (8, r"\(frozen base, adapters' gradients and adamw state, before activations\), more than "
        r"the 0.0 GiB each process has of a small machine — set training.parallelism=fsdp to "
        r"shard it over the processes, or lower"),
])
def test_a_fine_tune_too_big_for_the_memory_check_is_told_its_way_out(monkeypatch, lora_rank,
                                                                       says):
    monkeypatch.setattr(optim, "memory_per_process", lambda device: (2**20, "a small machine"))
    config = Config(model=SMOLLM2_135M, training=TrainingConfig(
        optimizer="adamw", lora_rank=lora_rank, init_from="base"))
    with pytest.raises(UserError, match=says):
        optim.check_training_fits(config, torch.device("cpu"), 1)
