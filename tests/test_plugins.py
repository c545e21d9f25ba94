"""Expert plugins: the docs/EXPERTS.md example, named by import path in a manifest or registered as
an entry point, labels through ``label-pipeline run`` on both runners with the same bytes."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import pytest
from builders import photo_samples, write_manifest, write_wds

from expert_zoo import registry
from label_pipeline.cli import main
from label_pipeline.core.expert_request import ExpertRequest

DOCS = Path(__file__).resolve().parent.parent / "docs" / "EXPERTS.md"
PLUGIN = {"name": "depth:brightness_plugin", "class": "my_experts:BrightnessDepth", "options": {"levels": 8}}


def documented_example() -> str:
    """The ``# my_experts.py`` code block of docs/EXPERTS.md, exactly as a reader would copy it."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    (example,) = [block for block in blocks if block.startswith("# my_experts.py")]
    return example


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """my_experts.py on sys.path and PYTHONPATH (Ray workers started later import it from there)."""
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "my_experts.py").write_text(documented_example())
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), saved]))
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("my_experts", None)
    if saved is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def ray_cluster(plugin_dir):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shards/*.tar"))}


def test_the_documented_plugin_labels_on_both_runners(plugin_dir, ray_cluster, tmp_path):
    write_wds(tmp_path / "in" / "00000.tar", photo_samples(3))
    source = {"format": "webdataset", "path": f"{tmp_path}/in/00000.tar"}
    outputs = {}
    for runner in ("local", "ray"):
        out = tmp_path / runner
        manifest = write_manifest(tmp_path / f"{runner}.yaml", source, out, [PLUGIN, "edge:canny"])
        assert main(["run", str(manifest), "--no-progress", "--runner", runner]) == 0
        outputs[runner] = digests(out)
    assert outputs["local"] == outputs["ray"] and outputs["local"]
    assert main(["verify", str(tmp_path / "local")]) == 0
    # the labels are the plugin's: 8 grey levels, multiples of 32
    import tarfile

    import numpy as np

    from label_pipeline.core.format import decode_png

    with tarfile.open(tmp_path / "local" / "shards" / "00000.tar") as tar:
        depth = decode_png(tar.extractfile("000000.depth.png").read())
    assert set(np.unique(depth)) <= set(range(0, 256, 32)) and len(np.unique(depth)) > 1


def test_plugin_mistakes_are_one_line_usage_errors(plugin_dir, tmp_path, capsys):
    write_wds(tmp_path / "in" / "00000.tar", photo_samples(1))
    source = {"format": "webdataset", "path": f"{tmp_path}/in/00000.tar"}
    cases = {
        "cannot import no_such_module": {**PLUGIN, "name": "depth:other", "class": "no_such_module:X"},
        "has no 'Missing'": {**PLUGIN, "name": "depth:other2", "class": "my_experts:Missing"},
        "declares spec 'depth:brightness_plugin'": {**PLUGIN, "name": "depth:renamed"},
        "did you mean 'levels'": {**PLUGIN, "options": {"levelz": 2}},
        "expected 'module.path:ClassName'": {**PLUGIN, "class": "my_experts.BrightnessDepth"},
        "is already registered as expert_zoo.canny:CannyEdge": {**PLUGIN, "name": "edge:canny"},
    }
    for expected, entry in cases.items():
        manifest = write_manifest(tmp_path / "m.yaml", source, tmp_path / "out", [entry])
        assert main(["run", str(manifest), "--no-progress"]) == 2, expected
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_entry_point_plugins_are_registered(plugin_dir, tmp_path, monkeypatch):
    dist = tmp_path / "site" / "my_experts-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-experts\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[label_pipeline.experts]\n"
        "depth:brightness_ep = my_experts:BrightnessDepth\n"
        "edge:canny = my_experts:BrightnessDepth\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    names = registry.available()
    assert "depth:brightness_ep" in names
    assert registry._REGISTRY["edge:canny"] == "expert_zoo.canny:CannyEdge"  # built-ins stay
    resolved = registry.resolve_name(ExpertRequest.parse("depth:brightness_ep"))
    assert resolved == "depth:brightness_ep"
    with pytest.raises(registry.ExpertUnavailable, match="declares spec"):  # name and spec disagree
        registry.expert_class(resolved)
