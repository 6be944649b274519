"""README.md as a test: every command block and Python example runs as written, against real
servers, in a scratch folder; a README that drifts from the code fails here.

What the test reads in README.md:

- Indented code blocks are shell commands, one per line (a trailing `\\` continues a line).
- ```python blocks are run with this interpreter.
- ```yaml blocks are files the commands name: a block with `ops` is spec.yaml, a block of
  training sections (data, model, ...) is train.yaml. Each is validated by the code that reads
  it, then written into the scratch folder.
- ```text blocks are prose (diagrams). A fenced block with any other info string, or none, fails
  the test, so that no block escapes it unnoticed.
- Inline code that starts with an entry point (`augserve serve --metrics-port 9400`,
  `./scripts/demo.sh --set data.epochs=2`) is checked like a marked block's command.

The marker. A block that cannot run on a development machine carries, on the line right before
it (blank lines between are allowed), an HTML comment

    <!-- not run here: REASON -->

(a Docker engine, a Kubernetes cluster, a GPU, minutes of work). A marked block is checked
without running it: `bash -n` (`compile()` for Python, a YAML parse for YAML), and every command
in it by a checker for its program (see CHECKERS): our entry points parse their arguments with
their own argparse parser (and --config files load); `./scripts/*.sh` run with `--help`;
`docker` builds name stages of the Dockerfile and runs pass the arguments after the image to
the image's entry point's parser; `docker compose -f`, `kubectl` and `kustomize` name files,
resources and images that exist under deploy/. A program without a checker fails the test, and
so does a marker that is not followed by a block.

How unmarked blocks run (the only changes to the text as written):

- `HOST` is 127.0.0.1 and `/data/pets` a small ImageFolder tree in the scratch folder (four
  demo pictures per class). Port 50051 is the port of the last server the block started, else
  of a demo server this module starts (datasets `demo`, `scenes` and `pets`).
- `augserve serve` gets `--port 0 --port-file FILE` in place of any `--port`. It runs until the
  block ends: it must write its port, serve the datasets it names (checked with a client;
  TLS servers are checked by the commands after them) and exit 0 on SIGTERM.
- Trainer commands (`augserve-train`, `-m trainer`) get `--set run.max_steps=1 --set
  data.batch_size=16`: one optimizer step on a small batch, then a checkpoint, so that
  `--resume` has one to continue from (and the file keeps to about a minute and a half).
- `./scripts/...` runs in the checkout; everything else in the scratch folder, through bash.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from helpers import write_pki
from servers import ServerProcess, wait_until

from augserve.client import Client
from augserve.core.spec import AugmentSpec
from augserve.core.yamlio import load_yaml
from trainer.run_config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"^<!--\s*not run here:\s*(?P<reason>\S.*?)\s*-->$")
FENCE = re.compile(r"^```(?P<info>\S*)\s*$")
PORT = "50051"
TRAINER_SHORTENING = " --set run.max_steps=1 --set data.batch_size=16"
COMMAND_SECONDS = 180


# --- reading the README ----------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the block's first line of content
    kind: str  # shell | python | yaml | text
    text: str
    not_run: str | None  # the marker's reason, if marked

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"

    def commands(self) -> list[str]:
        """Shell commands, continuation lines joined, blank lines left out."""
        joined = re.sub(r"\\\n\s*", " ", self.text)
        return [line.strip() for line in joined.splitlines() if line.strip()]


def read_blocks(text: str) -> tuple[list[Block], str]:
    """The code blocks of a Markdown text, and the text outside them (for inline code)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    prose: list[str] = []
    marker: tuple[int, str] | None = None  # (line, reason) of a marker waiting for its block
    index = 0

    def take_marker() -> str | None:
        nonlocal marker
        reason = marker[1] if marker else None
        marker = None
        return reason

    while index < len(lines):
        line = lines[index]
        fence = FENCE.match(line)
        previous_blank = index == 0 or not lines[index - 1].strip() or MARKER.match(lines[index - 1].strip())
        if fence:
            end = next((j for j in range(index + 1, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, f"README.md:{index + 1}: a fenced block that never closes"
            info = fence["info"]
            kinds = {"bash": "shell", "sh": "shell", "python": "python", "yaml": "yaml", "text": "text"}
            assert info in kinds, (
                f"README.md:{index + 1}: fenced block with info string {info!r}; use one of {sorted(kinds)}"
            )
            blocks.append(Block(index + 2, kinds[info], "\n".join(lines[index + 1 : end]) + "\n", take_marker()))
            index = end + 1
            continue
        if line.startswith("    ") and line.strip() and previous_blank:
            end = index
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            body = [item[4:] for item in lines[index:end]]
            while body and not body[-1].strip():
                body.pop()
            blocks.append(Block(index + 1, "shell", "\n".join(body) + "\n", take_marker()))
            index = end
            continue
        found = MARKER.match(line.strip())
        if found:
            assert marker is None, f"README.md:{marker[0]}: a marker not followed by a code block"
            marker = (index + 1, found["reason"])
        elif line.strip():
            assert marker is None, f"README.md:{marker[0]}: a marker not followed by a code block"
            prose.append(line)
        index += 1
    assert marker is None, f"README.md:{marker[0]}: a marker not followed by a code block"
    return blocks, "\n".join(prose)


BLOCKS, PROSE = read_blocks(README.read_text(encoding="utf-8"))


def blocks_of(kind: str, run: bool) -> list[Block]:
    return [block for block in BLOCKS if block.kind == kind and (block.not_run is None) == run]


def ids(blocks: list[Block]) -> list[str]:
    return [block.where for block in blocks]


# --- commands --------------------------------------------------------------------------------


def without_comment(command: str) -> str:
    return re.sub(r"(^|\s+)#(\s.*)?$", "", command)


def words_of(command: str) -> list[list[str]]:
    """The simple commands of a command line (split at `&&`, `;`, `|` and parentheses), each
    without its leading VAR=value assignments."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    simple: list[list[str]] = [[]]
    for word in lexer:
        if word in ("&&", ";", "|", "||", "(", ")"):
            simple.append([])
        elif simple[-1] or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word):
            simple[-1].append(word)
    return [words for words in simple if words]


def parse_with(parser: argparse.ArgumentParser, argv: list[str], what: str) -> argparse.Namespace | None:
    """Parse `argv` as `parser` would on the command line; fail with its message if it refuses.
    None for --help (which exits 0)."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"{what}: {errors.getvalue().strip()}"
        return None


def augserve_parser() -> argparse.ArgumentParser:
    from augserve.cli import build_parser

    return build_parser()


def trainer_parser() -> argparse.ArgumentParser:
    from trainer.cli import build_parser

    return build_parser()


def sweep_parser() -> argparse.ArgumentParser:
    from trainer.sweep import build_parser

    return build_parser()


def check_trainer_arguments(argv: list[str], what: str, folder: Path) -> None:
    from trainer.cli import resolve_config

    args = parse_with(trainer_parser(), argv, what)
    if args is not None and (args.config is None or (folder / args.config).exists()):
        if args.config is not None:
            args.config = str(folder / args.config)
        resolve_config(args)  # every flag and --set names a real field with a valid value


def check_sweep_arguments(argv: list[str], what: str, folder: Path) -> None:
    from trainer.sweep import plan_runs

    args = parse_with(sweep_parser(), argv, what)
    if args is not None and (folder / args.config).exists():
        overrides = {dotted: load_yaml(text) for dotted, _, text in (item.partition("=") for item in args.set)}
        plan_runs(load_yaml((folder / args.config).read_text()), overrides)


MODULES: dict[str, Callable[[list[str], str, Path], None]] = {
    "augserve": lambda argv, what, folder: parse_with(augserve_parser(), argv, what),
    "augserve.cli": lambda argv, what, folder: parse_with(augserve_parser(), argv, what),
    "trainer": check_trainer_arguments,
    "trainer.sweep": check_sweep_arguments,
}


def check_python(argv: list[str], what: str, folder: Path) -> None:
    if argv[0] == "-m":
        assert argv[1] in MODULES, f"{what}: python -m {argv[1]} is not an entry point of this project"
        MODULES[argv[1]](argv[2:], what, folder)
    else:
        assert (ROOT / argv[0]).is_file(), f"{what}: {argv[0]} does not exist"


def check_torchrun(argv: list[str], what: str, folder: Path) -> None:
    from torch.distributed.run import get_args_parser

    args = parse_with(get_args_parser(), argv, what)
    assert args is not None and args.module and args.training_script in MODULES, f"{what}: torchrun -m {args.training_script}?"
    MODULES[args.training_script](args.training_script_args, what, folder)


@functools.cache
def script_help(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / script), "--help"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=COMMAND_SECONDS)


def check_script(script: str) -> Callable[[list[str], str, Path], None]:
    def check(argv: list[str], what: str, folder: Path) -> None:
        result = script_help(script)
        assert result.returncode == 0, f"{what}: {script} --help failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        if script == "scripts/demo.sh":
            check_sweep_arguments(["--config", "configs/demo_sweep.yaml", "--serve-demo", *argv], what, ROOT)
        else:
            for argument in argv:
                if "/" in argument or argument.endswith(".py"):
                    assert (ROOT / argument).exists(), f"{what}: {argument} does not exist"

    return check


def dockerfile_stages() -> set[str]:
    text = (ROOT / "Dockerfile").read_text()
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.MULTILINE | re.IGNORECASE))


IMAGE_ENTRY_POINTS = {
    # image name -> (how the image's entry point begins the command line, the checker)
    "augserve": (["serve", "--host", "0.0.0.0", "--port", PORT], MODULES["augserve"]),
    "augserve-trainer": ([], MODULES["trainer"]),
}


def check_image_tag(reference: str, what: str) -> str:
    name, _, tag = reference.rpartition("/")[2].partition(":")
    assert name in IMAGE_ENTRY_POINTS, f"{what}: image {reference!r} is none of {sorted(IMAGE_ENTRY_POINTS)}"
    assert tag == version("augserve"), f"{what}: image tag {tag!r}, but the project's version is {version('augserve')}"
    return name


def check_docker(argv: list[str], what: str, folder: Path) -> None:
    if argv[0] == "build":
        options = dict(zip(argv[1::2], argv[2::2]))
        check_image_tag(options["-t"], what)
        if "--target" in options:
            assert options["--target"] in dockerfile_stages(), f"{what}: no stage {options['--target']!r} in the Dockerfile"
        assert (ROOT / argv[-1]).is_dir(), f"{what}: build context {argv[-1]} is not a folder"
    elif argv[0] == "run":
        image_at = next(i for i, word in enumerate(argv) if re.fullmatch(r"[\w.-]+:[\w.-]+", word) and not argv[i - 1].startswith("-"))
        prefix, check = IMAGE_ENTRY_POINTS[check_image_tag(argv[image_at], what)]
        check(prefix + argv[image_at + 1 :], what, folder)
    elif argv[0] == "compose":
        file_at = argv.index("-f") + 1
        assert "services" in yaml.safe_load((ROOT / argv[file_at]).read_text()), f"{what}: {argv[file_at]} has no services"
        assert argv[file_at + 1] in ("up", "down"), f"{what}: docker compose {argv[file_at + 1]}?"
    else:
        raise AssertionError(f"{what}: no check for docker {argv[0]}")


def kubernetes_objects() -> set[tuple[str, str]]:
    objects = set()
    for path in (ROOT / "deploy" / "kubernetes").glob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            if document and "metadata" in document:
                objects.add((document["kind"].lower(), document["metadata"]["name"]))
    return objects


def check_kubectl(argv: list[str], what: str, folder: Path) -> None:
    if "-k" in argv:
        kustomization = ROOT / argv[argv.index("-k") + 1] / "kustomization.yaml"
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            assert (kustomization.parent / resource).is_file(), f"{what}: {kustomization} lists {resource}, which is missing"
    if "-f" in argv and argv[0] != "logs":
        assert list(yaml.safe_load_all((ROOT / argv[argv.index("-f") + 1]).read_text())), f"{what}: empty manifest"
    for word in argv:
        if re.fullmatch(r"(deployment|job|service)/[\w.-]+", word):
            kind, name = word.split("/")
            assert (kind, name) in kubernetes_objects(), f"{what}: no {kind} {name!r} in deploy/kubernetes"


def check_kustomize(argv: list[str], what: str, folder: Path) -> None:
    assert argv[:3] == ["edit", "set", "image"], f"{what}: kustomize {' '.join(argv[:3])}?"
    images = yaml.safe_load((folder / "kustomization.yaml").read_text())["images"]
    for assignment in argv[3:]:
        name = assignment.partition("=")[0]
        assert name in {image["name"] for image in images}, f"{what}: kustomization.yaml has no image {name!r}"


CHECKERS: dict[str, Callable[[list[str], str, Path], None]] = {
    "augserve": MODULES["augserve"],
    "augserve-train": MODULES["trainer"],
    "augserve-sweep": MODULES["trainer.sweep"],
    "python": check_python,
    "torchrun": check_torchrun,
    "./scripts/demo.sh": check_script("scripts/demo.sh"),
    "./scripts/test.sh": check_script("scripts/test.sh"),
    "docker": check_docker,
    "kubectl": check_kubectl,
    "kustomize": check_kustomize,
}


def check_without_running(command: str, what: str) -> None:
    folder = ROOT
    for words in words_of(command):
        program, argv = words[0], words[1:]
        if program == "cd":
            folder = folder / argv[0]
            assert folder.is_dir(), f"{what}: cd {argv[0]}: no such folder"
            continue
        assert program in CHECKERS, f"{what}: no way to check {program!r} without running it; add it to CHECKERS"
        CHECKERS[program](argv, what, folder)


def test_the_readme_has_blocks_of_every_kind():
    """Guards the reader itself: were it to find nothing, every test below would pass."""
    assert {block.kind for block in BLOCKS} >= {"shell", "python", "yaml", "text"}
    assert len(blocks_of("shell", run=True)) >= 4 and blocks_of("shell", run=False)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "shell"], ids=ids([b for b in BLOCKS if b.kind == "shell"]))
def test_shell_blocks_are_valid_bash(block):
    result = subprocess.run(["bash", "-n"], check=False, input=block.text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{block.where}: {result.stderr}"


@pytest.mark.parametrize("block", blocks_of("shell", run=False), ids=ids(blocks_of("shell", run=False)))
def test_marked_shell_blocks_name_real_flags_files_and_resources(block):
    for command in block.commands():
        check_without_running(command, f"{block.where} ({block.not_run}): {command}")


def test_marked_python_and_yaml_blocks_parse():
    for block in BLOCKS:
        if block.not_run and block.kind == "python":
            compile(block.text, block.where, "exec")
        elif block.not_run and block.kind == "yaml":
            yaml.safe_load(block.text)


ENTRY_POINT = re.compile(r"^(\w+=\S+\s+)*(augserve|augserve-train|augserve-sweep|python|torchrun|\./scripts/\w+\.sh)(\s|$)")


def inline_commands() -> list[str]:
    spans = re.findall(r"`([^`]+)`", re.sub(r"\s*\n\s*", " ", PROSE))
    return [span for span in spans if ENTRY_POINT.match(span) and span.strip() != words_of(span)[0][0]]


def test_inline_commands_name_real_flags():
    commands = inline_commands()
    assert "augserve serve --metrics-port 9400" in commands  # the search finds what it should
    for command in commands:
        check_without_running(command, f"README.md inline `{command}`")


# --- running ---------------------------------------------------------------------------------


@dataclass
class Scratch:
    folder: Path
    pets: Path
    server: ServerProcess  # the demo server commands talk to when their block started none


def yaml_file_name(block: Block) -> str:
    """Which file a YAML block is, after validating it with the code that reads that file."""
    data = load_yaml(block.text)
    if isinstance(data, dict) and "ops" in data:
        AugmentSpec.from_yaml(block.text)
        return "spec.yaml"
    if isinstance(data, dict) and set(data) <= set(TrainConfig.SECTIONS):
        TrainConfig.from_dict(data)
        return "train.yaml"
    raise AssertionError(f"{block.where}: a YAML block that is neither a spec nor a training config; teach yaml_file_name")


def substitute(text: str, scratch: Scratch, port: int) -> str:
    text = re.sub(r"\bHOST\b", "127.0.0.1", text)
    text = text.replace("/data/pets", str(scratch.pets))
    return re.sub(rf"\b{PORT}\b", str(port), text)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, demo_root) -> Scratch:
    folder = tmp_path_factory.mktemp("readme")
    pets = folder / "data" / "pets"
    for class_folder in sorted(demo_root.iterdir()):
        if class_folder.is_dir():
            (pets / class_folder.name).mkdir(parents=True)
            for picture in sorted(class_folder.glob("*.jpg"))[:4]:
                shutil.copy(picture, pets / class_folder.name / picture.name)
    (folder / "server.yaml").write_text(yaml.safe_dump({"datasets": {"pets": {"path": str(pets), "validation_fraction": 0.1}}}))
    write_pki(folder)  # ca.crt, server.crt, server.key (for localhost and 127.0.0.1)
    (folder / "tokens.txt").write_text("readme-token\n")
    server = ServerProcess(folder, {"pets": str(pets)}, extra=["--demo"])
    for block in blocks_of("yaml", run=True):
        (folder / yaml_file_name(block)).write_text(substitute(block.text, Scratch(folder, pets, server), server.port))
    yield Scratch(folder, pets, server)
    server.stop()


@pytest.mark.parametrize("block", blocks_of("yaml", run=True), ids=ids(blocks_of("yaml", run=True)))
def test_yaml_blocks_are_valid_files(block):
    yaml_file_name(block)


class BlockServers:
    """The `augserve serve` commands of one block, running until the block ends."""

    def __init__(self, scratch: Scratch) -> None:
        self.scratch = scratch
        self.running: list[tuple[subprocess.Popen, Path, str]] = []
        self.port = scratch.server.port

    def start(self, command: str, what: str, environment: dict[str, str]) -> None:
        port_file = self.scratch.folder / f"port-{time.monotonic_ns()}"
        log_path = port_file.with_suffix(".log")
        command = re.sub(r"\s--port\s+\S+", "", command) + f" --port 0 --port-file {port_file}"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(["bash", "-c", "exec " + command], cwd=self.scratch.folder, env=environment,
                                       stdout=log, stderr=subprocess.STDOUT)
        self.running.append((process, log_path, what))
        assert wait_until(lambda: port_file.exists() or process.poll() is not None, timeout=60), f"{what}: no port after 60 s"
        assert process.poll() is None, f"{what}: exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
        self.port = int(port_file.read_text())
        args = augserve_parser().parse_args(words_of(command)[0][1:])
        if args.tls_cert is None:
            expected = {name for name, _ in args.dataset or []} | ({"demo", "scenes"} if args.demo else set())
            if args.config:
                expected |= set(load_yaml((self.scratch.folder / args.config).read_text())["datasets"])
            with Client(f"127.0.0.1:{self.port}", timeout=30) as client:
                served = {info.name for info in client.list_datasets()}
            assert served == expected, f"{what}: serves {sorted(served)}, expected {sorted(expected)}"

    def stop_all(self) -> None:
        """SIGTERM every server; each must exit 0."""
        failures = []
        for process, log_path, what in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait(10)
            if code != 0:
                failures.append(f"{what}: exit {code} after SIGTERM:\n{log_path.read_text()[-2000:]}")
        self.running.clear()
        assert not failures, "\n".join(failures)


def is_trainer(words: list[str]) -> bool:
    return words[0] == "augserve-train" or ("-m" in words and words[words.index("-m") + 1] == "trainer")


def environment() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("block", blocks_of("shell", run=True), ids=ids(blocks_of("shell", run=True)))
def test_shell_blocks_run_as_written(block, scratch):
    servers = BlockServers(scratch)
    try:
        for written in block.commands():
            command = substitute(without_comment(written), scratch, servers.port)
            words = words_of(command)[0]
            what = f"{block.where}: {written}"
            if words[:2] == ["augserve", "serve"]:
                servers.start(command, what, environment())
                continue
            if is_trainer(words):
                command += TRAINER_SHORTENING
            folder = ROOT if words[0].startswith("./scripts/") else scratch.folder
            result = subprocess.run(["bash", "-c", command], check=False, cwd=folder, env=environment(), capture_output=True,
                                    text=True, timeout=COMMAND_SECONDS)
            assert result.returncode == 0, f"{what}\nexit {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    finally:
        servers.stop_all()


@pytest.mark.parametrize("block", blocks_of("python", run=True), ids=ids(blocks_of("python", run=True)))
def test_python_blocks_run_as_written(block, scratch):
    code = substitute(block.text, scratch, scratch.server.port)
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=scratch.folder, env=environment(), capture_output=True,
                            text=True, timeout=COMMAND_SECONDS)
    assert result.returncode == 0, f"{block.where}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
