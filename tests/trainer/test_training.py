"""End to end on CPU: the entrypoint trains a tiny Llama from S3 and publishes to S3.

Each test runs ``python -m kubetune_trainer`` as a subprocess against the real
local S3 server, with the tiny model uploaded like a real base model.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.coordinates import GROUP, PLURAL, VERSION
from kubetune_trainer.hardware import cpu_has_native_bf16
from kubetune_trainer.reporting import JobRef

from .conftest import RECORDS, TrainerRun, to_jsonl, upload_folder
from .test_results import follow_card

pytestmark = [pytest.mark.s3, pytest.mark.slow]

#: One file type per format, so the four runs also cover the four readers.
FORMAT_FILES = {"alpaca": "jsonl", "chat": "json", "prompt_completion": "csv", "text": "parquet"}
RESULT_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "trainer_config.json",
    "metrics.json",
    "README.md",
    "loss.png",
)


def _encode(records: list[dict[str, Any]], kind: str) -> bytes:
    if kind == "jsonl":
        return to_jsonl(records)
    if kind == "json":
        return json.dumps(records, indent=2).encode()
    if kind == "csv":
        import csv

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        return buf.getvalue().encode()
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), sink)
    return sink.getvalue()


def _prepare(run: TrainerRun, s3_client: Any, model_dir: Path, fmt: str) -> str:
    kind = FORMAT_FILES[fmt]
    upload_folder(s3_client, model_dir, run.bucket, "models/tiny")
    s3_client.put_object(Bucket=run.bucket, Key=f"data/train.{kind}", Body=_encode(RECORDS[fmt](32), kind))
    run.config["dataset"] = {"train": f"s3://{run.bucket}/data/train.{kind}"}
    return kind


def _keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _get(s3_client: Any, bucket: str, key: str) -> bytes:
    body: bytes = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def _assert_progress_reported(kube_api: Any, job: JobRef, bucket: str) -> None:
    from kubernetes import client

    obj: Any = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        GROUP, VERSION, job.namespace, PLURAL, job.name
    )
    progress = obj["status"]["progress"]
    assert progress["step"] == 12
    assert progress["totalSteps"] == 12
    assert progress["lastCheckpoint"] == f"s3://{bucket}/out/job-1/checkpoints/step-12"
    assert 0 < progress["loss"] < 10
    assert progress["tokensPerSecond"] > 0
    assert progress["epoch"] > 1
    assert "learningRate" in progress
    assert progress["updateTime"].endswith("Z")


def _assert_card_loads_the_output(card: str, s3_client: Any, tmp_path: Path, model_dir: Path) -> None:
    """Do what the model card says (download, then its Python blocks): the adapter loads on the
    downloaded base, and ``merged/`` alone loads with its tokenizer and computes the same."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert "![loss](loss.png)" in card
    user = tmp_path / "user"
    user.mkdir()
    adapter, merged = follow_card(card, s3_client, user)
    assert isinstance(adapter["model"], PeftModel)
    assert not any("lora" in n for n, _ in merged["model"].named_parameters())
    assert not (user / "job-1" / "checkpoints").exists()  # the card's sync leaves them out

    # merged/ has the tokenizer as trained, chat template (kubetune's default here) included.
    trained = AutoTokenizer.from_pretrained(user / "job-1")
    tokenizer = merged["tokenizer"]
    assert tokenizer.get_vocab() == trained.get_vocab()
    assert tokenizer.chat_template == trained.chat_template
    assert tokenizer.pad_token == trained.pad_token
    text = tokenizer.apply_chat_template([{"role": "user", "content": "red"}], tokenize=False)
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=input_ids).logits
        with_adapter = adapter["model"].float()(input_ids=input_ids).logits
        from_merged = merged["model"].float()(input_ids=input_ids).logits
    changed = (with_adapter - before).abs().max()
    # The merge (saved in the run's precision, bf16 on this CPU) computes what base + adapter does.
    assert (from_merged - with_adapter).abs().max() < 0.1 * changed, (changed, from_merged - with_adapter)


def _assert_adapter_changes_output(s3_client: Any, bucket: str, model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (adapter_dir / name).write_bytes(_get(s3_client, bucket, f"out/job-1/{name}"))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    input_ids = torch.tensor([[2, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = base(input_ids=input_ids).logits
        tuned = PeftModel.from_pretrained(base, str(adapter_dir))
        after = tuned(input_ids=input_ids).logits
    lora: Any = tuned.peft_config["default"]
    assert lora.r == 8
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("fmt", list(FORMAT_FILES))
def test_format_trains_and_publishes(
    fmt: str,
    trainer_run: TrainerRun,
    s3_client: Any,
    tiny_model_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    run, bucket = trainer_run, trainer_run.bucket
    tmp_path = run.work
    _prepare(run, s3_client, tiny_model_dir, fmt)
    job: JobRef | None = None
    if fmt == "chat":  # report progress to a real FineTuneJob on the real apiserver
        job = request.getfixturevalue("finetunejob")
        run.env["KUBECONFIG"] = str(request.getfixturevalue("local_env").kubeconfig)
        run.config["reporting"].update(name=job.name, namespace=job.namespace, intervalSeconds=0.5)
    if fmt == "alpaca":  # held-out evaluation
        run.config["dataset"]["validationSplit"] = 0.25
        run.config["training"].update(evalStrategy="steps", evalSteps=6)
    if fmt == "prompt_completion":
        run.config["output"]["mergeAdapter"] = True
    if fmt == "text":  # a job name with no FineTuneJob behind it: reporting fails, training must not
        run.env["KUBETUNE_JOB_NAME"] = "no-such-job"
        run.env["KUBECONFIG"] = str(tmp_path / "missing-kubeconfig")
        # Nor may the plot: a folder in the way makes savefig fail (IsADirectoryError).
        (tmp_path / "scratch" / "result" / "loss.png").mkdir(parents=True)

    code, log = run.run()
    assert code == 0, log
    # auto precision follows this CPU: bf16 where it has avx512_bf16/amx_bf16, else fp32.
    native = cpu_has_native_bf16()
    expected = "bf16 (auto: CPU has native bf16" if native else "fp32 (auto: CPU without native bf16"
    assert f"precision: {expected}" in log
    assert "batching: length-grouped (auto: length-grouped (sdpa" in log

    # Loss falls.
    metrics = json.loads(_get(s3_client, bucket, "out/job-1/metrics.json"))
    losses = [e["loss"] for e in metrics["lossHistory"]]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert metrics["datasetFormat"] == fmt
    assert metrics["dataStats"]["records"] == 32
    assert metrics["globalStep"] == 12

    # The manifest, written last, lists every result file with the right size and sha256.
    manifest = json.loads(_get(s3_client, bucket, "out/job-1/manifest.json"))
    listed = {f["path"]: f for f in manifest["files"]}
    stored = [k.removeprefix("out/job-1/") for k in _keys(s3_client, bucket, "out/job-1/")]
    results = sorted(k for k in stored if not k.startswith("checkpoints/") and k != "manifest.json")
    assert sorted(listed) == results
    expected_files = set(RESULT_FILES) - ({"loss.png"} if fmt == "text" else set())
    assert expected_files <= set(listed)
    for path, entry in listed.items():
        data = _get(s3_client, bucket, f"out/job-1/{path}")
        assert len(data) == entry["size"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]

    # Checkpoints every 6 steps with their marker; saveTotalLimit 2 honoured in storage.
    checkpoints = {k.split("/")[1] for k in stored if k.startswith("checkpoints/")}
    assert checkpoints == {"step-6", "step-12"}
    assert "checkpoints/step-12/_COMPLETE" in stored

    summary = json.loads(run.termination_path.read_text())
    assert summary["phase"] == "Succeeded"
    assert summary["globalStep"] == 12

    card = _get(s3_client, bucket, "out/job-1/README.md").decode()
    if fmt == "text":
        assert log.count("could not patch the FineTuneJob status") == 1
        assert "result: could not draw loss.png (IsADirectoryError" in log
        assert "loss.png" not in listed
        assert "![loss]" not in card
    else:
        assert _get(s3_client, bucket, "out/job-1/loss.png").startswith(b"\x89PNG\r\n\x1a\n")
        assert "![loss](loss.png)" in card
    if job is not None:
        _assert_progress_reported(request.getfixturevalue("kube_api"), job, bucket)
    if fmt == "alpaca":
        assert isinstance(metrics["evalLoss"], float)
        assert log.count("'eval_loss'") == 3  # evalSteps 6 over 12 steps, then the final evaluation
        # One point per step: the final evaluation repeats step 12's.
        assert [e["step"] for e in metrics["evalLossHistory"]] == [6, 12]
        assert metrics["evalLossHistory"][-1]["loss"] == metrics["evalLoss"]
    else:
        assert metrics["evalLossHistory"] == []
        assert metrics["dataStats"]["records"] == 32  # 24 train + 8 held out, all measured
    if fmt == "prompt_completion":
        assert {"merged/config.json", "merged/tokenizer.json", "merged/tokenizer_config.json"} <= set(listed)
        _assert_card_loads_the_output(card, s3_client, tmp_path, tiny_model_dir)
    _assert_adapter_changes_output(s3_client, bucket, tiny_model_dir, tmp_path)


def _wait_for(predicate: Any, timeout: float, proc: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, "trainer exited early"
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_sigkill_after_checkpoint_resumes_from_it(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run, bucket = trainer_run, trainer_run.bucket
    _prepare(run, s3_client, tiny_model_dir, "alpaca")
    run.config["training"].update({"maxSteps": 24, "saveSteps": 4, "saveTotalLimit": 3})

    proc = run.start("first.log")
    marker = "out/job-1/checkpoints/step-4/_COMPLETE"
    try:
        _wait_for(lambda: marker in _keys(s3_client, bucket, "out/job-1/checkpoints/"), 300, proc)
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to save: like a node loss
        proc.wait(30)
    complete = [k for k in _keys(s3_client, bucket, "out/job-1/checkpoints/") if k.endswith("_COMPLETE")]
    resumed_step = max(int(k.split("/")[3].removeprefix("step-")) for k in complete)
    assert 4 <= resumed_step < 24
    assert not _keys(s3_client, bucket, "out/job-1/manifest.json")

    # A new pod: a fresh scratch folder, so the checkpoint can only come from S3.
    run.config["workDir"] = str(tmp_path / "scratch-2")
    code, log = run.run(log_name="second.log")
    assert code == 0, log
    assert f"checkpoint: resuming from step {resumed_step}" in log
    metrics = json.loads(_get(s3_client, bucket, "out/job-1/metrics.json"))
    assert metrics["resumedFromStep"] == resumed_step
    assert metrics["globalStep"] == 24
    # Only the remaining steps ran again; the loss history carried over from the checkpoint.
    assert log.count("{'loss'") == 24 - resumed_step
    assert [e["step"] for e in metrics["lossHistory"]] == list(range(1, 25))


def test_sigterm_saves_a_checkpoint_and_stops(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path
) -> None:
    run, bucket = trainer_run, trainer_run.bucket
    _prepare(run, s3_client, tiny_model_dir, "prompt_completion")
    run.config["training"].update({"maxSteps": 200, "saveSteps": 1000})

    proc = run.start()
    log_path = run.work / "trainer.log"
    try:
        _wait_for(lambda: "'loss'" in log_path.read_text(errors="replace"), 300, proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text(errors="replace")
    assert code == 128 + signal.SIGTERM, log
    steps = [k for k in _keys(s3_client, bucket, "out/job-1/checkpoints/") if k.endswith("_COMPLETE")]
    assert len(steps) == 1, steps
    step = int(steps[0].split("/")[3].removeprefix("step-"))
    assert 1 <= step < 200
    summary = json.loads(run.termination_path.read_text())
    assert summary == {"phase": "Interrupted", "lastCheckpointStep": step, "exitCode": 143}
    assert not _keys(s3_client, bucket, "out/job-1/manifest.json")
