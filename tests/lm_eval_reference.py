"""lm-evaluation-harness's own scores of a task file, for the parity tests of scoring.py and
serve.py:

    python tests/lm_eval_reference.py MODEL TASK.jsonl MAX_LENGTH OUT.json

runs lm-eval (0-shot, offline) on a local multiple-choice task and writes {"version",
"examples": [{"lls": [...], "acc", "acc_norm"}, ...]} in the file's order. MODEL is a Hugging
Face directory (its HF backend, fp32, CPU) or the /v1/completions URL of a server serving the
model "served" (its local-completions backend, with the server's own tokenizer endpoints).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def main(model: str, task_file: str, max_length: str, out_path: str) -> None:
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as task_dir:
        (Path(task_dir) / "slm_parity.yaml").write_text("\n".join([
            "task: slm_parity",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(Path(task_file).resolve()))}",
            "test_split: test",
            "output_type: multiple_choice",
            "doc_to_text: context",
            "doc_to_choice: choices",
            "doc_to_target: gold",
            'target_delimiter: " "',
            "metric_list:",
            "  - metric: acc",
            "  - metric: acc_norm",
        ]) + "\n")
        backend = ("local-completions", f"base_url={model},model=served,tokenizer_backend=remote,"
                   f"tokenized_requests=True,max_length={max_length}") if model.startswith(
            "http") else ("hf", f"pretrained={model},dtype=float32,max_length={max_length}")
        results = lm_eval.simple_evaluate(
            model=backend[0], model_args=backend[1], tasks=["slm_parity"], num_fewshot=0,
            batch_size=16, device="cpu", log_samples=True,
            task_manager=TaskManager(include_path=task_dir), bootstrap_iters=0)
    samples = sorted(results["samples"]["slm_parity"], key=lambda sample: sample["doc_id"])
    examples = [{"lls": [float(ll) for ll, _ in sample["filtered_resps"]],
                 "acc": sample["acc"], "acc_norm": sample["acc_norm"]} for sample in samples]
    Path(out_path).write_text(json.dumps({"version": lm_eval.__version__,
                                          "examples": examples}))


if __name__ == "__main__":
    main(*sys.argv[1:])
