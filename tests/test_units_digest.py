"""experiments/units_digest.py: one digest over every generated unit, blind to the sources hash, not to a kernel."""
from __future__ import annotations

from dataclasses import replace

from experiment_scripts import load_experiment


def test_digest_ignores_the_sources_hash_and_follows_every_unit(monkeypatch):
    script = load_experiment("units_digest")
    before = script.units_digest("90a")
    assert len(before) == 16 and before == script.units_digest("90a")

    from fusionsearch import resources
    monkeypatch.setattr(resources, "sources_hash", lambda: "0123456789abcdef")  # part of the library key only
    assert script.units_digest("90a") == before

    real_spec = script.library_spec

    def one_unit_changed(cfg, arch):
        spec = real_spec(cfg, arch=arch)
        edited = replace(spec.units[0], source=spec.units[0].source + "// edited\n")
        return replace(spec, units=(edited, *spec.units[1:]))

    monkeypatch.setattr(script, "library_spec", one_unit_changed)
    assert script.units_digest("90a") != before
