"""What `plughost check` finds without running a plugin, and the scaffold."""

from __future__ import annotations

from pathlib import Path

import pytest

from host.checker import static_problems
from host.scaffold import ScaffoldError, create


def _plugin(tmp_path: Path, manifest: str, module: str = "", name: str = "demo") -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "plugin.toml").write_text(manifest)
    if module:
        (directory / f"{name}.py").write_text(module)
    return directory


GOOD = 'name = "demo"\nversion = "1"\nentrypoint = "demo:Demo"\n'
CLASS = "class Demo:\n    def run(self, payload):\n        return {}\n"


def test_a_fresh_scaffold_has_no_problem(tmp_path: Path) -> None:
    directory = create("edge-count", tmp_path)
    manifest, problems = static_problems(directory)
    assert problems == []
    assert manifest is not None and manifest.entrypoint == "edge_count:EdgeCount"
    assert manifest.options is not None
    assert {p.name for p in directory.iterdir()} == {
        "plugin.toml",
        "edge_count.py",
        "test_edge_count.py",
        "README.md",
    }


@pytest.mark.parametrize("name", ["Bad Name", "", "x" * 65, "9lives/../x"])
def test_the_scaffold_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ScaffoldError, match="plugin name"):
        create(name, tmp_path)


def test_the_scaffold_never_overwrites(tmp_path: Path) -> None:
    create("demo", tmp_path)
    with pytest.raises(ScaffoldError, match="already exists"):
        create("demo", tmp_path)


def test_a_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    directory = _plugin(tmp_path, GOOD, "class Demo:\n    def run(self, payload)\n")
    _, problems = static_problems(directory)
    assert len(problems) == 1
    assert problems[0].file == directory / "demo.py" and problems[0].line == 2
    assert "syntax error" in str(problems[0])


def test_a_wrong_entrypoint_says_what_to_write(tmp_path: Path) -> None:
    manifest = GOOD.replace("demo:Demo", "demo:Plugin")
    directory = _plugin(tmp_path, manifest, CLASS)
    _, problems = static_problems(directory)
    assert [p.file for p in problems] == [directory / "plugin.toml"]
    assert "'Plugin'" in problems[0].message
    assert 'set entrypoint = "demo:Demo"' in problems[0].message


def test_a_missing_module_names_the_file_expected(tmp_path: Path) -> None:
    directory = _plugin(tmp_path, GOOD.replace("demo:Demo", "dmeo:Demo"), CLASS)
    _, problems = static_problems(directory)
    assert "module 'dmeo' not found" in problems[0].message
    assert "dmeo.py" in problems[0].message


def test_limits_over_the_host_maxima_are_problems_not_silent_cuts(tmp_path: Path) -> None:
    manifest = GOOD + "[limits]\ntimeout_s = 600\nmemory_mb = 100000\n"
    directory = _plugin(tmp_path, manifest, CLASS)
    _, problems = static_problems(directory)
    messages = [p.message for p in problems]
    assert any("limits.timeout_s" in m and "set timeout_s <= 60" in m for m in messages)
    assert any("limits.memory_mb" in m and "set memory_mb <= 2048" in m for m in messages)


def test_every_manifest_problem_is_listed_with_its_field(tmp_path: Path) -> None:
    manifest = (
        'name = "Demo!"\nversion = "1"\nentrypoint = "demo:Demo"\n'
        'dependencies = ["numpy<<2"]\ntimeuot = 3\n'
    )
    directory = _plugin(tmp_path, manifest, CLASS)
    _, problems = static_problems(directory)
    text = "\n".join(str(p) for p in problems)
    assert "field 'name'" in text
    assert "field 'dependencies.0'" in text and "PEP 508" in text
    assert "field 'timeuot': is not a manifest field" in text


def test_a_toml_error_names_the_line(tmp_path: Path) -> None:
    directory = _plugin(tmp_path, GOOD + "limits = [\n  1,\n  ?\n]\n", CLASS)
    _, problems = static_problems(directory)
    assert len(problems) == 1 and "not valid TOML" in problems[0].message
    assert problems[0].line == 6


def test_a_missing_directory_is_named_as_such(tmp_path: Path) -> None:
    _, problems = static_problems(tmp_path / "nope")
    assert [str(p) for p in problems] == [f"{tmp_path / 'nope'}: no such directory"]


@pytest.mark.parametrize(
    ("imports", "declared"),
    [
        ("import numpy", "numpy"),
        ("from PIL import Image", "Pillow"),
        ("import cv2", "opencv-python-headless"),
        ("import skimage.filters", "scikit-image"),
    ],
)
def test_an_undeclared_import_is_named_with_what_to_declare(
    tmp_path: Path, imports: str, declared: str
) -> None:
    module = imports.split()[1].split(".")[0]
    directory = _plugin(tmp_path, GOOD, f"import os\n{imports}\n\n\n{CLASS}")
    manifest, problems = static_problems(directory)
    assert manifest is None and len(problems) == 1
    assert problems[0].file == directory / "demo.py" and problems[0].line == 2
    assert f"imports {module}, which `dependencies` does not declare" in problems[0].message
    # The suggestion is a distribution the index knows (the import name of
    # Pillow or OpenCV is not); for cv2 either OpenCV wheel will do.
    suggested = problems[0].message.split('add "')[1].split('"')[0]
    assert suggested == declared or (module == "cv2" and suggested.startswith("opencv-python"))
    fixed = GOOD + f'dependencies = ["{declared}"]\n'
    (directory / "plugin.toml").write_text(fixed)
    assert static_problems(directory)[1] == []


def test_the_standard_library_and_the_plugins_own_modules_are_not_undeclared(
    tmp_path: Path,
) -> None:
    manifest = GOOD + 'dependencies = ["Pillow>=10.2", "opencv-python-headless", "numpy"]\n'
    module = (
        "from __future__ import annotations\nimport json, os.path\nimport helpers\n"
        "from PIL import Image\nimport cv2\nimport numpy as np\nfrom . import sibling\n\n\n" + CLASS
    )
    directory = _plugin(tmp_path, manifest, module)
    (directory / "helpers.py").write_text("X = 1\n")
    assert static_problems(directory)[1] == []


def test_every_options_schema_problem_is_listed_with_its_path_in_plain_words(
    tmp_path: Path,
) -> None:
    manifest = (
        GOOD + '[options]\ntype = "object"\n[options.properties.count]\ntype = "integr"\n'
        'minimum = "one"\n[options.properties.mode]\ntype = ["string", "strin"]\n'
    )
    directory = _plugin(tmp_path, manifest, CLASS)
    _, problems = static_problems(directory)
    texts = sorted(p.message for p in problems)
    types = "(string, number, integer, boolean, array, object, null)"
    assert texts == [
        "field 'options.properties.count.minimum': 'one' is not of type 'number'",
        "field 'options.properties.count.type': 'integr' is not one of the JSON Schema "
        f"types {types}",
        "field 'options.properties.mode.type': 'strin' is not one of the JSON Schema "
        f"types {types}",
    ]
    assert all(p.file == directory / "plugin.toml" for p in problems)
