"""`launch/train.py` with one fault injected, for tests/trainers/test_faults_trainer.py:

    python tests/helpers/faulty_trainer_script.py nan_weights|disk_full|late_sigterm [launch/train.py flags]

nan_weights: right after the first optimizer step every weight becomes NaN (an update that overflowed).
disk_full: every torch.save fails the way torch's zip writer reports a full disk.
late_sigterm: rank 0 sends itself SIGTERM at the end of step 2's bookkeeping, after the ranks have
    agreed whether to stop at that step.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch.train import main  # noqa: E402
from vidartrain.trainers.base import Trainer  # noqa: E402


def poison_weights_after_first_step() -> None:
    train_step = Trainer.train_step

    def poisoned(self, batches):
        record = train_step(self, batches)
        if self.step == 0:
            with torch.no_grad():
                for param in self.engine.module.parameters():
                    getattr(param, "ds_tensor", param).fill_(float("nan"))
        return record

    Trainer.train_step = poisoned


def fail_every_save() -> None:
    def save(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 665856 vs 665744")

    torch.save = save


def sigterm_after_the_stop_vote() -> None:
    after_step = Trainer.after_step

    def signalled(self, record):
        after_step(self, record)
        if self.step == 2 and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    Trainer.after_step = signalled


if __name__ == "__main__":
    fault, *flags = sys.argv[1:]
    {"nan_weights": poison_weights_after_first_step, "disk_full": fail_every_save,
     "late_sigterm": sigterm_after_the_stop_vote}[fault]()
    raise SystemExit(main(flags))
