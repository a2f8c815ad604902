"""OUT/report.html (stage1/data/report/) on fake-engine runs: a run and a merge write it, with the manifest's counts;
model output in it is escaped; it has its tables without matplotlib; `python -m stage1.report OUT` rebuilds it byte
for byte and refuses a directory that holds no finished run in one line (exit 2); duplicate clusters, contaminated
rows and quality signals from rows written by hand. (test_report_browser.py opens it in Chromium.)"""

import html
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stage1.data.report import REPORT_FILE, write_report
from stage1.data.report.charts import EXTRA
from stage1.report import main as report_main

from report_runs import HOSTILE, RUN, charts_expected, manifest_counts, page_counts, with_html

REPO = Path(__file__).resolve().parents[2]
WORDS = "river stone lantern maple orbit velvet harbor signal meadow copper ember glacier willow cobalt".split()


@pytest.fixture
def run_out(gen, make_llm, respond_mixed, out):
    assert gen(*RUN, llm=make_llm(respond=with_html(respond_mixed))) == 0
    return out


def page(out: Path) -> str:
    return (out / REPORT_FILE).read_text(encoding="utf-8")


def test_a_run_writes_the_report_with_the_manifests_counts(run_out):
    text = page(run_out)
    counts = manifest_counts(run_out)
    assert page_counts(text) == counts
    assert len(counts["reasons"]) >= 4 and counts["reasons"]["near_duplicate"] >= 5  # several reasons, clusters
    types = {t: int(n) for t, n in re.findall(r'data-type-count="([^"]+)">(\d+)<', text)}
    kept_rows = [json.loads(line) for line in (run_out / "data.jsonl").read_text().splitlines()]
    assert types == {t: sum(r["type"] == t for r in kept_rows) for t in {r["type"] for r in (
        json.loads(line) for f in ("data.jsonl", "rejects.jsonl") for line in (run_out / f).read_text().splitlines())}}
    for section in ("Finish reasons", "Lengths (tokens)", "Quality signals", "Duplicate clusters",
                    "Contaminated rows", "Samples", "Throughput", "Configuration"):
        assert f"<h2>{section}</h2>" in text
    assert text.count('<img class="chart"') == charts_expected(run_out)
    session = json.loads((run_out / "manifest.json").read_text())["sessions"][0]
    assert f'<td class="n">{session["tokens_per_s"]}</td>' in text


def test_the_page_is_self_contained_and_escapes_model_output(run_out):
    text = page(run_out)
    assert html.escape(HOSTILE) in text  # "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;..."
    assert "<script" not in text.lower() and "<img src=x" not in text and "<b>bold" not in text
    # nothing from elsewhere: no address but data: ones, and a CSP that forbids loading any other
    assert re.findall(r'(?:src|href)="(?!data:)', text) == []
    assert "default-src 'none'; img-src data:; style-src 'unsafe-inline'" in text


def test_duplicate_clusters_show_the_kept_row_beside_its_duplicates(run_out):
    rejects = [json.loads(line) for line in (run_out / "rejects.jsonl").read_text().splitlines()]
    near = [r for r in rejects if r["reason"] == "near_duplicate"]
    first = re.search(r"with (\S+)$", near[0]["detail"]).group(1)
    cluster = page(run_out).split(f"<h3>{first}: ")[1].split("</h3>")[0]
    assert cluster == f"{sum(r['detail'].endswith(f'with {first}') for r in near)} duplicates"
    block = page(run_out).split(f"<h3>{first}: ")[1].split("<h3>")[0]
    assert block.index(f"<b>kept row</b> &middot; {first}") < block.index("<b>estimated Jaccard")
    jaccard = re.search(r"estimated Jaccard (\d\.\d\d)", next(r["detail"] for r in near if r["detail"].endswith(
        f"with {first}"))).group(1)
    assert f"<b>estimated Jaccard {jaccard}</b>" in block


def test_without_matplotlib_the_page_has_its_tables_and_names_the_extra(gen, make_llm, respond_mixed, out,
                                                                        monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert gen(*RUN, llm=make_llm(respond=respond_mixed)) == 0
    assert f"report:   {out / REPORT_FILE}" in capsys.readouterr().out  # the run's summary names it
    text = page(out)
    assert page_counts(text) == manifest_counts(out)
    assert '<img class="chart"' not in text
    assert 'data-charts="missing"' in text and f"stage1[{EXTRA}]" in text
    assert "<td>response_tokens</td><td>kept</td>" in text  # the histograms' numbers, as a table


def test_the_cli_rebuilds_the_page_byte_for_byte(run_out, capsys):
    written = (run_out / REPORT_FILE).read_bytes()
    (run_out / REPORT_FILE).unlink()
    assert report_main([str(run_out)]) == 0
    assert capsys.readouterr().out.strip() == str(run_out / REPORT_FILE)
    assert (run_out / REPORT_FILE).read_bytes() == written


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such directory"),
    (lambda d: d.mkdir(), "no manifest.json, so it is not a stage1 run's output"),
    (lambda d: (d.mkdir(), (d / "manifest.json").write_text("{oops")), "not a valid manifest"),
    (lambda d: (d.mkdir(), (d / "manifest.json").write_text('{"status": "running"}')),
     "its run is not finished (status 'running')"),
])
def test_the_cli_refuses_what_is_not_a_finished_run_in_one_line(tmp_path, make, message):
    target = tmp_path / "target"
    make(target)
    proc = subprocess.run([sys.executable, "-m", "stage1.report", str(target)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (target / REPORT_FILE).exists()


def test_the_merge_writes_the_report_of_the_merged_dataset(gen, make_llm, respond_mixed, out):
    for index in range(2):
        assert gen(*RUN, "--num-shards", 2, "--shard-index", index, llm=make_llm(respond=respond_mixed)) == 0
    assert gen(*RUN, "--merge", llm=None) == 0
    text = page(out)
    assert page_counts(text) == manifest_counts(out)
    merged = json.loads((out / "manifest.json").read_text())["merged_shards"]
    assert all(f"<td>{shard['name']}</td>" in text for shard in merged)
    assert "The merge: " in text


def write_run(out: Path, kept: list[dict], rejected: list[dict]) -> None:
    """A finished run's files, written by hand."""
    out.mkdir(parents=True)
    for name, rows in (("data.jsonl", kept), ("rejects.jsonl", rejected)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "manifest.json").write_text(json.dumps({"status": "complete", "command": "by hand"}))


def row(i: int, **fields) -> dict:
    return {"id": f"r{i}", "index": 0, "instruction": f"question {i}", "type": "fact", "response": f"answer {i}",
            "raw_response": f"answer {i}", "finish_reason": "stop", "prompt_tokens": 10 + i,
            "response_tokens": 3 + i, **fields}


def test_contaminated_rows_are_shown_with_the_eval_text(tmp_path):
    detail = "evals/gsm.jsonl:7: the instruction shares the 13-gram 'a b c' with the eval text 'Janet has <3> ducks'"
    write_run(tmp_path / "o", [row(1)], [row(2, reason="contaminated", detail=detail)])
    text = page(write_report(tmp_path / "o").parent)
    assert page_counts(text)["reasons"] == {"contaminated": 1}
    section = text.split("<h2>Contaminated rows</h2>")[1].split("<h2>")[0]
    assert "evals/gsm.jsonl:7: the instruction shares" in section and "Janet has &lt;3&gt; ducks" in section
    assert "question 2" in section and "answer 2" in section


def test_quality_signals_get_their_histograms_where_the_rows_carry_them(tmp_path):
    kept = [row(i, mean_logprob=-0.1 * i, min_logprob=-1.0 * i, judge_score=1 + i % 5) for i in range(1, 9)]
    write_run(tmp_path / "o", kept, [row(20, reason="empty", detail=None, mean_logprob=-3.0)])
    text = page(write_report(tmp_path / "o").parent)
    section = text.split("<h2>Quality signals</h2>")[1].split("<h2>")[0]
    assert section.count('<img class="chart"') == 3
    # mean_logprob of the kept rows: -0.1 .. -0.8, median -0.45; one rejected row
    assert "<td>mean_logprob</td><td>kept</td><td class=\"n\">8</td><td>-0.45</td>" in section
    assert "<td>mean_logprob</td><td>rejected</td><td class=\"n\">1</td><td>-3</td>" in section
    assert "<td>judge_score</td><td>rejected</td><td class=\"n\">0</td>" in section
    samples = text.split("<h2>Samples</h2>")[1]
    assert "<th>mean_logprob</th><th>min_logprob</th><th>judge_score</th>" in samples


def test_the_instruction_jobs_report_shows_its_generated_instructions(instr, make_llm, out):
    """Its rows' generated text is `instruction` (no response): counts, clusters and samples show that field."""
    def respond(prompt: str, seed: int, index: int) -> str:
        if seed % 4 == 0:  # a quarter of the attempts write the same request: exact duplicates of the first
            return "Write a short poem about the sea at night."
        rng = random.Random(seed)
        return f"Explain {' '.join(rng.choice(WORDS) for _ in range(8))}."
    assert instr("--count", 12, llm=make_llm(respond=respond)) == 0
    text = page(out)
    assert page_counts(text) == manifest_counts(out)
    assert manifest_counts(out)["reasons"].get("exact_duplicate", 0) >= 1
    clusters = text.split("<h2>Duplicate clusters</h2>")[1].split("<h2>")[0]
    assert "<b>kept row</b>" in clusters and "<b>exact duplicate</b>" in clusters
    assert "Write a short poem about the sea at night." in clusters
    assert '<div class="head">instruction</div>' in clusters and '<div class="head">response</div>' not in text
    assert "<td>instruction_tokens</td><td>kept</td>" in text
