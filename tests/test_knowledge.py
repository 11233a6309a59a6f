"""The knowledge base: format, ids, references, and coverage of what the code knows."""
import pytest
import yaml

from airan.config import AiranConfig
from airan.core import causes
from airan.core.evidence import KNOWN_KPIS
from airan.core.knowledge import (
    FORMAT_VERSION, KNOWLEDGE_DIR, KnowledgeError, fact_terms, load_knowledge, name_like_tokens, parse_documents,
)  # fmt: skip
from airan.errors import ErrorKind
from sims.kpis import KPI_UNITS


@pytest.fixture(scope="module")
def kb():
    return load_knowledge()


def test_every_file_has_the_current_format_version():
    files = sorted(KNOWLEDGE_DIR.glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        assert yaml.safe_load(f.read_text())["format_version"] == FORMAT_VERSION, f.name


def test_ids_are_unique_and_references_resolve(kb):
    ids = [p.id for p in kb.passages]
    assert len(ids) == len(set(ids))
    for p in kb.passages:
        assert p.id.startswith(p.kind + ":") and p.title and p.text
        assert all(kb.get(ref) is not None for ref in p.see), p.id


def test_every_simulator_and_evidence_kpi_is_covered_with_its_unit(kb):
    assert len(kb.kpi_names) >= 40
    for name, unit in KPI_UNITS.items():
        assert kb[f"kpi:{name}"].unit == unit, name
    assert set(KNOWN_KPIS) <= kb.kpi_names
    for p in kb.of_kind("kpi"):
        assert {"definition", "rises", "falls", "typical"} <= set(p.fields) and "measures" in p.keys
        assert p.name in p.text and f"unit: {p.unit}" in p.text


def test_every_cause_has_a_playbook_with_the_tables_facts(kb):
    for c in causes.CAUSES.values():
        p = kb[f"cause:{c.name}"]
        assert f"Severity {c.severity}" in p.text and p.keys["severity"] == c.severity
        for action, value in c.actions:
            spec = causes.ACTIONS[action]
            assert action in p.text
            if spec.parameter:
                assert f"{spec.parameter} = {value} {spec.unit} (allowed {spec.minimum} to {spec.maximum}" in p.text
        for kpi, _ in c.moves:
            assert kpi in p.text and f"kpi:{kpi}" in p.see
        if c.key_kpi:
            assert f"Key KPI: {c.key_kpi}" in p.text


def test_every_rpc_status_and_config_section_is_covered(kb):
    from airan.v1 import control_pb2, netops_pb2

    for module, service in ((netops_pb2, "NetOpsService"), (control_pb2, "ControlService")):
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            assert kb.get(f"api:{service}.{method.name}") is not None, method.name
    for kind in ErrorKind:
        assert kb.get(f"status:{kind.value}") is not None, kind
    for section in AiranConfig.model_fields:
        assert kb.get(f"config:{section}") is not None, section
    assert "max_tokens_limit (512)" in kb["config:limits"].text  # keys and defaults come from the model


def test_loop_classes_state_their_budgets(kb):
    assert "10 ms and 1 s" in kb["loop:near-rt"].text and "above 1 s" in kb["loop:non-rt"].text
    assert "under 10 ms" in kb["loop:real-time"].text


def test_keys_parse_into_terms(kb):
    assert fact_terms("PRB|resource block; used") == [("prb", "resource block"), ("used",)]
    for p in kb.passages:
        for aspect, fact in p.keys.items():
            assert fact_terms(fact), (p.id, aspect)


def _doc(**entry):
    return ("t.yaml", {"format_version": FORMAT_VERSION, "kind": "concept", "entries": [
        {"name": "x", "title": "X", "text": "about x", "keys": {"what": "x"}, **entry}]})


def test_problems_are_refused_with_every_reason():
    base = [(f.name, yaml.safe_load(f.read_text())) for f in sorted(KNOWLEDGE_DIR.glob("*.yaml"))]
    parse_documents([*base, _doc()])  # the base plus a good entry loads
    with pytest.raises(KnowledgeError, match="refers to concept:nowhere"):
        parse_documents([*base, _doc(see=["concept:nowhere"])])
    with pytest.raises(KnowledgeError, match="duplicate passage id concept:x"):
        parse_documents([*base, _doc(), _doc()])
    with pytest.raises(KnowledgeError, match="format_version 0"):
        parse_documents([*base, ("old.yaml", {"format_version": 0, "kind": "kpi", "entries": []})])
    with pytest.raises(KnowledgeError, match="missing 'text'"):
        parse_documents([*base, _doc(text="")])
    without_causes = [d for d in base if d[1]["kind"] != "cause"]
    with pytest.raises(KnowledgeError, match="cause CONGESTION of airan/core/causes.py has no playbook"):
        parse_documents(without_causes)


def test_name_like_tokens():
    text = "Use DRB.UEThpDl and L1M.SS-SINR, set share_pct for OFFLOAD_TRAFFIC via AskStream; not Hello."
    assert name_like_tokens(text) == ["DRB.UEThpDl", "L1M.SS-SINR", "share_pct", "OFFLOAD_TRAFFIC", "AskStream"]
