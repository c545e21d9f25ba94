"""Manifest and expert-option validation (issue 9, item 9): every mistake is one line and exit 2.

Each bad manifest goes through the real CLI (``label_pipeline.cli.main``): exit code 2, exactly one
error line naming the key path, no traceback, and nothing written to the output root.
"""

import json
import logging
from pathlib import Path

import pytest
import yaml
from builders import photo_samples, write_manifest, write_wds

from expert_zoo.base import ExpertOptions, option_names
from expert_zoo.canny import CannyEdge
from expert_zoo.registry import build_expert, expert_class, resolve_expert
from label_pipeline.cli import main
from label_pipeline.config import ConfigError, check_output_root, manifest_from_dict
from label_pipeline.core.expert_request import ExpertRequest
from label_pipeline.run import check_compatible, describe_expert_change, expert_entries

DOCS = Path(__file__).resolve().parent.parent / "docs" / "EXPERTS.md"
# The neural experts' modules import torch; the registry's own experts are all checked below.
BUILTIN = [
    "depth:dpt_hybrid",
    "normal:nll_angmf",
    "edge:dexined",
    "edge:canny",
    "seg_coco:mask2former",
    "obj_detection:owlv2",
    "ocr_detection:charnet",
    "ocr_detection:ppocr",
]


@pytest.fixture
def shard(tmp_path):
    return str(write_wds(tmp_path / "in" / "00000.tar", photo_samples(2, size=(24, 32))))


def run_cli(manifest: Path, caplog, capsys) -> tuple[int, list[str]]:
    """Run ``label-pipeline run``; return the exit code and the error lines it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(["run", str(manifest), "--no-progress"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out + caplog.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(r.exc_info is None for r in errors), "an expected error must not log a traceback"
    return code, [r.getMessage() for r in errors]


@pytest.mark.parametrize(
    "change,expected",
    [
        # item 9, one by one
        ({"source_extra": {"skip_missing": "no"}}, "source.skip_missing: expected true/false, got 'no'"),
        ({"output": [1, 2]}, "output: expected a string, got [1, 2]"),
        ({"batch_size": "four"}, "batch_size: expected an integer or null, got 'four'"),
        (
            {"experts": [{"name": "edge:canny", "options": {"low": "abc"}}]},
            "experts[0].options.low: expected a number, got 'abc'",
        ),
        (
            {"experts": [{"name": "edge:canny", "options": {"lowww": 5}}]},
            "experts[0].options.lowww: unknown option for edge:canny; did you mean 'low'?",
        ),
        # and their relatives
        ({"source_extra": {"shard_size": "10"}}, "source.shard_size: expected an integer, got '10'"),
        ({"source_extra": {"skip_missing": 1}}, "source.skip_missing: expected true/false, got 1"),
        ({"decode": {"max_pixels": "lots"}}, "decode.max_pixels: expected an integer, got 'lots'"),
        ({"decode": {"min_side": True}}, "decode.min_side: expected an integer, got True"),
        ({"name": 12}, "name: expected a string, got 12"),
        ({"batch_size": 0}, "batch_size: must be >= 1, got 0"),
        ({"runner": ["ray"]}, "runner: expected a mapping or null, got ['ray']"),
        ({"experts": ["edge:canny", 7]}, "experts[1]: an expert entry must be"),
        ({"experts": [{"name": "edge:canny", "option": {}}]}, "did you mean 'options'?"),
        ({"experts": [{"name": "edge:canny", "options": [1]}]}, "experts[0].options: expected a mapping"),
        (
            {"experts": [{"name": "edge:canny", "options": {"low": True}}]},
            "experts[0].options.low: expected a number, got True",
        ),
        (
            {"experts": [{"name": "edge:canny", "options": {"low": 300}}]},
            "experts[0].options.low: edge:canny needs 0 <= low <= high",
        ),
        (
            {"experts": [{"name": "edge:canny", "options": {"batch_size": 2.5}}]},
            "experts[0].options.batch_size: expected an integer or null, got 2.5",
        ),
        (
            {"experts": ["edge:canny", {"name": "ocr_detection:ppocr", "options": {"limit_type": "mid"}}]},
            "experts[1].options.limit_type: expected one of 'min', 'max', got 'mid'",
        ),
    ],
)
def test_bad_manifest_is_one_line_and_exit_2(tmp_path, shard, monkeypatch, caplog, capsys, change, expected):
    monkeypatch.chdir(tmp_path)  # a value used as a path would land here
    source = {"format": "webdataset", "path": shard, **change.pop("source_extra", {})}
    data = {
        "name": "t",
        "source": source,
        "output": str(tmp_path / "out"),
        "experts": ["edge:canny"],
        **change,
    }
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(data))  # not write_manifest: it would turn any output into a string
    before = sorted(p.name for p in tmp_path.iterdir())
    code, errors = run_cli(manifest, caplog, capsys)
    assert code == 2
    assert len(errors) == 1 and expected in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output root, no "[1, 2]" folder


def test_option_typo_is_reported_before_any_weights_load(tmp_path, shard, caplog, capsys):
    # The first expert's weights do not exist: had it been built first, the error would be about them.
    experts = [
        {"name": "edge:dexined", "options": {"weights": str(tmp_path / "absent.pth")}},
        {"name": "ocr_detection:charnet", "options": {"sha": "0" * 64}},
    ]
    manifest = write_manifest(
        tmp_path / "m.yaml", {"format": "webdataset", "path": shard}, tmp_path / "o", experts
    )
    code, errors = run_cli(manifest, caplog, capsys)
    assert code == 2 and len(errors) == 1
    assert (
        "experts[1].options.sha: unknown option for ocr_detection:charnet; did you mean 'sha256'?"
        in errors[0]
    )
    assert not (tmp_path / "o").exists()


def test_output_that_is_a_file_is_one_line_and_exit_2(tmp_path, shard, caplog, capsys):
    taken = tmp_path / "labels.txt"
    taken.write_text("not a directory")
    for output in (taken, taken / "under"):
        manifest = write_manifest(
            tmp_path / "m.yaml", {"format": "webdataset", "path": shard}, output, ["edge:canny"]
        )
        code, errors = run_cli(manifest, caplog, capsys)
        assert code == 2 and len(errors) == 1 and "is a file" in errors[0], errors
        assert taken.read_text() == "not a directory"


def test_check_output_root(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    check_output_root(str(tmp_path / "dir"))
    check_output_root(str(tmp_path / "new" / "deeper"))
    check_output_root(f"file://{tmp_path}/dir")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_output_root(str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=r"file is a file, so no directory can be made under it"):
        check_output_root(str(tmp_path / "file" / "a" / "b"))


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"source": {"format": "coco", "images": "i", "annotations": ["a", 3]}}, "source.annotations[1]"),
        ({"source": {"format": "webdataset", "path": ["a.tar"]}}, "source.path: expected a string or null"),
        (
            {"source": {"format": "webdataset", "path": "a", "transform": "x"}},
            "source.transform: expected a mapping",
        ),
        ({"source": {"format": "webdatset", "path": "a"}}, "did you mean 'webdataset'?"),
        (
            {"source": {"format": "webdataset", "path": "a", "skip_mising": True}},
            "did you mean 'skip_missing'?",
        ),
        ({"experts": [{"name": 3}]}, "experts[0].name: expected a string, got 3"),
        (
            {"experts": [{"name": "edge", "options": {1: 2}}]},
            "experts[0].options: option names must be strings",
        ),
        ({"experts": ["edge:"]}, "experts[0]: expected 'task' or 'task:backend'"),
        ({"output": ""}, "output: must not be empty"),
        ({"description": ["x"]}, "description: expected a string or null"),
    ],
)
def test_manifest_types_name_the_key(change, expected):
    data = {
        "name": "x",
        "source": {"format": "webdataset", "path": "a.tar"},
        "output": "o",
        "experts": ["edge"],
    }
    with pytest.raises(ConfigError) as error:
        manifest_from_dict({**data, **change}, env={})
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_valid_values_still_pass():
    manifest = manifest_from_dict(
        {
            "name": "x",
            "source": {"format": "coco", "images": "i", "annotations": "a.json", "shard_size": 5},
            "output": "${OUT:-o}",
            "experts": [{"name": "edge:canny", "options": {"low": 10, "high": 20.5, "blur_sigma": 0}}],
            "decode": {"max_pixels": 1000},
            "batch_size": 4,
            "runner": {"replicas": {"edge": 2}},
        },
        env={},
    )
    assert manifest.source.annotations == ["a.json"] and manifest.output == "o"
    assert manifest.experts[0].options == {"low": 10, "high": 20.5, "blur_sigma": 0}


# -- expert options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_expert_declares_typed_options(name):
    cls = expert_class(name)
    assert issubclass(cls.Options, ExpertOptions) and cls.Options is not ExpertOptions
    defaults = cls.Options()  # every option has a default, and the defaults are valid
    assert defaults.batch_size is None
    own = [n for n in option_names(cls.Options) if n != "batch_size"][-1]
    with pytest.raises(
        ConfigError, match=rf"experts\[0\].options.{own}x: unknown option .*did you mean '{own}'\?"
    ):
        resolve_expert(ExpertRequest.parse({"name": name, "options": {own + "x": 1}}, "experts[0]"))
    resolved = resolve_expert(ExpertRequest.parse({"name": name, "options": {"batch_size": 2}}))
    assert resolved.cls is cls and resolved.options == {"batch_size": 2} and resolved.settings.batch_size == 2


def test_docs_list_every_option():
    options_section = DOCS.read_text().split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    for name in BUILTIN:
        assert f"\n### `{name}`\n" in options_section, f"docs/EXPERTS.md has no options table for {name}"
        table = options_section.split(f"\n### `{name}`\n", 1)[1].split("\n### ", 1)[0]
        for option in option_names(expert_class(name).Options):
            if option != "batch_size":  # common to all, described once above the tables
                assert f"`{option}`" in table, f"docs/EXPERTS.md does not document {name}'s option {option}"


def test_direct_construction_is_checked_too():
    with pytest.raises(
        ConfigError, match=r"options.blur: unknown option for edge:canny; did you mean 'blur_sigma'"
    ):
        CannyEdge({"blur": 1})
    wrong_arch = r"^normal:nll_angmf.options.arch: 'b6' is not one of \['b5', 'tiny'\]$"
    with pytest.raises(ConfigError, match=wrong_arch):
        build_expert("normal:nll_angmf", options={"arch": "b6", "weights": "/absent.pth"})


def test_fingerprints_of_existing_outputs_are_unchanged():
    # Labels written before options were typed must not be seen as stale: same options, same fingerprint.
    assert CannyEdge().fingerprint() == "d6b181ba8d57417e"
    assert CannyEdge({"low": 100, "high": 200, "blur_sigma": 1.0}).fingerprint() == CannyEdge().fingerprint()
    assert CannyEdge({"batch_size": 3}).fingerprint() == CannyEdge().fingerprint()  # throughput only
    assert CannyEdge({"low": 50}).fingerprint() != CannyEdge().fingerprint()


# -- a refused run says what changed ---------------------------------------------------------------------
def test_refusal_shows_the_option_diff(tmp_path, shard, caplog, capsys):
    source = {"format": "webdataset", "path": shard}
    out = tmp_path / "out"
    assert (
        main(["run", str(write_manifest(tmp_path / "a.yaml", source, out, ["edge:canny"])), "--no-progress"])
        == 0
    )
    recorded = json.loads((out / "_run.json").read_text())["experts"]["edge"]
    assert recorded["options"] == {} and recorded["version"] == CannyEdge.spec.version
    changed = [{"name": "edge:canny", "options": {"low": 1, "high": 2}}]
    code, errors = run_cli(write_manifest(tmp_path / "b.yaml", source, out, changed), caplog, capsys)
    assert code == 2 and len(errors) == 1
    assert "option high: default (200) → 2; option low: default (100) → 1" in errors[0]
    assert "--relabel edge" in errors[0]


def test_change_description_covers_backend_version_and_weights():
    old = {
        "name": "edge:dexined",
        "fingerprint": "a",
        "options": {"sha256": "x"},
        "version": "1",
        "weights": "ab" * 32,
    }
    new = {"name": "edge:dexined", "fingerprint": "b", "options": {}, "version": "2", "weights": "cd" * 32}
    changes = describe_expert_change(old, new)
    assert changes == [
        "version 1 → 2",
        'option sha256: "x" → default (null)',
        f"weights {'ab' * 8} → {'cd' * 8}",
    ]
    assert describe_expert_change({"name": "edge:dexined"}, {"name": "edge:canny"}) == [
        "backend edge:dexined → edge:canny"
    ]
    # an entry from before versions and weights were recorded: nothing to compare but the fingerprint
    assert (
        "nothing this output recorded differs"
        in describe_expert_change(
            {"name": "edge:canny", "fingerprint": "a"},
            {"name": "edge:canny", "fingerprint": "b", "options": {}},
        )[0]
    )
    with pytest.raises(ConfigError, match="weights abababababababab → cdcdcdcdcdcdcdcd"):
        check_compatible({"source": {}, "experts": {"edge": old}}, {}, {"edge": new}, relabel=[])
    check_compatible({"source": {}, "experts": {"edge": old}}, {}, {"edge": new}, relabel=["edge"])


def test_expert_entries_record_weights_and_version():
    manifest = manifest_from_dict(
        {"name": "x", "source": {"format": "demo", "path": "d"}, "output": "o", "experts": ["edge:canny"]},
        env={},
    )
    entries = expert_entries(manifest, {"edge": "edge:canny"}, {"edge": "f"}, weights={"edge": "w"})
    assert entries == {
        "edge": {"name": "edge:canny", "fingerprint": "f", "options": {}, "version": "1", "weights": "w"}
    }
