"""Every command that README.md and docs/*.md show: each curl line and each Python example runs against an app
serving a tiny run, and each script line parses through that script's own flags.

The examples run as written but for three substitutions: the app's address (http://127.0.0.1:7860 becomes the test
server's port), the photo URL (https://example.com/shoe.jpg becomes a photo on a loopback server: no test leaves
loopback), and nothing else. The catalog served is built to hold every id and filter value the examples name."""
import ast
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import COLOURS, free_port, make_hub_dataset, product_photo

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
APP_URL = "http://127.0.0.1:7860"
PHOTO_URL = "https://example.com/shoe.jpg"
# every value the examples filter on, so that each example finds what it asks for
EXAMPLE_COLOURS = ["White", "Navy Blue", "Red", "Blue", "Black"]
EXAMPLE_SEASONS = ["Summer", "Fall", "Winter"]
EXAMPLE_ID = 15970


def blocks(language: str) -> list[tuple[Path, str]]:
    """(file, body) of every fenced block in that language, in order."""
    found = []
    for path in DOCS:
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(), re.S):
            if lang == language:
                found.append((path, body))
    return found


def shell_lines(body: str) -> list[str]:
    """A bash block's commands: continuations joined, comment lines dropped."""
    return [line.strip() for line in body.replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def curl_commands() -> list[str]:
    commands = []
    for _, body in blocks("bash"):
        text = body.replace("\\\n", " ")
        # a curl whose quoted body spans lines (-d '{ ... }') is one command up to its closing quote
        for match in re.finditer(r"^curl (?:[^'\n]|'[^']*')*$", text, re.M):
            commands.append(match.group(0))
    return commands


@pytest.fixture(scope="module")
def docs_app(clip_run, cache_dir, tmp_path_factory, server):
    """The tiny clip run serving a catalog with the examples' ids and values; a folder with their photos."""
    import datasets

    from fashion_search.cli import app

    root = tmp_path_factory.mktemp("docs")
    hub = make_hub_dataset(root / "catalog", corrupt_rows=0)
    table = datasets.load_dataset(str(hub), split="train")
    table = table.map(lambda _, i: {"id": EXAMPLE_ID + i, "baseColour": EXAMPLE_COLOURS[i % len(EXAMPLE_COLOURS)],
                                    "season": EXAMPLE_SEASONS[i % len(EXAMPLE_SEASONS)]},
                      with_indices=True, input_columns=["id"])
    shutil.rmtree(hub / "data")
    table.to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    run = root / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    service, _ = app.load_service(app.parse_config(["--run", str(run), "--dataset", str(hub), "--cache-dir",
                                                    str(cache_dir), "--allow-private-urls"]))
    port = free_port()
    served = app.serve(service, port=port)
    work = root / "work"
    work.mkdir()
    rng = np.random.default_rng(3)
    for i, name in enumerate(("shirt.jpg", "a.jpg", "b.jpg", "c.jpg")):
        (work / name).write_bytes(product_photo(i, list(COLOURS.values())[i], rng))
    pair = Image.new("RGB", (120, 80), "white")
    for i in range(2):
        pair.paste(Image.open(io.BytesIO(product_photo(i, (200, 30, 30), rng, size=60))), (60 * i, 10))
    pair.save(work / "two-products.jpg")
    yield {"url": f"http://127.0.0.1:{port}", "work": work, "photo": f"{server}/img.jpg"}
    served.close()


def localised(text: str, docs_app) -> str:
    return text.replace(APP_URL, docs_app["url"]).replace(PHOTO_URL, docs_app["photo"])


def test_the_docs_show_curl_and_python_examples():
    commands = curl_commands()
    assert len(commands) >= 8 and any("search_batch" in c for c in commands), commands
    assert len(blocks("python")) >= 5


def test_every_curl_example_answers_results(docs_app):
    for command in curl_commands():
        result = subprocess.run(["bash", "-c", localised(command, docs_app)], cwd=docs_app["work"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (command, result.stderr)
        answer = json.loads(result.stdout)
        assert "error" not in answer, (command, answer)
        if "/api/status" in command:
            assert answer["state"] == "ready"
        elif "search_batch" in command:
            assert len(answer["answers"]) == 3 and all(a["results"] for a in answer["answers"]), answer
        else:
            assert answer["results"], (command, answer)


def test_every_python_example_runs(docs_app, monkeypatch):
    """Each file's Python blocks in order, in one namespace (a later block uses the client an earlier one made);
    every name an example assigns from a search holds results."""
    monkeypatch.chdir(docs_app["work"])
    for path in DOCS:
        namespace = {}
        for file, body in blocks("python"):
            if file != path:
                continue
            exec(compile(localised(body, docs_app), f"{path.name} example", "exec"), namespace)
            for node in ast.walk(ast.parse(body)):
                searched = isinstance(node, ast.Assign) and isinstance(node.value, (ast.Call, ast.Subscript)) and \
                    any(call in ast.unparse(node.value) for call in (".predict(", ".post("))
                if searched:
                    name = node.targets[0].id
                    assert namespace[name], (path.name, name, namespace[name])


SCRIPTS = {"data_preparation.py": "data_preparation", "resnet.py": "resnet", "clip.py": "clip",
           "siamese.py": "siamese", "vae.py": "vae", "evaluation.py": "evaluation", "app.py": "app",
           "catalog.py": "catalog_admin", "-m fashion_search.cli.composed": "composed",
           "-m fashion_search.cli.hybrid": "hybrid", "-m fashion_search.cli.photo_attributes": "photo_attributes"}


def script_lines() -> list[list[str]]:
    """Every shown invocation of a root script (python, .venv/bin/python, torchrun, after env assignments), as argv
    from the script name on; one per `&&`-joined command; in code blocks and inline (`python catalog.py count`)."""
    lines = [line for _, body in blocks("bash") for line in shell_lines(body)]
    for path in DOCS:
        inline = re.findall(r"`((?:python|torchrun) [^`]*(?:\.py\b|-m fashion_search\.cli\.)[^`]*)`", path.read_text())
        lines += [" ".join(command.split()) for command in inline]
    found = []
    for command in (part for line in lines for part in line.split("&&")):
        command = re.sub(r"-m (fashion_search\.cli\.\w+)", r"'-m \1'", command)  # one word, as SCRIPTS names it
        if not any(script in command for script in SCRIPTS):
            continue  # (a curl's JSON body, a benchmark)
        argv = shlex.split(command, comments=True)
        scripts = [i for i, word in enumerate(argv) if word in SCRIPTS]
        if scripts and not any(word.startswith("benchmarks/") for word in argv):
            found.append(argv[scripts[0]:])
    return found


def test_every_script_line_in_the_docs_parses_with_that_scripts_flags():
    import importlib

    lines = script_lines()
    assert {argv[0] for argv in lines} == set(SCRIPTS), lines  # every script is shown at least once
    for argv in lines:
        module = importlib.import_module(f"fashion_search.cli.{SCRIPTS[argv[0]]}")
        config = module.parse_config(argv[1:])  # argparse exits on a flag the script does not have
        assert config is not None
