"""``accelerate launch`` that exits with the trainer's own exit code.

torch.distributed's launcher (what ``accelerate launch --multi_gpu``/``--use_fsdp`` runs) turns a
failed rank into exit 1 of the container, which hides the codes the Job's podFailurePolicy acts on:
an invalid dataset (42) would be retried until backoffLimit, and a pod stopped with SIGTERM (143)
would count against it. This runs accelerate's own launcher in process and exits with the first
failed rank's code (128 + N for a rank killed by signal N, as a shell does), or 128 + N when the
launcher itself was stopped by signal N.

    python -m kubetune_trainer.launch --num_processes 2 ... -m kubetune_trainer --config ...
"""

from __future__ import annotations

import sys


def exit_code(code: int) -> int:
    """A process exit status as the container reports it: a signal's negative code becomes 128 + N."""
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(f"kubetune: rank {rank} exited with {failure.exitcode}", file=sys.stderr)
        return exit_code(failure.exitcode)
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
