"""The container stage (``make test-containers``, run by .ci/run after the unit suite; marker ``containers``):
the CPU image built with podman from a local base (``make images``), the data steps and training in it as the
non-root user, two containers as two torchrun nodes, a flow run through a real Docker-API worker on podman's
socket, and the Kubernetes pool's pod template under ``podman kube play``. Needs podman, runc and mmdebstrap
(the make target installs them with apt) and the local services (SeaweedFS, MLflow; Prefect where asked)."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from helpers import assert_same_training, free_port, sft_dataset, weights

pytestmark = [pytest.mark.containers, pytest.mark.services]

CLIENT_ENV = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "TUNELINE_S3_ENDPOINT_URL"]


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    from services import images

    done = subprocess.run([images.engine(), *args], env=images.engine_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{images.engine()} {' '.join(args[:3])} exited {done.returncode}: {done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="session")
def image() -> str:
    """The CPU image as `make images` builds it (the layers are cached: a rebuild after a code change is short)."""
    from services import images

    report = images.build("cpu")
    assert report["size_mib"] > 0 and report["seconds"] > 0
    return report["image"]


@pytest.fixture
def containers():
    """Names of the containers a test starts; every one is removed afterwards, whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_the_image_runs_a_data_step_as_its_non_root_user(image, tmp_path):
    assert podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == "10001:10001"
    records = [{"text": "write to kim.minji@example.co.kr or call 010-1234-5678"}, {"text": "nothing to hide"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp_path.chmod(0o777)  # the container's user (10001) writes its output here
    done = podman("run", "--rm", "--network", "none", "--volume", f"{tmp_path}:/data", image, "sh", "-c",
                  "id -u && tuneline scrub --input /data/in.jsonl --output /data/out.jsonl --field text")
    assert done.stdout.splitlines()[0] == "10001"
    out = [json.loads(line)["text"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert "kim.minji@example.co.kr" not in out[0] and "<EMAIL>" in out[0] and out[1] == "nothing to hide"
    assert (tmp_path / "out.jsonl").stat().st_uid != 0  # written by the container's user, not root


def test_two_containers_as_two_torchrun_nodes_train_like_one_process(image, services, tiny_model, tmp_path, containers):
    """Two containers on the host network, one rank each, meet through a c10d rendezvous (gloo): DDP, then FSDP,
    give the steps, losses and weights of one process on the same global batches."""
    from safetensors.torch import load_file

    from steps.config import TrainConfig
    from steps.core.lineage import run_key
    from steps.core.store import ArtifactRef, ArtifactStore, ModelRef
    from steps.train import parallel
    from steps.train.step import STEP, train_model

    store = ArtifactStore.from_env(prefix=f"test-{uuid.uuid4().hex[:10]}")
    data = sft_dataset(store, tmp_path, tiny_model, n=30)
    one = TrainConfig(method="full", max_steps=4, batch_size=5, grad_accum_steps=2, learning_rate=1e-3,
                      warmup_steps=1, seed=5, checkpoint_every=2)
    single = train_model(one, data, tiny_model, store)
    for strategy in ("ddp", "fsdp"):
        two = one.model_copy(update={"processes": 2, "distributed": strategy})
        key = run_key(STEP, two, [data.digest, tiny_model.base.digest])
        args = parallel.rank_args(two, data, tiny_model, store, key, cache_dir="/tmp/tuneline-cache")
        endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
        names = [f"tuneline-node{i}-{run_id}" for i in range(2)]
        containers.extend(names)
        for i, name in enumerate(names):  # each node its own address (loopback has all of 127/8): torchrun tells
            # nodes apart by address and process id, and both containers' ranks are process 1 of their own
            command = parallel.torchrun_command(args, 1, nodes=2, endpoint=endpoint, run_id=run_id,
                                                local_addr=f"127.0.0.{i + 1}", python="python")
            podman("run", "--detach", "--name", name, "--network", "host", *[f"--env={v}" for v in CLIENT_ENV],
                   "--env=GLOO_SOCKET_IFNAME=lo", "--env=OMP_NUM_THREADS=1", image, *command)
        codes = [podman("wait", name, timeout=300, check=False).stdout.strip() for name in names]
        logs = "\n".join(podman("logs", name, check=False).stderr[-2000:] for name in names)
        assert codes == ["0", "0"], logs
        done = store.lookup(STEP, key)
        assert done is not None, logs
        double = ModelRef(base=tiny_model.base, adapter=ArtifactRef(**done.model_dump()))
        assert_same_training(store, single, double, "full")
        assert store.read_json(double.adapter, "train_report.json")["distributed"] == strategy
    base = load_file(store.download(tiny_model.base) / "model.safetensors")
    trained = weights(store, single, "full")
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 1e-3  # the comparison is not vacuous
