"""One rank of the two-process ``torchrun`` launches of tests/test_distributed.py (gloo on the CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py SPEC.json

``SPEC.json`` names the phase and the inputs. Phase ``first`` trains full-batch and GradCache runs, a run with
dropout, encodes a corpus, and finally starts the dropout run again in another directory and "kills" it (every rank
raises at the same step, after a checkpoint). Phase ``resume`` continues that run and resumes an encoding a single
process left unfinished. Each rank writes ``writes.<phase>.rank<R>.json``: how often it wrote a checkpoint or a model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dense.config import TrainConfig
from dense.corpus_encoding import encode_corpus
from dense.distributed import init_distributed, shutdown_distributed
from dense.encoder import load_encoder
from dense.encoder_base import DenseEncoder
from dense.training import list_checkpoints, train
from dense_fixtures import tiny_encoder_config, toy_records_and_passages, toy_teacher_groups

# the distilling run (tests/test_distributed.py): 4 teacher groups per step, 2 per rank
DISTILL = {"distill_batch_size": 4, "distill_passages": 3, "distill_weight": 2.0}


class SimulatedKill(RuntimeError):
    """Raised by :class:`KillingLookup` in place of the process being killed."""


class KillingLookup:
    """``pid -> text`` that raises once it has been asked for ``limit`` passages (the same step on every rank)."""

    def __init__(self, passages: dict[str, str], limit: int) -> None:
        self.passages, self.limit, self.calls = passages, limit, 0

    def __call__(self, pid: str) -> str:
        self.calls += 1
        if self.calls > self.limit:
            raise SimulatedKill(f"killed after {self.limit} passage lookups")
        return self.passages[pid]


def count_writes(counts: dict[str, int]) -> None:
    """Count checkpoint and model writes of this process (checkpoints also save a model, counted apart)."""
    import dense.training as training

    save_checkpoint, save_model = training.save_checkpoint, DenseEncoder.save

    def counted_checkpoint(*args: Any, **kwargs: Any) -> Path:
        counts["checkpoints"] += 1
        return save_checkpoint(*args, **kwargs)

    def counted_save(self: DenseEncoder, directory: str | Path, *args: Any, **kwargs: Any) -> Path:
        counts["models" if Path(directory).name == "model" and "checkpoints" not in str(directory) else "other"] += 1
        return save_model(self, directory, *args, **kwargs)

    training.save_checkpoint = counted_checkpoint
    DenseEncoder.save = counted_save  # type: ignore[method-assign]


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    context = init_distributed()
    if context.world_size != 2:
        raise SystemExit(f"expected 2 processes, got {context.world_size}")
    out = Path(spec["out"])
    records, passages = toy_records_and_passages()
    base = TrainConfig.from_dict(spec["train_config"])
    plain = tiny_encoder_config(Path(spec["backbone"]))
    with_dropout = tiny_encoder_config(Path(spec["backbone_dropout"]))
    killable = base.replace(grad_cache_chunk=5, checkpoint_every=3)
    counts = {"checkpoints": 0, "models": 0, "other": 0}
    count_writes(counts)
    encoder = load_encoder(spec["encoder_dir"], device="cpu")
    corpus = [tuple(p) for p in spec["corpus"]]
    encoding = {"batch_size": spec["encode_batch_size"], "shard_size": spec["shard_size"], "fp16": False,
                "model_fingerprint": "tiny", "progress": False}
    if spec["phase"] == "first":
        train(plain, base, records, passages, out / "full", device="cpu")
        train(plain, base.replace(grad_cache_chunk=5), records, passages, out / "gradcache", device="cpu")
        train(plain, base.replace(**DISTILL), records, passages, out / "distill", device="cpu",
              teacher_groups=toy_teacher_groups(shift=1))
        train(with_dropout, killable, records, passages, out / "dropout-straight", device="cpu")
        encode_corpus(encoder, corpus, out / "encoded", **encoding)
        share = base.batch_size // 2 * (1 + base.hard_negatives)  # passages this rank looks up per step
        try:
            train(with_dropout, killable, records, KillingLookup(passages, spec["kill_before_step"] * share - share),
                  out / "killed", device="cpu")
        except SimulatedKill:
            steps = [s for s, _ in list_checkpoints(out / "killed" / "checkpoints")]
            (out / f"killed.rank{context.rank}.json").write_text(json.dumps({"checkpoints": steps}))
    else:
        train(with_dropout, killable, records, passages, out / "killed", resume=True, device="cpu")
        encode_corpus(encoder, corpus, out / "encoded-resumed", **encoding)
    (out / f"writes.{spec['phase']}.rank{context.rank}.json").write_text(json.dumps(counts))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
