"""docs/deploy/: the docker compose file, nginx config and Kubernetes manifests parse, say what docs/deploy.md
says (two replicas on one PostgreSQL queue, one shared state volume, the password from a secret file), their
``resunet serve`` command lines are accepted by the real argument parser, and the Kubernetes manifests
validate against the Kubernetes schemas (kubernetes-validate, from the test extra)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from resunet.cli import build_parser
from resunet.cli.serve_cmd import config_from_args

DEPLOY = Path(__file__).resolve().parents[1] / "docs" / "deploy"


def _serve_config(argv: list[str]):
    assert argv[:2] == ["resunet", "serve"], argv
    args = build_parser("serve").parse_args(argv[1:])
    return config_from_args(args)


def test_compose_file_two_replicas_one_queue_one_state_volume():
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = doc["services"]
    assert set(services) == {"db", "resunet", "nginx"}
    node = services["resunet"]
    assert node["deploy"]["replicas"] >= 2
    assert node["depends_on"]["db"]["condition"] == "service_healthy"
    config = _serve_config(node["command"])
    assert config.queue_url.startswith("postgresql://") and "@db/" in config.queue_url
    assert str(config.queue_password_file) == "/run/secrets/pg_password" and "pg_password" in node["secrets"]
    mount = node["volumes"][0].split(":")
    assert mount[1] == str(config.state_dir) and mount[0] in doc["volumes"]
    assert services["db"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/pg_password"
    assert "readyz" in " ".join(node["healthcheck"]["test"])
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert "server resunet:8000;" in nginx and "proxy_pass http://resunet;" in nginx
    assert "./nginx.conf:/etc/nginx/conf.d/default.conf:ro" in services["nginx"]["volumes"]


def test_kubernetes_manifests_validate_and_match_the_docs():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "Deployment", "Service"}
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    dep = kinds["Deployment"]
    assert dep["spec"]["replicas"] >= 2
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = _serve_config(container["args"])
    assert config.queue_url.startswith("postgresql://") and config.require_token
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(config.state_dir)] == "state"
    assert str(config.queue_password_file).startswith(next(p for p, n in mounts.items() if n == "db-password"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes["db-password"]["secret"]["secretName"] == "resunet-db"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    try:
        import kubernetes_validate
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is missing (pip install -e '.[test]')")
        pytest.skip("kubernetes-validate not installed")
    for d in docs:  # raises ValidationError naming the field
        kubernetes_validate.validate(d, "1.30", strict=True)
