"""One rank of a data-parallel train step, as torchrun starts it (``steps.train.parallel.launch``):

    python -m torch.distributed.run --standalone --nproc_per_node N -m steps.train.rank '<json>'

The JSON holds references only (config, DatasetRef, ModelRef, bucket, prefix, cache folder, run
key); the environment (S3 endpoint and credentials, offline flags) is inherited.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from steps.config import TrainConfig
from steps.core.device import pick_device
from steps.core.store import ArtifactStore, DatasetRef, ModelRef, s3_client
from steps.train.parallel import Group
from steps.train.step import train_in_process


def main(argv: list[str] | None = None) -> None:
    """One rank of a data-parallel train step (run by torchrun; see ``launch``)."""
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    cfg = TrainConfig.model_validate(args["cfg"])
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    store = ArtifactStore(s3_client(os.environ.get("TUNELINE_S3_ENDPOINT_URL") or None), args["bucket"],
                          args["prefix"], Path(args["cache_dir"]))
    group = Group.start(pick_device(cfg.device), cfg.distributed)
    try:
        train_in_process(cfg, DatasetRef.model_validate(args["data"]), ModelRef.model_validate(args["model"]), store,
                         args["key"], group)
    finally:
        group.stop()


if __name__ == "__main__":
    main()
