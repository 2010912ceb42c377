"""The Docker pool's template (deployments/work-pools/docker.json) names the services' endpoints and credentials by
the references ``tuneline deploy --publish-service-env`` saves, and holds no value of its own."""

from __future__ import annotations

import json
from pathlib import Path

from flows.deploy import SERVICE_SECRETS, SERVICE_VALUES, service_reference

TEMPLATE = Path(__file__).resolve().parents[2] / "deployments" / "work-pools" / "docker.json"


def test_the_docker_pool_env_is_the_published_references_and_only_them():
    template = json.loads(TEMPLATE.read_text())
    env = template["variables"]["properties"]["env"]["default"]
    assert env == {var: f"{{{{ {service_reference(var)} }}}}" for var in (*SERVICE_VALUES, *SERVICE_SECRETS)}
    assert all(ref.startswith("{{ prefect.blocks.secret.") for var, ref in env.items() if var in SERVICE_SECRETS)
    assert template["job_configuration"]["env"] == "{{ env }}"
