"""A multi-node train step as Kubernetes objects (``steps.train.parallel.indexed_job``), rendered from the pool's base
job template the way its worker renders a Job (``flows.deploy.job_manifest``): checked against the parts of the
batch/v1 Job and v1 Service schemas it uses (no cluster runs here: the container stage runs the same torchrun
command in two containers), and its command parsed by torchrun's own argument parser."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from flows.deploy import job_manifest
from steps.train.parallel import indexed_job, torchrun_command

TEMPLATE = Path(__file__).resolve().parents[2] / "deployments" / "work-pools" / "kubernetes.json"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
QUANTITY = {"anyOf": [{"type": "integer", "minimum": 0},
                      {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$"}]}
ENV_VAR = {"type": "object", "required": ["name"], "additionalProperties": False,
           "properties": {"name": {"type": "string", "minLength": 1}, "value": {"type": "string"}}}
CONTAINER = {
    "type": "object", "required": ["name", "image", "command"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": DNS_LABEL}, "image": {"type": "string", "minLength": 1},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "command": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "env": {"type": "array", "items": ENV_VAR},
        "envFrom": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
            "secretRef": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            "configMapRef": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"], "properties": {
            "containerPort": {"type": "integer", "minimum": 1, "maximum": 65535},
            "name": {"type": "string", "maxLength": 15}}}},
        "resources": {"type": "object", "additionalProperties": False, "properties": {
            "limits": {"type": "object", "additionalProperties": QUANTITY},
            "requests": {"type": "object", "additionalProperties": QUANTITY}}},
        "securityContext": {"type": "object", "additionalProperties": False, "properties": {
            "allowPrivilegeEscalation": {"type": "boolean"},
            "capabilities": {"type": "object", "properties": {"drop": {"type": "array"}, "add": {"type": "array"}}}}},
    }}
POD_SPEC = {
    "type": "object", "required": ["containers", "restartPolicy"], "additionalProperties": False,
    "properties": {
        "containers": {"type": "array", "items": CONTAINER, "minItems": 1},
        "restartPolicy": {"enum": ["Never", "OnFailure"]},  # a Job's pods may not restart Always
        "subdomain": {"type": "string", "pattern": DNS_LABEL},
        "serviceAccountName": {"type": "string"},
        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "tolerations": {"type": "array", "items": {"type": "object", "properties": {
            "key": {"type": "string"}, "operator": {"enum": ["Exists", "Equal"]},
            "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]}}}},
        "securityContext": {"type": "object", "additionalProperties": False, "properties": {
            "runAsNonRoot": {"type": "boolean"}, "runAsUser": {"type": "integer", "minimum": 0},
            "runAsGroup": {"type": "integer", "minimum": 0}, "fsGroup": {"type": "integer", "minimum": 0},
            "seccompProfile": {"type": "object", "properties": {"type": {"enum": ["RuntimeDefault", "Localhost",
                                                                                   "Unconfined"]}}}}},
    }}
JOB = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "batch/v1"}, "kind": {"const": "Job"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": DNS_LABEL}, "namespace": {"type": "string", "pattern": DNS_LABEL},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "required": ["template", "completions", "parallelism", "completionMode"],
                 "additionalProperties": False, "properties": {
                     "completionMode": {"enum": ["NonIndexed", "Indexed"]},
                     "completions": {"type": "integer", "minimum": 1},
                     "parallelism": {"type": "integer", "minimum": 1},
                     "backoffLimit": {"type": "integer", "minimum": 0},
                     "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                     "template": {"type": "object", "required": ["spec"], "additionalProperties": False,
                                  "properties": {"metadata": {"type": "object"}, "spec": POD_SPEC}}}},
    }}
SERVICE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {"apiVersion": {"const": "v1"}, "kind": {"const": "Service"},
                   "metadata": {"type": "object", "required": ["name"],
                                "properties": {"name": {"type": "string", "pattern": DNS_LABEL}}},
                   "spec": {"type": "object", "required": ["clusterIP", "selector", "ports"], "properties": {
                       "clusterIP": {"const": "None"},  # headless: each pod gets <pod>.<service> in DNS
                       "selector": {"type": "object", "minProperties": 1}}}},
}


def rendered(job_variables: dict) -> tuple[dict, dict]:
    template = json.loads(TEMPLATE.read_text())
    job = job_manifest(template, {"image": "registry.example/tuneline-gpu:0.1.0", **job_variables})
    return indexed_job(job, json.dumps({"cfg": {}}), nodes=4, per_node=8, run_id="ab12cd34")


def test_the_indexed_job_for_four_gpu_nodes_validates_and_runs_the_same_launcher():
    service, job = rendered({"gpu_limit": 8, "node_selector": {"nvidia.com/gpu.present": "true"},
                             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                             "namespace": "tuneline"})
    jsonschema.validate(job, JOB)
    jsonschema.validate(service, SERVICE)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    name = job["metadata"]["name"]
    assert pod["subdomain"] == service["metadata"]["name"] == name
    assert service["spec"]["selector"] == spec["template"]["metadata"]["labels"] | service["spec"]["selector"]
    assert service["metadata"]["namespace"] == job["metadata"]["namespace"] == "tuneline"
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8 and pod["securityContext"]["runAsNonRoot"]
    assert container["envFrom"] == [{"secretRef": {"name": "tuneline-services"}}]
    # torchrun accepts the command, and it is the launcher's own multi-node command: pod 0 hosts the rendezvous.
    from torch.distributed.run import get_args_parser

    command = container["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    parsed = get_args_parser().parse_args(command[3:])
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_backend) == ("4", "8", "c10d")
    assert parsed.rdzv_endpoint == f"{name}-0.{name}:29400" and parsed.training_script == "steps.train.rank"
    assert command == torchrun_command(json.dumps({"cfg": {}}), 8, 4, f"{name}-0.{name}:29400", "ab12cd34",
                                       python="python")


def test_a_broken_manifest_fails_the_schema():
    """The schema is not vacuous: a pod that restarts Always, or an unknown field, is refused."""
    _, job = rendered({})
    job["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="Always"):
        jsonschema.validate(job, JOB)
    _, job = rendered({})
    job["spec"]["template"]["spec"]["containers"][0]["comand"] = ["typo"]
    with pytest.raises(jsonschema.ValidationError, match="comand"):
        jsonschema.validate(job, JOB)


def test_several_nodes_need_a_rendezvous_endpoint():
    from steps.core.errors import ConfigError

    with pytest.raises(ConfigError, match="rendezvous endpoint"):
        torchrun_command("{}", 1, nodes=2)
    assert "--standalone" in torchrun_command("{}", 2)
