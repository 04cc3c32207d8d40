"""export.py against transformers' LlamaForCausalLM: same logits, greedy tokens and tokenizer."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

import export as export_script
import infer
from bpe import load_tokenizer
from chat import DEFAULT_TEMPLATE, EOT, ChatFormat, chat_format, render
from conftest import (
    CONVERSATIONS,
    TOKENIZER,
    assert_one_error_line,
    file_tree,
    run_main,
    run_script,
    write_config,
)
from export import export
from hf import load_hf_directory
from model import Transformer
from generate import generate
from checkpoints import load_checkpoint, save_checkpoint
from utils import Config, DataConfig, ModelConfig, config_to_dict

RANDOM_MODELS = {
    "mha": ModelConfig(
        embed_dim=64, num_heads=4, num_kv_heads=4, ff_dim=160, num_layers=2, max_seq_len=96
    ),
    "gqa": ModelConfig(
        embed_dim=96,
        num_heads=6,
        num_kv_heads=2,
        ff_dim=256,
        num_layers=3,
        max_seq_len=96,
        rope_theta=500000.0,
        norm_eps=1e-6,
    ),
    "untied": ModelConfig(
        embed_dim=64,
        num_heads=4,
        num_kv_heads=2,
        ff_dim=160,
        num_layers=2,
        max_seq_len=96,
        tie_embeddings=False,
    ),
}


def random_checkpoint(tmp_path: Path, model_config: ModelConfig) -> Path:
    torch.manual_seed(0)
    model = Transformer(model_config)
    with torch.no_grad():  # RMSNorm weights start at 1; perturbed, a mis-mapped norm cannot pass
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    config = Config(
        model=model_config, data=DataConfig(tokenizer_path=TOKENIZER, context_length=96)
    )
    path = tmp_path / "random.pth"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(config)}, str(path))
    return path


@pytest.fixture(params=["mha", "gqa", "untied", "trained"])
def exported(request, tmp_path, trained_run) -> tuple[Path, Path]:
    """(SLM checkpoint, its export) for random MHA and GQA models and a briefly trained one."""
    if request.param == "trained":
        ckpt = trained_run / "ckpt" / "best.pth"
    else:
        ckpt = random_checkpoint(tmp_path, RANDOM_MODELS[request.param])
    export(str(ckpt), str(tmp_path / "hf"))
    return ckpt, tmp_path / "hf"


def slm_model(ckpt: Path) -> Transformer:
    checkpoint = load_checkpoint(str(ckpt))
    model = Transformer(ModelConfig(**checkpoint["config"]["model"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def test_transformers_logits_match_slm(exported):
    ckpt, out = exported
    ours, theirs = slm_model(ckpt), LlamaForCausalLM.from_pretrained(out).eval()
    assert theirs.config.num_key_value_heads == ours.config.num_kv_heads
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(
        0, ours.config.vocab_size, (4, ours.config.max_seq_len), generator=generator
    )
    with torch.no_grad():
        difference = (theirs(tokens).logits - ours(tokens)[0]).abs().max().item()
    assert difference <= 1e-4


def test_greedy_generation_matches_transformers_generate(exported):
    ckpt, out = exported
    ours, theirs = slm_model(ckpt), LlamaForCausalLM.from_pretrained(out).eval()
    prompt = torch.tensor([load_tokenizer(TOKENIZER).encode("ROMEO:\nWhat light")])
    ids_ours = torch.stack(
        list(generate(ours, prompt, 50, ours.config.max_seq_len, temperature=0.0)), dim=1
    )
    greedy = GenerationConfig(
        do_sample=False, max_new_tokens=50, min_new_tokens=50, eos_token_id=None, pad_token_id=0
    )
    ids_theirs = theirs.generate(
        prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy
    )
    assert ids_theirs[0, prompt.shape[1] :].tolist() == ids_ours[0].tolist()


def test_autotokenizer_encodes_and_decodes_like_bpe_py(tmp_path, trained_run):
    export(str(trained_run / "ckpt" / "best.pth"), str(tmp_path / "hf"))
    ours, theirs = load_tokenizer(TOKENIZER), AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "ROMEO: — Ça va? Größe, 東京, Москва, مرحبا, 🌹\ttabs\n  spaces"
    ids = ours.encode(text)
    assert theirs(text)["input_ids"] == ids and theirs.encode(text) == ids
    assert theirs.decode(ids) == text == ours.decode(ids)
    assert theirs.eos_token == EOT and theirs.eos_token_id == ours.token_id(EOT)


def test_the_chat_template_and_special_tokens_travel_into_the_export(tmp_path, trained_run):
    """transformers' apply_chat_template on the export renders and tokenizes as chat.py does,
    with the template the checkpoint carries."""
    checkpoint = load_checkpoint(str(trained_run / "ckpt" / "best.pth"))
    template = DEFAULT_TEMPLATE.replace("upper", "lower").replace("ASSISTANT", "assistant")
    checkpoint["chat"] = {"template": template, "special_tokens": {"eos_token": EOT}}
    save_checkpoint(checkpoint, str(tmp_path / "chat.pth"))
    export(str(tmp_path / "chat.pth"), str(tmp_path / "hf"))
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    chat, tokenizer = ChatFormat(template, {"eos_token": EOT}), load_tokenizer(TOKENIZER)
    for name, messages in CONVERSATIONS.items():
        text = render(chat, messages[:-1], add_generation_prompt=True)
        assert theirs.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True) == text, name
        ids = theirs.apply_chat_template(messages[:-1], add_generation_prompt=True)
        assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == tokenizer.encode(text)
    assert theirs.eos_token == theirs.bos_token == theirs.pad_token == EOT
    assert load_hf_directory(str(tmp_path / "hf"), weights=False)["config"]  # reads back
    assert chat_format(str(tmp_path / "hf" / "tokenizer.json")).template == template


def test_round_trip_slm_hf_slm_is_bitwise(exported):
    ckpt, out = exported
    original = load_checkpoint(str(ckpt))
    back = load_hf_directory(str(out))
    assert back["config"]["model"] == original["config"]["model"]
    assert back["model"].keys() == original["model"].keys()
    assert all(
        torch.equal(back["model"][name], original["model"][name]) for name in original["model"]
    )


def test_infer_reads_the_export_like_the_checkpoint(trained_run, tmp_path):
    export(str(trained_run / "ckpt" / "best.pth"), str(tmp_path / "hf"))
    args = ["--prompt", "JULIET:", "--max-length", "20", "--temperature", "0"]
    from_export = run_script("infer.py", "--ckpt_path", str(tmp_path / "hf"), *args, cwd=tmp_path)
    from_checkpoint = run_script(
        "infer.py", "--ckpt_path", str(trained_run / "ckpt" / "best.pth"), *args, cwd=trained_run
    )
    assert from_export.returncode == 0, from_export.stderr[-2000:]
    assert (
        from_export.stdout == from_checkpoint.stdout
        and len(from_export.stdout) > len("JULIET:") + 10
    )


def same_size_other_tokenizer(directory: Path) -> Path:
    """The shipped tokenizer with two tokens' ids swapped: as large, but its ids mean other text."""
    tokenizer = json.loads(Path(TOKENIZER).read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]
    path = directory / "other.json"
    path.write_text(json.dumps(tokenizer))
    return path


def test_another_tokenizer_of_the_same_size_is_refused_by_export_and_infer(
    trained_run, tmp_path, monkeypatch, capsys
):
    other = same_size_other_tokenizer(tmp_path)
    ckpt = str(trained_run / "ckpt" / "best.pth")
    argv = ["--ckpt_path", ckpt, "--out", "exported", "--tokenizer", str(other)]
    code, _, stderr = run_main(export_script.main, argv, tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, "other.json is not the tokenizer .*best.pth was trained")
    assert not (tmp_path / "exported").exists()
    config = yaml.safe_load((trained_run / "tiny.yaml").read_text())
    config["data"]["tokenizer_path"] = str(other)
    write_config(tmp_path / "other.yaml", config)
    argv = ["--ckpt_path", ckpt, "--config", "other.yaml"]
    code, _, stderr = run_main(infer.main, argv, tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, "other.json is not the tokenizer .*best.pth was trained")


def test_a_checkpoint_without_a_tokenizer_fingerprint_is_checked_by_vocabulary_size(
    trained_run, tmp_path, monkeypatch, capsys
):
    checkpoint = load_checkpoint(str(trained_run / "ckpt" / "best.pth"))
    del checkpoint["tokenizer"]  # as checkpoints written before fingerprints were
    save_checkpoint(checkpoint, str(tmp_path / "old.pth"))
    argv = ["--ckpt_path", "old.pth", "--out", "exported"]
    code, _, _ = run_main(export_script.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0 and (tmp_path / "exported" / "model.safetensors").is_file()
    checkpoint["config"]["model"]["vocab_size"] = 4100  # a padded vocabulary: can't be sure
    save_checkpoint(checkpoint, str(tmp_path / "padded.pth"))
    argv = ["--ckpt_path", "padded.pth", "--out", "padded"]
    code, _, stderr = run_main(export_script.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 2 and "is not the tokenizer padded.pth was trained with" in stderr


def test_export_refuses_to_overwrite_and_bad_checkpoints(
    trained_run, tmp_path, monkeypatch, capsys
):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    ckpt = str(trained_run / "ckpt" / "best.pth")
    before = file_tree(tmp_path)
    for argv, message in (
        (["--ckpt_path", ckpt, "--out", "taken"], "taken already exists and is not empty"),
        (["--ckpt_path", "nope.pth", "--out", "new"], "checkpoint 'nope.pth' not found"),
    ):
        code, _, stderr = run_main(export_script.main, argv, tmp_path, monkeypatch, capsys)
        assert_one_error_line(code, stderr, message)
        assert file_tree(tmp_path) == before
    code, stdout, _ = run_main(
        export_script.main,
        ["--ckpt_path", ckpt, "--out", "taken", "--force"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert (
        code == 0
        and "exported" in stdout
        and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    )
    (tmp_path / "taken" / "model.safetensors").write_bytes(b"\x00" * 10)
    code, _, stderr = run_main(infer.main, ["--ckpt_path", "taken"], tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, "cannot read taken/model.safetensors")


def test_export_force_removes_what_would_shadow_it_and_nothing_else(tmp_path):
    first = random_checkpoint(tmp_path, RANDOM_MODELS["mha"])
    out = tmp_path / "hf"
    out.mkdir()
    stale = Transformer(RANDOM_MODELS["mha"])  # an earlier, sharded export of other weights
    stale_state = {f"model.{name}": tensor.contiguous()
                   for name, tensor in stale.state_dict().items() if name != "lm_head.weight"}
    names = sorted(stale_state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for shard, members in shards.items():
        save_file({name: stale_state[name] for name in members}, str(out / shard))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: shard for shard, members in shards.items() for name in members}}))
    (out / "chat_template.jinja").write_text("{{ 'stale' }}")
    (out / "generation_config.json").write_text("{}")
    (out / "notes.txt").write_text("my notes")
    export(str(first), str(out), force=True)
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [*export_script.EXPORT_FILES, "notes.txt"])
    back = load_hf_directory(str(out))["model"]
    assert all(torch.equal(back[name], tensor)
               for name, tensor in load_checkpoint(str(first))["model"].items())
    assert chat_format(str(out / "tokenizer.json")).template == DEFAULT_TEMPLATE


def test_the_export_advertises_the_trained_context_not_the_rope_table(tmp_path):
    ckpt = random_checkpoint(tmp_path, RANDOM_MODELS["mha"])  # max_seq_len 96
    checkpoint = load_checkpoint(str(ckpt))
    checkpoint["config"]["data"]["context_length"] = 40
    save_checkpoint(checkpoint, str(ckpt))
    export(str(ckpt), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["max_position_embeddings"] == tokenizer_config["model_max_length"] == 40
    assert load_hf_directory(str(tmp_path / "hf"))["config"]["model"]["max_seq_len"] == 96
