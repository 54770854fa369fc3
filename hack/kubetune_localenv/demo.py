"""``make demo``: the main job, end to end, on the embedded default.

Starts the local control plane, S3 server and node agent, ``helm install``s the
chart (the node agent runs the operator's pod), builds a tiny Llama and a small chat dataset, uploads them
to S3, ``kubectl apply``-s ``examples/local/finetunejob-tiny.yaml``, shows
progress live, and ends with the final status, the adapter's location and a
sample generation with the adapter. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import stack
from .agents import pod_log_path, start_agent
from .cluster import LaunchError, LocalEnv
from .tools import ToolBuildError

NAMESPACE = "kubetune-demo"
OPERATOR_NAMESPACE = "kubetune-system"
JOB_NAME = "tiny-chat"
BUCKET = "kubetune-demo"
PROMPT = "what follows red"


def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


PROGRESS_COLUMNS = ",".join(
    [
        "PHASE:.status.phase",
        "REASON:.status.reason",
        "STEP:.status.progressSummary",
        "LOSS:.status.progress.loss",
        "EVAL-LOSS:.status.progress.evalLoss",
        "TOKENS/S:.status.progress.tokensPerSecond",
        "ETA-S:.status.progress.etaSeconds",
        "CHECKPOINT:.status.progress.lastCheckpoint",
    ]
)


def show_progress(env: LocalEnv, last: list[str]) -> None:
    """Print the job's status row whenever it changes (the same fields `kubectl get ftj` reads)."""
    out = env.kubectl("get", "ftj", JOB_NAME, "-n", NAMESPACE, "-o", f"custom-columns={PROGRESS_COLUMNS}")
    header, _, row = out.strip().partition("\n")
    if row and (not last or row != last[-1]):
        if not last:
            print(header)
        print(row, flush=True)
        last.append(row)


def sample_generation(env: LocalEnv, work: Path) -> tuple[str, str]:
    """Generate with the base model and with base + adapter (downloaded from S3)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = stack.s3_client(env)
    adapter_dir = work / "adapter"
    prefix = f"adapters/{JOB_NAME}/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if rel.startswith("checkpoints/"):
                continue
            target = adapter_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(BUCKET, obj["Key"], str(target))
    model_dir = work / "tiny-llama"
    # The adapter folder carries the tokenizer and the chat template the trainer used.
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )

    def generate(model: Any) -> str:
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        return str(tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))

    before = generate(base)
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    return before, generate(tuned)


def run(state: Path, keep: bool) -> int:
    started = time.monotonic()
    env = LocalEnv(state)
    env.extra_start.append(lambda e: start_agent(e, gpus=0))
    work = Path(tempfile.mkdtemp(prefix="kubetune-demo-"))
    say("starting the local control plane, S3 server and node agent (first run builds them from source)")
    try:
        env.start()
    except (LaunchError, ToolBuildError) as err:
        print(f"kubetune: error: {err}", file=sys.stderr)
        return 1
    try:
        print(f"kube-apiserver {env.apiserver_url}   S3 {env.s3.endpoint if env.s3 else '-'}")
        print(f"export KUBECONFIG={env.kubeconfig}   # to look around with kubectl while it runs")
        say("helm install kubetune charts/kubetune (CRDs, RBAC, the operator Deployment)")
        stack.install_with_helm(env, OPERATOR_NAMESPACE)
        print(env.kubectl("get", "deploy,pods", "-n", OPERATOR_NAMESPACE).rstrip())
        say("building a tiny Llama and a chat dataset; uploading them to S3")
        stack.upload_tiny_inputs(env, BUCKET, work)
        stack.ensure_namespace(env, NAMESPACE)
        stack.create_credentials_secret(env, NAMESPACE)
        job = stack.render_tiny_job(
            env, name=JOB_NAME, namespace=NAMESPACE, bucket=BUCKET, max_steps=80, save_steps=20
        )
        manifest = work / "finetunejob.yaml"
        manifest.write_text(job.manifest)
        say(f"kubectl apply -f {manifest}   (from examples/local/finetunejob-tiny.yaml)")
        print(env.kubectl("apply", "-f", str(manifest)).strip())

        say("training (the FineTuneJob's status, printed as it changes)")
        rows: list[str] = []

        done = stack.wait_for(
            "the FineTuneJob to finish",
            lambda: stack.phase_in(env, NAMESPACE, JOB_NAME, {"Succeeded", "Failed"}),
            1800,
            on_tick=lambda: show_progress(env, rows),
            interval=1.0,
        )
        show_progress(env, rows)
        say(f"kubectl get ftj -n {NAMESPACE} -o wide")
        print(env.kubectl("get", "ftj", "-n", NAMESPACE, "-o", "wide").rstrip())
        status = done["status"]
        say("final status")
        print(json.dumps(status, indent=2))
        if status.get("phase") != "Succeeded":
            pods = json.loads(env.kubectl("get", "pods", "-n", NAMESPACE, "-o", "json"))["items"]
            for pod in pods:
                print(f"trainer log: {pod_log_path(env, NAMESPACE, pod['metadata']['name'], 'trainer')}")
            return 1
        say(f"adapter written to {status['outputURI']}")
        client = stack.s3_client(env)
        listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"adapters/{JOB_NAME}/")
        for obj in listing.get("Contents", []):
            if "/checkpoints/" not in obj["Key"]:
                print(f"  s3://{BUCKET}/{obj['Key']}  ({obj['Size']} bytes)")
        say(f"sample generation for {PROMPT!r}")
        before, after = sample_generation(env, work)
        print(f"  base model:          {before!r}")
        print(f"  base model + adapter: {after!r}")
        say(f"done in {time.monotonic() - started:.0f}s")
        print(f"trainer log: make logs STATE={state} POD={JOB_NAME}")
        if keep:
            say("everything keeps running; press Ctrl-C to stop it")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        env.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_localenv.demo", description=__doc__)
    parser.add_argument("--state", type=Path, default=Path(".kubetune/demo"))
    parser.add_argument("--keep", action="store_true", help="keep the cluster running until Ctrl-C")
    args = parser.parse_args(argv)
    # One demo per state folder: the lock is held for the demo's lifetime, so a second
    # `make demo` cannot wipe the folder a running (--keep) demo is using.
    lock_path = args.state.parent / f".{args.state.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"kubetune: error: a demo is already running in {args.state}: stop it (Ctrl-C),"
                " or run another with DEMO_ARGS='--state <other folder>'",
                file=sys.stderr,
            )
            return 1
        if args.state.exists():
            shutil.rmtree(args.state)  # each demo starts from a clean cluster
        return run(args.state.resolve(), args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
